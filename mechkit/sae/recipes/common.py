"""What the recipes share: held-out reconstruction figures and writing the record."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch

from mechkit.atomic_io import write_text_atomically
from mechkit.models.weight_cache import cache_root
from mechkit.sae.base import SparseDictionary

__all__ = ["heldout_metrics", "write_record", "work_dir"]


def work_dir() -> Path:
    """Where a recipe keeps its activation cache and checkpoints: ``sae-recipes`` under the
    user's mechkit cache (``$MECHKIT_CACHE_DIR``, else ``~/.cache/mechkit``). Not a fixed name
    under the shared temporary directory, where another local user could plant a folder.

    Example:
        >>> work_dir().name
        'sae-recipes'
    """
    return cache_root() / "sae-recipes"


@torch.no_grad()
def heldout_metrics(sae: SparseDictionary, store: Any) -> dict[str, float]:
    """L0, explained variance ``1 - sum||y - y_hat||^2 / sum||y - mean(y)||^2`` and MSE (mean
    over rows of the summed squared error, in raw activation units) over one epoch of
    ``store``.

    Example:
        >>> from mechkit.sae import ActivationStore, SAEConfig, SparseDictionary
        >>> model = mk.load_model("attn-only-2l")
        >>> tokens = torch.randint(1, 500, (4, 16))
        >>> store = ActivationStore(model, "blocks.0.hook_resid_post", tokens)
        >>> sae = SparseDictionary.from_config(SAEConfig(architecture="relu", d_in=128, d_sae=64,
        ...                                    hook_name="blocks.0.hook_resid_post"))
        >>> sorted(heldout_metrics(sae, store))  # doctest: +NORMALIZE_WHITESPACE
        ['heldout_explained_variance', 'heldout_l0', 'heldout_mse', 'heldout_mse_per_dim',
         'heldout_tokens']
    """
    sq_err = l0 = 0.0
    rows = 0
    ys = []
    for batch in store.epoch(0):
        x, y = batch if isinstance(batch, tuple) else (batch, batch)
        f = sae.encode(x)
        y_hat = sae(x)
        sq_err += (y - y_hat).pow(2).sum().item()
        l0 += (f != 0).sum().item()
        rows += x.shape[0]
        ys.append(y)
    y = torch.cat(ys)
    variance = (y - y.mean(0)).pow(2).sum().item()
    return {
        "heldout_tokens": rows,
        "heldout_l0": l0 / rows,
        "heldout_explained_variance": 1 - sq_err / variance,
        "heldout_mse": sq_err / rows,
        "heldout_mse_per_dim": sq_err / rows / y.shape[-1],
    }


def write_record(folder: Path, record: dict[str, Any]) -> None:
    """``record.json`` beside the weights, with the machine it ran on.

    Example:
        >>> import json, tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> write_record(folder, {"d_sae": 64})
        >>> sorted(json.loads((folder / "record.json").read_text()))[:2]
        ['d_sae', 'machine']
    """
    record = {
        **record,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s)",
        "torch": torch.__version__,
    }
    write_text_atomically(folder / "record.json", json.dumps(record, indent=2) + "\n")
