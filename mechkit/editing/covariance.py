"""The second moment of an MLP's keys, ``C = E[k k^T]``, which ROME and MEMIT use to make an
edit disturb the other keys the layer reads as little as possible.

A key ``k`` is what the edited matrix reads: the MLP's hidden activation
``blocks.L.mlp.hook_post`` (``act(x W_gate) * (x W_in)`` in a gated MLP such as SmolLM2's, whose
``W_out``, Hugging Face's ``down_proj``, is the matrix edited). ``C`` is uncentred, as in ROME
(Meng et al. 2022, arXiv:2202.05262, eq. 2) and MEMIT (Meng et al. 2023, arXiv:2210.07229),
and is estimated on text available offline: :mod:`mechkit.corpus`, the Python reference
documentation shipped with Python (~88,000 SmolLM2 tokens in its training split), where ROME
used 100,000 Wikipedia samples. The forward pass stops after block ``L``. The estimate is
cached under the mechkit cache folder (``editing/``) as safetensors, keyed by the model's name,
the layer and the number of tokens.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechkit.atomic_io import write_atomically
from mechkit.core.batching import each_batch
from mechkit.core.labels import model_name
from mechkit.core.progress import progress_bar
from mechkit.core.types import Model
from mechkit.corpus import corpus_tokens
from mechkit.errors import InvalidArgumentError, UnsupportedModelError, check_positive_int
from mechkit.hook_scope import hook_scope
from mechkit.models.weight_cache import cache_root
from mechkit.reading import read_safetensors

__all__ = ["key_covariance", "covariances", "covariance_path", "check_layer", "FEW_TOKENS_PER_DIM"]

FEW_TOKENS_PER_DIM = 10
"""Fewer tokens than this many times ``d_mlp`` give a warning: the estimate is noisy (and with
fewer than ``d_mlp`` tokens, singular)."""


def check_layer(model: Model, layer: object) -> int:
    """``layer`` if it is a block of ``model`` with an MLP; else a clear error.

    Example:
        >>> check_layer(mk.load_model("smollm2-135m"), 40)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        mechkit.errors.InvalidArgumentError: Expected a layer in 0..29 ...
    """
    n = model.cfg.n_layers
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n:
        raise InvalidArgumentError(
            f"Expected a layer in 0..{n - 1} (the model has {n} blocks); got {layer!r}. Hint: "
            "causal_trace shows where the MLPs matter."
        )
    if model.cfg.attn_only:
        raise UnsupportedModelError(
            "Expected a model with MLPs to edit; this model is attention-only."
        )
    return layer


def key_covariance(
    model: Model,
    layer: int,
    *,
    tokens: Int[Tensor, "batch pos"] | None = None,
    n_tokens: int | None = None,
    seq_len: int = 128,
    batch_size: int = 16,
    cache: bool = True,
    progress: bool = True,
) -> Float[Tensor, "d_mlp d_mlp"]:
    """``E[k k^T]`` of block ``layer``'s MLP keys over the corpus (or over ``tokens``).

    Args:
        model: a HookedTransformer with MLPs.
        layer: the block.
        tokens: ``(batch, pos)`` token ids to use instead of the corpus (not cached).
        n_tokens: at most about this many corpus tokens (whole windows; None: the whole
            training split).
        seq_len: the corpus's window length.
        batch_size: windows per forward pass.
        cache: read and write the estimate under the mechkit cache.
        progress: show a progress bar.

    Warns:
        UserWarning: fewer than ``FEW_TOKENS_PER_DIM * d_mlp`` tokens, with the count.

    Example:
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> model = HookedTransformer(HookedTransformerConfig(n_layers=1, d_model=8, n_ctx=8,
        ...     d_head=4, n_heads=2, d_mlp=16, d_vocab=20, act_fn="relu"))
        >>> C = key_covariance(model, 0, tokens=torch.randint(0, 20, (30, 8)), progress=False)
        >>> C.shape   # (d_mlp, d_mlp)
        torch.Size([16, 16])
    """
    return key_covariances(
        model, [layer], tokens=tokens, n_tokens=n_tokens, seq_len=seq_len,
        batch_size=batch_size, cache=cache, progress=progress,
    )[layer]  # fmt: skip


@torch.no_grad()
def key_covariances(
    model: Model,
    layers: Sequence[int],
    *,
    tokens: Int[Tensor, "batch pos"] | None = None,
    n_tokens: int | None = None,
    seq_len: int = 128,
    batch_size: int = 16,
    cache: bool = True,
    progress: bool = True,
) -> dict[int, Float[Tensor, "d_mlp d_mlp"]]:
    """:func:`key_covariance` of several layers, in one pass over the tokens (the forward stops
    after the last of them); cached ones are read, not recomputed.

    Example:
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> model = HookedTransformer(HookedTransformerConfig(n_layers=2, d_model=8, n_ctx=8,
        ...     d_head=4, n_heads=2, d_mlp=16, d_vocab=20, act_fn="relu"))
        >>> tokens = torch.randint(0, 20, (30, 8))
        >>> both = key_covariances(model, [0, 1], tokens=tokens, progress=False)
        >>> torch.allclose(both[1], key_covariance(model, 1, tokens=tokens, progress=False))
        True
    """
    layers = sorted({check_layer(model, layer) for layer in layers})
    seq_len = check_positive_int("seq_len", seq_len)
    batch_size = check_positive_int("batch_size", batch_size)
    d_mlp = int(model.cfg.d_mlp or 0)
    found: dict[int, Tensor] = {}
    paths: dict[int, Path] = {}
    if tokens is None:
        tokens = corpus_tokens(model, seq_len=seq_len, split="train")
        if n_tokens is not None:
            tokens = tokens[: -(-check_positive_int("n_tokens", n_tokens) // seq_len)]
        if cache:
            for layer in layers:
                paths[layer] = covariance_path(model, layer, int(tokens.numel()))
                if paths[layer].is_file():
                    read, _ = read_safetensors(paths[layer], "an MLP key covariance", "delete it")
                    found[layer] = read["covariance"].to(model.cfg.device)
    todo = [layer for layer in layers if layer not in found]
    if not todo:
        return found
    count = int(tokens.numel())
    if count < FEW_TOKENS_PER_DIM * d_mlp:
        warnings.warn(
            f"The key covariance of layer(s) {todo} is estimated on {count} tokens, fewer than "
            f"{FEW_TOKENS_PER_DIM} x d_mlp = {FEW_TOKENS_PER_DIM * d_mlp}: the estimate is noisy"
            + (" and singular" if count < d_mlp else "")
            + ". Hint: more tokens (n_tokens=None uses the whole corpus), or "
            "covariance='identity'.",
            UserWarning,
            stacklevel=3,
        )
    totals = {
        layer: torch.zeros(d_mlp, d_mlp, dtype=torch.float64, device=model.cfg.device)
        for layer in todo
    }

    def accumulate(act: Tensor, hook: object) -> None:
        layer = int(str(getattr(hook, "name", "")).split(".")[1])
        k = act.detach().reshape(-1, d_mlp).double()  # (batch * pos, d_mlp)
        totals[layer].add_(k.T @ k)

    hooks = [(f"blocks.{layer}.mlp.hook_post", accumulate) for layer in todo]
    with progress_bar(tokens.shape[0], "key covariance", enabled=progress) as bar:

        def work(rows: slice) -> None:
            with hook_scope(model, fwd_hooks=hooks):
                model(tokens[rows].to(model.cfg.device), stop_at_layer=max(todo) + 1)
            bar.update(rows.stop - rows.start)

        # a split retry would count rows twice: run at the given size, no splitting
        each_batch(tokens.shape[0], batch_size, work, can_split=False)
    for layer in todo:
        covariance = (totals[layer] / count).to(model.cfg.dtype)
        found[layer] = covariance
        if layer in paths:
            _write_covariance(paths[layer], covariance, count)
    return found


def _write_covariance(path: Path, covariance: Tensor, count: int) -> None:
    from safetensors.torch import save_file

    data = {"covariance": covariance.cpu().contiguous()}

    def write(tmp: str) -> None:
        save_file(data, tmp, metadata={"tokens": str(count)})

    write_atomically(path, write)


def covariance_path(model: Model, layer: int, n_tokens: int) -> Path:
    """Where :func:`key_covariance` caches the estimate of ``layer`` on ``n_tokens`` tokens.

    Example:
        >>> covariance_path(mk.load_model("attn-only-2l"), 3, 1000).name
        'attn-only-2l-L3-1000.safetensors'
    """
    name = model_name(model).replace("/", "_")
    return cache_root() / "editing" / f"{name}-L{layer}-{n_tokens}.safetensors"


def covariances(
    model: Model,
    layers: Sequence[int],
    covariance: str | Tensor | dict[int, Tensor],
    **kwargs: object,
) -> dict[int, Tensor | None]:
    """``{layer: C}`` for an editing method's ``covariance`` argument: ``"corpus"`` estimates
    each, ``"identity"`` gives None (the method uses a scaled identity), a tensor is used for
    every layer, a dict per layer.

    Example:
        >>> covariances(mk.load_model("attn-only-2l"), [0, 1], "identity")
        {0: None, 1: None}
    """
    if isinstance(covariance, dict):
        return {layer: covariance[layer] for layer in layers}
    if isinstance(covariance, Tensor):
        return {layer: covariance for layer in layers}
    if covariance == "identity":
        return {layer: None for layer in layers}
    if covariance == "corpus":
        return dict(key_covariances(model, layers, **kwargs))  # type: ignore[arg-type]
    raise InvalidArgumentError(
        f"Expected covariance to be 'corpus', 'identity', a (d_mlp, d_mlp) tensor or a dict of "
        f"them by layer; got {covariance!r}."
    )
