"""Toy models that mechkit trains itself and ships as small safetensors files.

Each lives in ``mechkit/toy_models/`` as ``NAME.safetensors`` (the parameters) beside
``NAME.json`` (the TransformerLens config and the record of how it was trained) and the script
that trained it. They have no tokenizer: inputs are token ids, ``bos_token_id`` first.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from transformer_lens import HookedTransformerConfig

from mechkit.errors import FileFormatError
from mechkit.models.conversion import build_hooked

__all__ = ["TOY_MODELS", "toy_model_dir", "load_toy", "toy_record"]

TOY_MODELS: dict[str, str] = {
    "attn-only-2l": "Two-layer attention-only transformer trained on repeated random-token "
    "segments; induction heads in layer 1 (0.93-0.97), a diffuse previous-token head in layer 0.",
}


def toy_model_dir() -> Path:
    """The folder holding the shipped toy models and their training scripts.

    Example:
        >>> (toy_model_dir() / "attn-only-2l.json").is_file()
        True
    """
    return Path(str(resources.files("mechkit") / "toy_models"))


def toy_record(name: str) -> dict[str, Any]:
    """The JSON record of a toy model: its config and how it was trained.

    Example:
        >>> toy_record("attn-only-2l")["config"]["n_layers"]
        2
    """
    return json.loads((toy_model_dir() / f"{name}.json").read_text())


def load_toy(name: str, processing: Any) -> Any:
    """The toy model ``name`` as a processed HookedTransformer on the CPU, in float32.

    Example:
        >>> load_toy("attn-only-2l", mk.models.Processing()).cfg.n_layers
        2
    """
    from safetensors.torch import load_file

    record = toy_record(name)
    cfg = HookedTransformerConfig(**record["config"])
    model = build_hooked(cfg, tokenizer=None)
    params = load_file(toy_model_dir() / f"{name}.safetensors")
    missing = [k for k, _ in model.named_parameters() if k not in params]
    if missing:
        raise FileFormatError(
            f"Expected toy model file {name}.safetensors to hold every parameter; it lacks "
            f"{missing[:5]}. Hint: reinstall mechkit (the file ships with it)."
        )
    model.load_and_process_state_dict(
        params, refactor_factored_attn_matrices=False, **processing.as_dict()
    )
    return model
