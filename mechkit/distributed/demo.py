"""The demo report's "Scaling out" section: how the demo model would be split across GPUs, and
how to run its sweeps on a Ray cluster and its SAE training on several ranks."""

from __future__ import annotations

import html
import json
from pathlib import Path

from mechkit.core.labels import model_name
from mechkit.core.types import Model
from mechkit.devices import block_devices

__all__ = ["demo_section"]


def demo_section(model: Model, out: Path, quick: bool = False) -> str:
    """An HTML fragment for ``make demo``: the block placement of ``model`` on 2, 4 and 8 GPUs
    (written to ``out/gpu_placement.json`` too) and the commands that scale out. Runs nothing
    heavy (``quick`` changes nothing).

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     fragment = demo_section(mk.load_model("attn-only-2l"), Path(folder))
        >>> "cuda:1" in fragment, "--ray" in fragment
        (True, True)
    """
    n_layers = model.cfg.n_layers
    plans = {}
    for k in (2, 4, 8):
        if k > n_layers:
            continue
        plan = block_devices(n_layers, k, "cuda:0")
        runs: dict[str, list[int]] = {}
        for i, device in enumerate(plan):
            runs.setdefault(str(device), []).append(i)
        plans[k] = {d: f"blocks {b[0]}-{b[-1]}" for d, b in runs.items()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_placement.json").write_text(json.dumps(plans, indent=2) + "\n")
    rows = "".join(
        f"<tr><td>{k}</td><td>"
        + html.escape(", ".join(f"{d}: {blocks}" for d, blocks in plan.items()))
        + "</td></tr>"
        for k, plan in plans.items()
    )
    name = html.escape(model_name(model))
    return (
        f"<p>{name} across GPUs with <code>mk.load_model(..., n_devices=k)</code>: contiguous "
        "runs of blocks, by the rule TransformerLens's forward pass follows "
        '(<a href="gpu_placement.json">JSON</a>).</p>'
        f"<table><tr><th>GPUs</th><th>placement</th></tr>{rows}</table>"
        "<p>Sweeps on a Ray cluster, each actor loading the model once, the driver alone "
        "writing the journal: <code>mechkit sweep examples/sweep_ioi.yaml --ray HEAD:6379</code>. "
        "SAE training on several ranks: <code>torchrun --nproc-per-node=8 train.py</code>, "
        "<code>train_sae</code> called on every rank (see the Scaling out page).</p>"
    )
