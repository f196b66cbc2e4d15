"""One attention block read as a sum over source tokens, on any TransformerLens decoder.

For a pre-norm block the attention output at query ``i`` is, exactly::

    attn_out_i = sum_j f_i(x_j) + b_O,    f_i(x_j) = sum_h A[h, i, j] (v[h, j] W_O[h])

where ``v[h, j] = norm1(x_j) W_V[h] + b_V[h]`` depends on token ``j`` alone. This holds on
Llama-type models too: rotary embeddings rotate only queries and keys (they change ``A``, never
``v``); RMSNorm is a per-token map (its scale is token ``j``'s own, fixed by the run); grouped-
query attention shares each key/value head among several query heads (``v`` is repeated to
the query heads, as TransformerLens does). Where the block normalises its attention output
again (Gemma's ``ln1_post``) that norm is linear once its scale is frozen at the run's value for
query ``i``, and is applied to each ``f_i(x_j)`` and to ``b_O``. Kobayashi et al. (2020, 2021)
and Ferrando et al. (2022) build on this decomposition; :func:`attention_parts` returns it, and
``tests/mixing`` check that the parts plus the bias give ``hook_attn_out`` to float precision.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from mechkit.core.types import Model
from mechkit.errors import InvalidTypeError, UnsupportedModelError
from mechkit.hook_scope import run_with_cache

__all__ = [
    "BlockRun",
    "read_blocks",
    "attention_parts",
    "transformed_vectors",
    "frozen_norm",
    "check_decoder",
]

POST_NORM = ("Olmo2ForCausalLM", "Olmo3ForCausalLM")
"""Architectures whose ``ln1`` normalises the attention output after the residual split; the
per-token reading below does not hold there."""


def check_decoder(model: Any, method: str) -> None:
    """Refuse what the methods cannot read: not a HookedTransformer, no attention patterns
    (attention absent or fused into one kernel), or a post-norm block.

    Example:
        >>> check_decoder(torch.nn.Linear(2, 2), "rollout")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        mechkit.errors.InvalidTypeError: Expected a TransformerLens HookedTransformer ...
    """
    if not hasattr(model, "hook_dict") or not hasattr(model, "cfg"):
        raise InvalidTypeError(
            f"Expected a TransformerLens HookedTransformer for method={method!r}; got "
            f"{type(model).__name__}. Hint: mk.load_model(...) converts a model."
        )
    if "blocks.0.attn.hook_pattern" not in model.hook_dict:
        raise UnsupportedModelError(
            f"Expected a model whose attention weights can be read (blocks.0.attn.hook_pattern) "
            f"for method={method!r}; this model has none (its attention is fused or absent). "
            "Hint: load it with mk.load_model, which keeps attention unfused."
        )
    arch = str(getattr(model.cfg, "original_architecture", ""))
    if arch in POST_NORM:
        raise UnsupportedModelError(
            f"Expected a pre-norm decoder for method={method!r}; {arch} normalises each "
            "attention output after the residual split, where the per-token decomposition of "
            "the block does not hold. Hint: method='attention' or 'rollout' read only weights."
        )


@dataclasses.dataclass(frozen=True, eq=False)
class BlockRun:
    """The activations the norm-based methods read, from one forward pass.

    Attributes:
        cache: hook name -> activation (patterns, values, residuals, norm scales).
        logits: ``(batch, pos, d_vocab)`` the model's output.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> run = read_blocks(model, torch.tensor([[1, 2, 3]]))
        >>> run.pattern(0).shape, run.resid_pre(1).shape   # (batch, head, q, k), (b, pos, d)
        (torch.Size([1, 4, 3, 3]), torch.Size([1, 3, 128]))
    """

    cache: dict[str, Tensor]
    logits: Tensor

    def pattern(self, layer: int) -> Float[Tensor, "batch head query key"]:
        """Layer ``layer``'s attention weights."""
        return self.cache[f"blocks.{layer}.attn.hook_pattern"]

    def resid_pre(self, layer: int) -> Float[Tensor, "batch pos d_model"]:
        """The residual stream entering block ``layer``."""
        return self.cache[f"blocks.{layer}.hook_resid_pre"]

    def attn_out(self, layer: int) -> Float[Tensor, "batch pos d_model"]:
        """What block ``layer``'s attention adds to the residual stream."""
        return self.cache[f"blocks.{layer}.hook_attn_out"]

    def resid_post(self, layer: int) -> Float[Tensor, "batch pos d_model"]:
        """The residual stream leaving block ``layer``."""
        return self.cache[f"blocks.{layer}.hook_resid_post"]


@torch.no_grad()
def read_blocks(model: Model, tokens: Tensor, extra: tuple[str, ...] = ()) -> BlockRun:
    """One forward pass keeping what :func:`attention_parts` needs (and the ``extra`` hooks).

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> sorted(read_blocks(model, torch.tensor([[1, 2]])).cache)[:2]
        ['blocks.0.attn.hook_pattern', 'blocks.0.attn.hook_v']
    """
    wanted = {"hook_embed", "hook_pos_embed", "ln_final.hook_scale", *extra}
    for layer in range(model.cfg.n_layers):
        for name in ("attn.hook_pattern", "attn.hook_v", "hook_resid_pre", "hook_attn_out"):
            wanted.add(f"blocks.{layer}.{name}")
        wanted.add(f"blocks.{layer}.hook_resid_post")
        wanted.add(f"blocks.{layer}.ln1_post.hook_scale")
    logits, cache = run_with_cache(model, tokens, names_filter=lambda n: n in wanted)
    return BlockRun(cache=cache, logits=logits)


def value_outputs(
    model: Model, run: BlockRun, layer: int
) -> Float[Tensor, "batch head key d_model"]:
    """``v[h, j] W_O[h]`` for every head and key: each token's vector as head ``h`` would write
    it (key/value heads repeated to the query heads under grouped-query attention).

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> value_outputs(model, read_blocks(model, torch.tensor([[1, 2]])), 0).shape
        torch.Size([1, 4, 2, 128])
    """
    v = run.cache[f"blocks.{layer}.attn.hook_v"]  # (batch, key, kv_head, d_head)
    n_heads = model.cfg.n_heads
    if v.shape[2] != n_heads:
        v = v.repeat_interleave(n_heads // v.shape[2], dim=2)  # (batch, key, head, d_head)
    return torch.einsum("bkhd,hdm->bhkm", v, model.blocks[layer].attn.W_O)


def post_scale(model: Model, run: BlockRun, layer: int) -> Tensor | None:
    """The frozen map of a norm applied to the attention output (Gemma's ``ln1_post``) as a
    ``(batch, query, d_model)`` multiplier ``w / scale_i``; None where the block has none."""
    if not getattr(model.cfg, "use_normalization_before_and_after", False):
        return None
    scale = run.cache[f"blocks.{layer}.ln1_post.hook_scale"]  # (batch, query, 1)
    w = getattr(model.blocks[layer].ln1_post, "w", None)
    return (1.0 / scale) * (w if w is not None else 1.0)


def transformed_vectors(
    model: Model,
    run: BlockRun,
    layer: int,
    queries: slice | None = None,
    n_keys: int | None = None,
    values: Tensor | None = None,
) -> Float[Tensor, "batch query key d_model"]:
    """``f_i(x_j)`` for the queries in ``queries`` (all when None) and the first ``n_keys``
    keys (all when None; causal attention gives keys after the last query nothing).
    ``values``: :func:`value_outputs` of the layer, when the caller already has them.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> run = read_blocks(model, torch.tensor([[1, 2, 3]]))
        >>> f = transformed_vectors(model, run, 1)     # (batch, query, key, d_model)
        >>> bool(torch.allclose(f.sum(2) + model.b_O[1], run.attn_out(1), atol=1e-5))
        True
    """
    queries = queries if queries is not None else slice(None)
    pattern = run.pattern(layer)[:, :, queries, :n_keys]  # (batch, head, query, key)
    vo = values if values is not None else value_outputs(model, run, layer)
    f = torch.einsum("bhqk,bhkm->bqkm", pattern, vo[:, :, :n_keys])
    post = post_scale(model, run, layer)
    if post is not None:
        f = f * post[:, queries, None, :]
    return f


def attention_parts(
    model: Model, run: BlockRun, layer: int
) -> tuple[Float[Tensor, "batch query key d_model"], Float[Tensor, "batch query d_model"]]:
    """Block ``layer``'s attention output split over source tokens: ``(f, bias)`` with
    ``f.sum(2) + bias == attn_out`` (the bias: ``b_O``, through the frozen post-norm if any).

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> run = read_blocks(model, torch.tensor([[1, 2, 3]]))
        >>> f, bias = attention_parts(model, run, 0)
        >>> bool(torch.allclose(f.sum(2) + bias, run.attn_out(0), atol=1e-5))
        True
    """
    f = transformed_vectors(model, run, layer)
    bias = model.blocks[layer].attn.b_O.expand(f.shape[0], f.shape[1], -1)
    post = post_scale(model, run, layer)
    if post is not None:
        bias = bias * post
    return f, bias


def frozen_norm(model: Model, module: Any, x: Tensor, scale: Tensor | None) -> Tensor:
    """The norm ``module`` as a linear map with its scale frozen: centre (LayerNorm types),
    divide by ``scale`` (``(..., 1)``, the run's value for the position; None skips it) and
    multiply by the norm's weight where it was not folded. Its bias is not applied.

    Example:
        >>> model = mk.load_model("attn-only-2l")             # LNPre: centring only
        >>> frozen_norm(model, model.ln_final, torch.tensor([1.0, 3.0]), None).tolist()
        [-1.0, 1.0]
    """
    if model.cfg.normalization_type in ("LN", "LNPre"):
        x = x - x.mean(-1, keepdim=True)
    if scale is not None:
        x = x / scale
    w = getattr(module, "w", None)
    return x * w if w is not None else x
