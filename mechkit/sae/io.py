"""Reading and writing sparse dictionaries in sae-lens's on-disk format.

A folder holds ``cfg.json`` and ``sae_weights.safetensors``. The config has sae-lens's fields
(``architecture``, ``d_in``, ``d_sae``, ``dtype``, ``apply_b_dec_to_input``, ``k`` for TopK,
``d_out`` for transcoders, ``metadata`` with ``hook_name``/``hook_name_out``/``model_name``) and,
inside ``metadata.mechkit``, mechkit's full :class:`SAEConfig` so a file round-trips exactly.
The weights are ``W_enc`` (d_in, d_sae), ``b_enc``, ``W_dec`` (d_sae, d_out), ``b_dec``,
``threshold`` (JumpReLU, BatchTopK) and ``W_skip`` — stored (d_out, d_in) as sae-lens does, while
mechkit's attribute is (d_in, d_out).

mechkit -> sae-lens architecture:

=================  ===========================  ==========================================
mechkit            SAE                          transcoder (skip transcoder)
=================  ===========================  ==========================================
relu               standard                     transcoder (skip_transcoder)
jumprelu           jumprelu                     jumprelu_transcoder (jumprelu_skip_transcoder)
batchtopk          jumprelu (global threshold)  jumprelu_transcoder (jumprelu_skip_transcoder)
topk               topk                         topk when d_in == d_out, without skip (an SAE
                                                whose b_dec is not subtracted: the same map);
                                                otherwise ``mechkit_topk_transcoder``, which
                                                only mechkit reads: sae-lens has no TopK
                                                transcoder
=================  ===========================  ==========================================
"""

from __future__ import annotations

import json
from importlib import metadata as importlib_metadata
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from mechkit.atomic_io import write_atomically, write_text_atomically
from mechkit.errors import SAEConfigError, SAEFileError, UnknownKindError, did_you_mean
from mechkit.reading import read_json, read_safetensors, reading
from mechkit.sae.config import DTYPES, SAEConfig, architecture_class

if TYPE_CHECKING:
    from mechkit.sae.base import SparseDictionary

__all__ = [
    "read_sae",
    "write_sae",
    "sae_lens_architecture",
    "shipped_saes",
    "CFG_FILENAME",
    "WEIGHTS_FILENAME",
]

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"

# sae-lens architecture -> (mechkit architecture, is transcoder, skip)
_FROM_SAE_LENS = {
    "standard": ("relu", False, False),
    "topk": ("topk", False, False),
    "jumprelu": ("jumprelu", False, False),
    "transcoder": ("relu", True, False),
    "skip_transcoder": ("relu", True, True),
    "jumprelu_transcoder": ("jumprelu", True, False),
    "jumprelu_skip_transcoder": ("jumprelu", True, True),
    "mechkit_topk_transcoder": ("topk", True, False),
    "mechkit_topk_skip_transcoder": ("topk", True, True),
}


_HINT = (
    "save with mechkit.sae.save_sae or sae-lens's SAE.save_model; a damaged download must be "
    "fetched again."
)


def _shipped_dir() -> Path:
    # importlib.resources, not the checkout's layout: the folder is package data of the wheel
    return Path(str(resources.files("mechkit") / "sae" / "trained"))


def shipped_saes() -> dict[str, Path]:
    """The sparse dictionaries shipped inside mechkit, by name, with their folders.

    Example:
        >>> sorted(shipped_saes())[:2]
        ['smollm2-135m-mlp12-skip-transcoder', 'smollm2-135m-res12-topk']
    """
    root = _shipped_dir()
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir()) if (p / CFG_FILENAME).is_file()}


def _resolve_folder(path: str | Path) -> Path:
    """``path`` itself if it exists, else the shipped dictionary of that name."""
    folder = Path(path)
    if folder.exists() or len(folder.parts) != 1:
        return folder
    shipped = shipped_saes()
    if folder.name in shipped:
        return shipped[folder.name]
    raise SAEFileError(
        f"Expected a folder or the name of a shipped dictionary ({', '.join(shipped)}); got "
        f"{str(path)!r}, which is neither.{did_you_mean(str(path), shipped)}"
    )


def sae_lens_architecture(cfg: SAEConfig) -> str:
    """The ``architecture`` string sae-lens knows ``cfg`` by (see the module's table).

    Example:
        >>> from mechkit.sae import SAEConfig
        >>> sae_lens_architecture(SAEConfig(architecture="relu", d_in=8, d_sae=16, hook_name="h"))
        'standard'
    """
    if not cfg.is_transcoder:
        return {"relu": "standard", "batchtopk": "jumprelu"}.get(cfg.architecture, cfg.architecture)
    if cfg.architecture == "topk":
        if not cfg.skip and cfg.d_in == cfg.d_out:
            return "topk"
        return "mechkit_topk_skip_transcoder" if cfg.skip else "mechkit_topk_transcoder"
    base = "" if cfg.architecture == "relu" else "jumprelu_"
    return f"{base}{'skip_' if cfg.skip else ''}transcoder"


def _sae_lens_version() -> str:
    try:
        return importlib_metadata.version("sae-lens")
    except importlib_metadata.PackageNotFoundError:  # pragma: no cover - sae-lens is a dependency
        return "6.0.0"


def write_sae(sae: SparseDictionary, path: str | Path, *, weights_dtype: str | None = None) -> Path:
    """Write ``sae`` into folder ``path`` (see :func:`mechkit.sae.save_sae`).

    Example:
        >>> import tempfile
        >>> from mechkit.sae import SAEConfig, SparseDictionary
        >>> sae = SparseDictionary.from_config(SAEConfig(architecture="relu", d_in=8, d_sae=16,
        ...                                    hook_name="blocks.0.hook_resid_post"))
        >>> sorted(p.name for p in write_sae(sae, tempfile.mkdtemp()).iterdir())
        ['cfg.json', 'sae_weights.safetensors']
    """
    if not isinstance(sae, torch.nn.Module) or not isinstance(getattr(sae, "cfg", None), SAEConfig):
        raise SAEConfigError(
            f"Expected a mechkit SparseDictionary; got {type(sae).__name__}. Hint: load it with "
            "mechkit.sae.load_sae, or build one with SparseDictionary.from_config."
        )
    if weights_dtype is not None and weights_dtype not in DTYPES:
        raise SAEConfigError(
            f"Expected weights_dtype to be one of {sorted(DTYPES)}; got {weights_dtype!r}."
            + did_you_mean(str(weights_dtype), DTYPES)
        )
    cfg = sae.cfg
    store = DTYPES[weights_dtype or cfg.dtype]
    tensors = {
        name: tensor.detach().to("cpu", store).contiguous()
        for name, tensor in sae.state_dict().items()
    }
    if "W_skip" in tensors:
        tensors["W_skip"] = tensors["W_skip"].T.contiguous()  # sae-lens: (d_out, d_in)
    architecture = sae_lens_architecture(cfg)
    version = _sae_lens_version()
    meta: dict[str, Any] = {
        "sae_lens_version": version,
        "sae_lens_training_version": version,
        "model_name": cfg.model_name,
        "hook_name": cfg.hook_name,
        "mechkit": cfg.to_dict(),
    }
    if cfg.out_hook_name is not None:
        meta["hook_name_out"] = cfg.out_hook_name
    out: dict[str, Any] = {
        "architecture": architecture,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": cfg.dtype,
        "device": "cpu",
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "normalize_activations": cfg.normalize_activations,
        "reshape_activations": "none",
    }
    if cfg.architecture == "topk":
        out["k"] = cfg.k
        out["rescale_acts_by_decoder_norm"] = cfg.rescale_acts_by_decoder_norm
    if cfg.is_transcoder and architecture != "topk":
        out["d_out"] = cfg.d_out
    out["metadata"] = meta
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    write_atomically(folder / WEIGHTS_FILENAME, lambda tmp: save_file(tensors, tmp))
    write_text_atomically(folder / CFG_FILENAME, json.dumps(out, indent=2) + "\n")
    return folder


def _config_from_sae_lens(raw: dict[str, Any], hook_name: str | None) -> SAEConfig:
    """A mechkit config for a file sae-lens wrote (no ``metadata.mechkit``)."""
    arch = raw.get("architecture", "standard")
    if arch not in _FROM_SAE_LENS:
        raise UnknownKindError(
            f"Expected an sae-lens architecture mechkit reads, one of {sorted(_FROM_SAE_LENS)}; "
            f"got {arch!r}.{did_you_mean(str(arch), _FROM_SAE_LENS)}"
        )
    ours, transcoder, skip = _FROM_SAE_LENS[arch]
    meta = raw.get("metadata") or {}
    norm = raw.get("normalize_activations", "none")
    if norm not in ("none", "expected_average_only_in"):
        raise SAEFileError(
            f"Expected normalize_activations 'none' or 'expected_average_only_in'; got {norm!r}. "
            "Hint: mechkit's dictionaries do not normalise at run time; fold the normalisation "
            "into the weights with sae-lens first."
        )
    name = hook_name or meta.get("hook_name") or raw.get("hook_name")
    if not name:
        raise SAEFileError(
            "Expected the file to record its hook (metadata.hook_name); got none. Hint: pass "
            "load_sae(path, hook_name='blocks.L.hook_...')."
        )
    return SAEConfig(
        architecture=ours,
        d_in=int(raw["d_in"]),
        d_sae=int(raw["d_sae"]),
        hook_name=name,
        d_out=int(raw["d_out"]) if transcoder else None,
        out_hook_name=meta.get("hook_name_out") if transcoder else None,
        k=int(raw["k"]) if ours == "topk" else None,
        skip=skip,
        model_name=meta.get("model_name") or raw.get("model_name"),
        dtype=raw.get("dtype", "float32"),
        apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", not transcoder)),
        rescale_acts_by_decoder_norm=bool(raw.get("rescale_acts_by_decoder_norm", False)),
        normalize_activations=norm,
    )


def read_sae(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: str | None = None,
    hook_name: str | None = None,
) -> SparseDictionary:
    """Read folder ``path`` (see :func:`mechkit.sae.load_sae`).

    Example:
        >>> read_sae("smollm2-135m-res12-topk").cfg.architecture   # a shipped name, or a folder
        'topk'
    """
    folder = _resolve_folder(path)
    cfg_path, weights_path = folder / CFG_FILENAME, folder / WEIGHTS_FILENAME
    if not cfg_path.is_file() or not weights_path.is_file():
        contents = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else "none"
        raise SAEFileError(
            f"Expected a folder with {CFG_FILENAME} and {WEIGHTS_FILENAME}; got {str(folder)!r} "
            f"(contents: {contents})."
            " Hint: save with mechkit.sae.save_sae or sae-lens's SAE.save_model."
        )
    what = "a sparse-dictionary config (sae-lens's cfg.json)"
    raw = read_json(cfg_path, what, _HINT, SAEFileError)
    try:
        with reading(cfg_path, what, _HINT, SAEFileError):  # JSON of the wrong shape
            ours = (raw.get("metadata") or {}).get("mechkit")
            if ours is not None:
                cfg = SAEConfig.from_dict(ours)
                if hook_name is not None:
                    cfg = cfg.replace(hook_name=hook_name)
            else:
                cfg = _config_from_sae_lens(raw, hook_name)
    except (SAEConfigError, UnknownKindError) as exc:  # say which file holds the bad config
        raise SAEFileError(f"{exc} (in {str(cfg_path)!r})") from exc
    if dtype is not None:
        cfg = cfg.replace(dtype=dtype)
    state, _ = read_safetensors(weights_path, "sparse-dictionary weights", _HINT, SAEFileError)
    for key in ("scaling_factor", "finetuning_scaling_factor"):
        if key in state:
            if not torch.all(state[key] == 1):
                raise SAEFileError(
                    f"Expected no fine-tuning scaling factor (or all ones); got {key!r} with "
                    "other values. Hint: fold it into W_dec with sae-lens first."
                )
            del state[key]
    if "log_threshold" in state:  # older sae-lens JumpReLU files
        state["threshold"] = state.pop("log_threshold").exp()
    if "W_skip" in state:
        state["W_skip"] = state["W_skip"].T
    sae = architecture_class(cfg.architecture)(cfg)  # weights come from the file
    expected = sae.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    bad = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or bad:
        shapes = {k: (tuple(state[k].shape), tuple(expected[k].shape)) for k in bad}
        raise SAEFileError(
            f"Expected the tensors {sorted(expected)} for a {cfg.architecture!r} dictionary "
            f"({cfg.d_in} -> {cfg.d_sae} -> {cfg.out_width}); got missing {missing}, unexpected "
            f"{unexpected}, wrong shapes (got, expected) {shapes} in {weights_path}."
        )
    sae.load_state_dict({k: v.to(cfg.torch_dtype) for k, v in state.items()})
    return sae.to(device)
