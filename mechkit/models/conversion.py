"""Hugging Face models (from a folder or a GGUF file) turned into TransformerLens models.

The path is the one TransformerLens takes for its own hub models, fed from local files:
``transformers`` loads the model (dequantizing GGUF tensors to float32 through the ``gguf``
package), TransformerLens builds its config from the Hugging Face config and maps the weights
with its per-architecture converter, and :meth:`HookedTransformer.load_and_process_state_dict`
applies the processing in :class:`Processing`. GGUF conversions are cached (see
:mod:`mechkit.models.weight_cache`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformer_lens import HookedTransformer
from transformer_lens.loading_from_pretrained import (
    get_pretrained_model_config,
    get_pretrained_state_dict,
)

from mechkit.errors import CacheError, UnsupportedModelError
from mechkit.models.weight_cache import (
    FORMAT_VERSION,
    cache_key,
    cached_folder,
    check_entry,
    verify_entry,
    write_folder_atomically,
)

__all__ = ["Processing", "load_gguf", "load_hf_folder", "build_hooked", "one_gguf_parse"]

# Rotary models allocate an [n_ctx, n_ctx] causal mask per layer; SmolLM2's 8192 would cost
# 2 GiB over 30 layers. 2048 tokens covers interpretability work; pass n_ctx to go further.
DEFAULT_MAX_CTX = 2048


@dataclasses.dataclass(frozen=True, kw_only=True)
class Processing:
    """How the weights were processed after loading: the same on every load.

    The defaults keep the model's logits equal to the original network's (up to float error):
    folding the norms' scales into the next weights changes no output, while centring the
    unembedding would shift every logit by a per-position constant.

    Attributes:
        fold_ln: norm weights (and biases) folded into the following linear maps; the norm
            hooks then see the pure normalization (``RMSPre``/``LNPre``).
        center_writing_weights: weights writing to the residual stream made mean-zero (LayerNorm
            models only; a no-op for RMSNorm ones). Off: it changes the residual stream.
        center_unembed: unembedding made mean-zero over the vocabulary. Off: logits would then
            differ from the original model's by a constant per position.
        fold_value_biases: value biases folded into the attention output bias. Off: each head's
            output keeps its own value bias, so head outputs are what the model computes.

    Example:
        >>> Processing(fold_ln=False).as_dict()  # doctest: +NORMALIZE_WHITESPACE
        {'fold_ln': False, 'center_writing_weights': False, 'center_unembed': False,
         'fold_value_biases': False}
    """

    fold_ln: bool = True
    center_writing_weights: bool = False
    center_unembed: bool = False
    fold_value_biases: bool = False

    def as_dict(self) -> dict[str, bool]:
        return dataclasses.asdict(self)


# Architectures whose TransformerLens config exists only under an official name (TL hard-codes
# Gemma 3's settings instead of reading config.json). The GGUF's own config is checked
# against it field by field before the name is trusted (see _check_against_official).
OFFICIAL_CONFIG_NAMES = {"Gemma3ForCausalLM": "google/gemma-3-270m"}


def _tl_config(
    hf_config_dir: Path,
    name: str,
    processing: Processing,
    n_ctx: int | None,
    official: str | None = None,
    **kw: Any,
) -> Any:
    """TransformerLens's config for the Hugging Face config saved in ``hf_config_dir`` (or, for
    the architectures in OFFICIAL_CONFIG_NAMES, TransformerLens's config of ``official``)."""
    hf_cfg = json.loads((hf_config_dir / "config.json").read_text())
    max_pos = hf_cfg.get("max_position_embeddings") or hf_cfg.get("n_positions")
    if n_ctx is None and max_pos is not None and max_pos > DEFAULT_MAX_CTX:
        n_ctx = DEFAULT_MAX_CTX
    kw.update(fold_ln=processing.fold_ln, n_ctx=n_ctx, dtype=torch.float32)
    if official is not None:
        cfg = get_pretrained_model_config(official, **kw)
        _check_against_official(hf_cfg, cfg, official)
    else:
        # TransformerLens guesses the architecture from words such as "llama" in the path, so
        # the config is read from a folder whose name says nothing.
        with tempfile.TemporaryDirectory() as neutral:
            (Path(neutral) / "config.json").write_text(json.dumps(hf_cfg))
            cfg = get_pretrained_model_config(neutral, **kw)
    cfg.model_name = name
    return cfg


def _check_against_official(hf_cfg: dict[str, Any], cfg: Any, official: str) -> None:
    """Refuse a file whose sizes differ from the official model whose config we borrow."""
    text = hf_cfg.get("text_config", hf_cfg)
    pairs = {
        "num_hidden_layers": cfg.n_layers,
        "hidden_size": cfg.d_model,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_key_value_heads or cfg.n_heads,
        "head_dim": cfg.d_head,
        "intermediate_size": cfg.d_mlp,
        "vocab_size": cfg.d_vocab,
        "sliding_window": cfg.window_size,
    }
    bad = {k: (text.get(k), v) for k, v in pairs.items() if text.get(k) != v}
    if bad:
        raise UnsupportedModelError(
            f"Expected a {official} checkpoint (TransformerLens knows this architecture only by "
            f"that name); the file's config differs: "
            + ", ".join(f"{k} {got} vs {want}" for k, (got, want) in bad.items())
        )


def _hf_rotary_tables(cfg: Any) -> dict[str, torch.Tensor]:
    """Rotary sin/cos tables computed as transformers computes them (``pos * inv_freq`` in
    float32). TransformerLens's ``pos / base**(i/d)`` differs by ~1e-4 at position 2048, which
    grows the logit error with position (8e-4 at 2048 tokens for Gemma 3); these tables keep it
    at the float noise floor (1.3e-4). Used for the architectures in OFFICIAL_CONFIG_NAMES."""
    tables = {}
    types = getattr(cfg, "attn_types", None) or ["global"] * cfg.n_layers
    for layer, kind in enumerate(types):
        local = kind == "local" and getattr(cfg, "rotary_base_local", None) is not None
        base = cfg.rotary_base_local if local else cfg.rotary_base
        dim = cfg.rotary_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        angles = torch.arange(cfg.n_ctx).float()[:, None] * inv_freq[None, :]  # (pos, dim / 2)
        angles = torch.cat((angles, angles), dim=-1)  # (pos, dim)
        tables[f"blocks.{layer}.attn.rotary_sin"] = angles.sin()
        tables[f"blocks.{layer}.attn.rotary_cos"] = angles.cos()
    return tables


def build_hooked(cfg: Any, tokenizer: Any) -> Any:
    """An empty HookedTransformer for ``cfg`` (weights uninitialised, on the CPU).

    Example:
        >>> cfg = mk.load_model("attn-only-2l").cfg
        >>> build_hooked(cfg, None).cfg.n_layers     # empty weights, the same shapes
        2
    """
    with warnings.catch_warnings():  # TransformerLens 3.9 deprecates the class for 4.x
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        return HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)


def _convert(
    hf_model: Any,
    tokenizer: Any,
    hf_config_dir: Path,
    name: str,
    processing: Processing,
    n_ctx: int | None,
    **kw: Any,
) -> Any:
    """Map a loaded Hugging Face model onto a processed HookedTransformer (on the CPU).

    Returns:
        (model, buffers): the model, and the buffers set from the HF model that a cached copy
        must restore (rotary tables for OFFICIAL_CONFIG_NAMES architectures; else empty).
    """
    official = OFFICIAL_CONFIG_NAMES.get(type(hf_model).__name__)
    cfg = _tl_config(hf_config_dir, name, processing, n_ctx, official, **kw)
    state_dict = get_pretrained_state_dict(official or str(hf_config_dir), cfg, hf_model=hf_model)
    buffers = _hf_rotary_tables(cfg) if official is not None else {}
    state_dict.update(buffers)
    model = build_hooked(cfg, tokenizer)
    model.load_and_process_state_dict(
        state_dict, refactor_factored_attn_matrices=False, **processing.as_dict()
    )
    return model, buffers


def _save_hf_config(hf_model: Any, folder: Path) -> None:
    config = hf_model.config
    config.architectures = [type(hf_model).__name__]  # GGUF-built configs carry none
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights were dequantized on load
    config.save_pretrained(folder)


def _gguf_add_bos(path: Path) -> bool:
    """Whether the GGUF file's tokenizer metadata asks for a BOS token in front of the text."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get("tokenizer.ggml.add_bos_token")
    return bool(field.parts[field.data[0]][0]) if field is not None else False


@contextlib.contextmanager
def one_gguf_parse() -> Iterator[None]:
    """Within the block, every ``gguf.GGUFReader`` of the same file is the first one made, and
    transformers' metadata-only reads of a GGUF file (``load_gguf_checkpoint(path,
    return_tensors=False)``, for the config and for the tokenizer) parse it once.

    transformers re-reads a GGUF file's metadata for the config, the tokenizer and the
    weights, and each read parses every field again: for Gemma 3's 262,144-token vocabulary
    one parse costs 15 s of Python, and turning the vocabulary into Python lists 2 s more. A
    reader only memory-maps the file and is read, never written, so sharing it changes no
    value; a metadata read is handed out as a deep copy, so a caller that edits its dictionary
    edits its own. The block's readers also slice the file as a plain array (a view of the same
    memory map): numpy's ``memmap`` subclass costs more per slice than the parse's own work
    (Gemma 3: 14.8 s, 5.3 s as a plain view, the same fields and tensors).

    Example:
        >>> import gguf, os, tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = os.path.join(folder, "tiny.gguf")
        ...     writer = gguf.GGUFWriter(path, "llama")
        ...     writer.write_header_to_file()
        ...     writer.write_kv_data_to_file()
        ...     writer.write_tensors_to_file()
        ...     writer.close()
        ...     with one_gguf_parse():
        ...         shared = gguf.GGUFReader(path) is gguf.GGUFReader(path)
        >>> shared, gguf.GGUFReader.__name__  # the class itself is back after the block
        (True, 'GGUFReader')
    """
    import gguf
    import transformers.modeling_gguf_pytorch_utils as hf_gguf

    module: Any = gguf  # the class is replaced by a function for the block's duration
    with _GGUF_PATCH:  # threads take turns (a block may nest in its own thread)
        if getattr(module.GGUFReader, "one_gguf_parse", False):  # nested: the outer block's
            yield
            return
        original, original_checkpoint = module.GGUFReader, hf_gguf.load_gguf_checkpoint
        readers: dict[tuple[str, str], Any] = {}
        metadata: dict[str, Any] = {}

        class PlainViewReader(original):  # type: ignore[misc, valid-type]
            """The file sliced as a plain ndarray view of gguf's memmap."""

            @property
            def data(self) -> Any:
                return self._plain

            @data.setter
            def data(self, value: Any) -> None:
                self._plain = value.view(np.ndarray) if isinstance(value, np.memmap) else value

        def reader(path: Any, mode: str = "r") -> Any:
            key = (str(Path(path).resolve()), mode)
            if key not in readers:
                readers[key] = PlainViewReader(path, mode)
            return readers[key]

        reader.one_gguf_parse = True  # type: ignore[attr-defined]

        def checkpoint(path: Any, return_tensors: Any = False, **kw: Any) -> Any:
            if return_tensors or kw:  # the weights, or options: not shared
                return original_checkpoint(path, return_tensors, **kw)
            key = str(Path(path).resolve())
            if key not in metadata:
                metadata[key] = original_checkpoint(path, False)
            return copy.deepcopy(metadata[key])

        module.GGUFReader, hf_gguf.load_gguf_checkpoint = reader, checkpoint  # type: ignore[assignment]
        try:
            yield
        finally:
            module.GGUFReader, hf_gguf.load_gguf_checkpoint = original, original_checkpoint


_GGUF_PATCH = threading.RLock()


def load_gguf(path: Path, name: str, processing: Processing, n_ctx: int | None = None):
    """A processed HookedTransformer from a GGUF file, through the cache.

    Returns:
        (model, from_cache): the model on the CPU in float32, and whether the cache served it.

    Example:
        >>> from pathlib import Path
        >>> from mechkit.models import PROCESSING
        >>> path = Path(mk.model_info(mk.load_model("smollm2-135m")).location)  # its GGUF file
        >>> model, from_cache = load_gguf(path, "smollm2-135m", PROCESSING)
        >>> path.suffix, from_cache, model.cfg.n_layers, model.cfg.d_model
        ('.gguf', True, 30, 576)
    """
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    # Keyed by the file, not the name: "smollm2-135m" and the path to its file share one entry.
    key = cache_key(path, {**processing.as_dict(), "n_ctx": n_ctx})
    folder = cached_folder(path.stem, key)
    from_cache = folder is not None
    if folder is None:

        def fill(tmp: Path) -> None:
            from transformers import AutoModelForCausalLM

            with one_gguf_parse():  # config, tokenizer, weights and BOS flag: one parse
                tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
                hf_model = AutoModelForCausalLM.from_pretrained(
                    path.parent, gguf_file=path.name, dtype=torch.float32
                ).eval()
                add_bos = _gguf_add_bos(path)
            _save_hf_config(hf_model, tmp)
            tokenizer.save_pretrained(tmp / "tokenizer")
            model, buffers = _convert(
                hf_model, tokenizer, tmp, name, processing, n_ctx, default_prepend_bos=add_bos
            )
            params = {k: v.detach().contiguous() for k, v in model.named_parameters()}
            save_file(params, tmp / "weights.safetensors")
            if buffers:
                save_file(buffers, tmp / "buffers.safetensors")
            meta = {
                "official_config": OFFICIAL_CONFIG_NAMES.get(type(hf_model).__name__),
                "source": str(path.resolve()),
                "processing": processing.as_dict(),
                "n_ctx": model.cfg.n_ctx,
                "default_prepend_bos": add_bos,
                "format": FORMAT_VERSION,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))

        folder = write_folder_atomically(path.stem, key, fill)

    if not from_cache:
        return _load_entry(folder, name, processing), from_cache
    # A cached entry is checked (file list, sizes) at once, and its checksums on a second
    # thread while the model is built; nothing is returned before both pass.
    meta = check_entry(folder)
    with ThreadPoolExecutor(1, thread_name_prefix="mechkit-verify") as pool:
        verified = pool.submit(verify_entry, folder, meta)
        try:
            model = _load_entry(folder, name, processing)
        except Exception as exc:
            verified.result()  # a damaged entry is the likelier cause: say so first
            if isinstance(exc, CacheError):
                raise
            raise CacheError(
                f"Expected the cache entry {str(folder)!r} to load; it failed with "
                f"{type(exc).__name__}: {exc}. Hint: delete that folder (rm -r '{folder}') and "
                "load the model again to convert it afresh."
            ) from exc
        verified.result()
    return model, from_cache


def _load_entry(folder: Path, name: str, processing: Processing) -> Any:
    """Build the model a cache folder holds (on the CPU, float32)."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    meta = json.loads((folder / "meta.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    cfg = _tl_config(
        folder,
        name,
        processing,
        meta["n_ctx"],
        meta.get("official_config"),
        default_prepend_bos=meta["default_prepend_bos"],
    )
    model = build_hooked(cfg, tokenizer)
    _load_parameters(model, load_file(folder / "weights.safetensors"))
    if (folder / "buffers.safetensors").is_file():
        model.load_state_dict(load_file(folder / "buffers.safetensors"), strict=False)
    return model


def _load_parameters(model: Any, params: dict[str, torch.Tensor]) -> None:
    """Load saved parameters; the buffers (masks, rotary tables) are rebuilt by the model."""
    missing, unexpected = model.load_state_dict(params, strict=False, assign=True)
    param_names = {k for k, _ in model.named_parameters()}
    missing_params = [k for k in missing if k in param_names]
    if missing_params or unexpected:
        raise CacheError(  # the cache does not fit this version of the code
            f"Cached weights do not fit the model: missing {missing_params[:5]}, "
            f"unexpected {list(unexpected)[:5]}. Delete the cache folder and load again."
        )


def load_hf_folder(folder: Path, name: str, processing: Processing, n_ctx: int | None = None):
    """A processed HookedTransformer from a local Hugging Face model folder (no cache needed).

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from tokenizers import Tokenizer, models, pre_tokenizers
        >>> from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
        >>> from mechkit.models import PROCESSING
        >>> vocab = {"<s>": 0, "</s>": 1, "hello": 2, "world": 3}
        >>> words = Tokenizer(models.WordLevel(vocab, unk_token="</s>"))
        >>> words.pre_tokenizer = pre_tokenizers.Whitespace()
        >>> tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, bos_token="<s>")
        >>> _ = torch.manual_seed(0)
        >>> hf_model = LlamaForCausalLM(LlamaConfig(  # a tiny random Llama, written offline
        ...     vocab_size=4, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        ...     num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)).eval()
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     hf_model.save_pretrained(folder)
        ...     _ = tokenizer.save_pretrained(folder)
        ...     model = load_hf_folder(Path(folder), "tiny-llama", PROCESSING)
        >>> model.cfg.n_layers, model.cfg.d_model, model.cfg.d_vocab
        (2, 16, 4)
        >>> tokens = torch.tensor([[0, 2, 3, 2]])  # (batch, pos)
        >>> torch.allclose(model(tokens).log_softmax(-1),  # processing keeps the distribution
        ...                hf_model(tokens).logits.log_softmax(-1), atol=1e-4)
        True
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with tempfile.TemporaryDirectory() as tmp:
        _save_hf_config(hf_model, Path(tmp))
        return _convert(hf_model, tokenizer, Path(tmp), name, processing, n_ctx)[0]
