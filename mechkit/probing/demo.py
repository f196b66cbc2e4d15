"""The probing family's section of ``make demo``: probes with controls, LEACE against random
erasure, and DAS on IOI with the illusion check, on the demo's model.

Example:
    >>> callable(demo_section)
    True
"""

from __future__ import annotations

import html
from pathlib import Path

from mechkit.core.types import Model
from mechkit.corpus import corpus_tokens
from mechkit.probing.das import das
from mechkit.probing.datasets import ioi_swap_pairs, name_gender
from mechkit.probing.erasure import amnesic_probe, fit_leace
from mechkit.probing.probes import train_probe
from mechkit.report_parts import figure_link, html_table

__all__ = ["demo_section"]


def demo_section(model: Model, out: Path, quick: bool = False) -> str:
    """An HTML fragment (figures written under ``out``): a name-gender probe by layer with its
    control task, LEACE of that property against random erasers of the same rank (LM loss on
    held-out text), and, unless ``quick``, DAS on IOI's indirect-object position with the
    illusion check.

    Example:
        >>> from mechkit.demo import SECTIONS  # `make demo` runs it on SmolLM2 (minutes)
        >>> demo_section in [section for _title, section in SECTIONS]
        True
    """
    n = model.cfg.n_layers
    layers = [n // 4, n // 2, 3 * n // 4] if quick else list(range(0, n, max(1, n // 10)))
    data = name_gender(model)
    probe = train_probe(
        model, data, layers=layers, l2=1e-2 if quick else None, folds=3, split="type"
    )
    probe_link = figure_link(out, "probe_name_gender.html", probe.plot())
    df = probe.to_dataframe().round(3)
    rows = [[int(r.layer), r.accuracy, r.control_accuracy, r.selectivity] for r in df.itertuples()]
    layer = n // 2
    eraser = fit_leace(model, data, layer=layer)
    texts = corpus_tokens(model, seq_len=64, split="test", max_sequences=4 if quick else 24)
    amnesic = amnesic_probe(model, data, eraser, texts=texts.tolist(), n_random=1 if quick else 3)
    random_losses = ", ".join(f"{v:.4f}" for v in amnesic.loss_random.tolist())
    parts = [
        f"<p>A logistic probe for the gender of a first name ({len(data)} sentences ending in "
        "a name; the test names never seen in training) at each layer's residual stream, "
        "against the same probe on a control task that gives each name a random label "
        "(Hewitt &amp; Liang 2019): "
        f"{probe_link}.</p>",
        html_table(rows, ["layer", "accuracy", "control accuracy", "selectivity"]),
        f"<p>LEACE (Belrose et al. 2023) of the same property at layer {layer} (rank "
        f"{eraser.rank}), applied at every position: LM loss on held-out text "
        f"{amnesic.loss_clean:.4f} unchanged, {amnesic.loss_erased:.4f} with the property "
        f"erased, {html.escape(random_losses)} with random subspaces of the same rank erased; "
        f"probe accuracy {amnesic.probe_accuracy:.2f} before, "
        f"{amnesic.probe_accuracy_erased:.2f} after.</p>",
    ]
    if not quick:
        late = (4 * n) // 5  # SmolLM2: the answer reaches END between layers 18 and 24
        pairs = ioi_swap_pairs(model, 96, swap="repeated")
        result = das(model, pairs, hook_name=f"blocks.{late}.hook_resid_post", position="END",
                     k=1, steps=30, lr=5e-2)  # fmt: skip
        report = result.illusion
        das_link = figure_link(out, "das_ioi_illusion.html", report.plot())
        parts.append(
            f"<p>DAS (Geiger et al. 2023), one direction of the residual stream after layer "
            f"{late} at the last token, for IOI with the source repeating the other name (the "
            "answer should become the base's subject): "
            f"held-out IIA {result.iia_test:.2f} (unchanged run {result.iia_none:.2f}, whole "
            f"residual patched {result.iia_full:.2f}). Illusion check (Makelov et al. 2023, "
            f"{html.escape(report.split)}): {html.escape(report.verdict)}; {das_link}.</p>"
        )
    return "".join(parts)
