"""Norm-based context mixing: the attention norm with the residual and the normalization folded
in (Kobayashi et al. 2020, "Attention is Not Only a Weight", EMNLP; 2021, "Incorporating
Residual and Normalization Layers into Analysis of Masked Language Models", EMNLP), and GlobEnc
(Modarressi et al. 2022, "GlobEnc: Quantifying Global Token Attribution by Incorporating the
Whole Encoder Layer in Transformers", NAACL).

Kobayashi et al. (2020) measure what token ``j`` adds to position ``i`` by the norm of the
weighted transformed vector ``||sum_h A[h,i,j] v[h,j] W_O[h]||`` rather than by the weight alone;
their 2021 follow-up adds the residual connection and the layer norm that reads the sum. In a
pre-norm decoder the block's attention sublayer leaves ``resid_mid_i = x_i + sum_j f_i(x_j) +
b_O`` (see :mod:`mechkit.mixing.blocks`), and the next norm to read it (``ln2``; the next
block's ``ln1`` or ``ln_final`` in attention-only models) is linear once its scale ``s_i`` is
frozen at the run's value: centring ``P`` (LayerNorm only), ``1/s_i`` and its weight ``w``
(when not folded). So the map of ``"attention_norm"`` is::

    N[i, j] = || w * P( f_i(x_j) + [i = j] x_i ) || / s_i

exact on RMSNorm (no ``P``), rotary and grouped-query models. The bias goes to no token.
Computed without building ``(query, key, d_model)`` tensors: with ``g[h, j] = w * P(v[h,j]
W_O[h])``, ``||sum_h A[h,i,j] g[h,j]||^2 = sum_{h,h'} A[h,i,j] A[h',i,j] <g[h,j], g[h',j]>``
(a ``heads x heads`` Gram matrix per key), and the diagonal ``j = i`` is done directly.
Aggregated over layers by the mean of the row-normalised maps. GlobEnc rolls the row-normalised
maps out through the layers (no ``0.5 I``: the residual is already in them).
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from mechkit.core.types import Model
from mechkit.mixing.attention import roll_out, row_normalise
from mechkit.mixing.blocks import BlockRun, read_blocks, value_outputs
from mechkit.mixing.registry import LayerMaps, MixingRun, register

__all__ = ["next_norm", "norm_scale", "residual_norms"]


def next_norm(model: Model, layer: int) -> Any:
    """The norm that reads the residual stream after block ``layer``'s attention: its ``ln2``,
    or (attention-only or parallel blocks) the next block's ``ln1`` or ``ln_final``.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> next_norm(model, 1) is model.ln_final
        True
    """
    if not model.cfg.attn_only and not model.cfg.parallel_attn_mlp:
        return model.blocks[layer].ln2
    return model.blocks[layer + 1].ln1 if layer + 1 < model.cfg.n_layers else model.ln_final


def norm_scale(model: Model, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... 1"]:
    """The scale a norm of the model's kind divides ``x`` by: the standard deviation
    (LayerNorm) or the root mean square (RMSNorm), with ``cfg.eps``; ones without a norm.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> norm_scale(model, torch.tensor([1.0, 3.0])).round(decimals=3).tolist()
        [1.0]
    """
    kind = model.cfg.normalization_type
    if kind is None:
        return torch.ones_like(x[..., :1])
    if kind in ("LN", "LNPre"):
        x = x - x.mean(-1, keepdim=True)
    return (x.pow(2).mean(-1, keepdim=True) + model.cfg.eps).sqrt()


def _centre_weigh(model: Model, module: Any, x: Tensor) -> Tensor:
    if model.cfg.normalization_type in ("LN", "LNPre"):
        x = x - x.mean(-1, keepdim=True)
    w = getattr(module, "w", None)
    return x * w if w is not None else x


@torch.no_grad()
def residual_norms(model: Model, run: BlockRun, layer: int) -> Float[Tensor, "batch query key"]:
    """``N[i, j]`` of the module docstring for block ``layer``.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> residual_norms(model, read_blocks(model, torch.tensor([[1, 2, 3]])), 0).shape
        torch.Size([1, 3, 3])
    """
    pattern = run.pattern(layer)  # (batch, head, query, key)
    vo = value_outputs(model, run, layer)  # (batch, head, key, d_model)
    x = run.resid_pre(layer)  # (batch, pos, d_model)
    post_scale = None
    if getattr(model.cfg, "use_normalization_before_and_after", False):
        post = model.blocks[layer].ln1_post
        w_post = getattr(post, "w", None)
        vo = vo * w_post if w_post is not None else vo
        post_scale = run.cache[f"blocks.{layer}.ln1_post.hook_scale"]  # (batch, query, 1)
        pattern = pattern / post_scale[:, None]  # the frozen 1 / s_i of the post-norm
    module = next_norm(model, layer)
    g = _centre_weigh(model, module, vo)  # (batch, head, key, d_model)
    xs = _centre_weigh(model, module, x)  # (batch, pos, d_model)
    gram = torch.einsum("bhkm,bgkm->bkhg", g, g)  # (batch, key, head, head)
    squared = torch.einsum("bhqk,bgqk,bkhg->bqk", pattern, pattern, gram)
    diagonal = torch.einsum("bhq,bhqm->bqm", pattern.diagonal(dim1=-2, dim2=-1), g) + xs
    n = squared.clamp_min(0).sqrt()
    eye = torch.eye(n.shape[-1], dtype=torch.bool, device=n.device)
    n = torch.where(eye, diagonal.norm(dim=-1)[:, :, None], n)
    resid_mid = x + run.attn_out(layer)
    return n / norm_scale(model, resid_mid)


def _local_maps(model: Model, run: MixingRun) -> Tensor:
    blocks = read_blocks(model, run.tokens)
    return torch.stack(
        [residual_norms(model, blocks, layer) for layer in range(model.cfg.n_layers)]
    )


@register("attention_norm")
@torch.no_grad()
def attention_norm(model: Model, run: MixingRun) -> LayerMaps:
    """``||w * P(f_i(x_j) + [i = j] x_i)|| / s_i`` per layer (Kobayashi et al. 2020, 2021)."""
    maps = _local_maps(model, run)
    return LayerMaps(
        maps=maps,
        aggregated=row_normalise(maps).mean(0),
        aggregation="mean over layers of the row-normalised maps",
        cumulative=False,
        layers=tuple(range(model.cfg.n_layers)),
    )


@register("globenc")
@torch.no_grad()
def globenc(model: Model, run: MixingRun) -> LayerMaps:
    """GlobEnc: the row-normalised attention-norm maps rolled out through the layers."""
    rolled = roll_out(row_normalise(_local_maps(model, run)))
    return LayerMaps(
        maps=rolled,
        aggregated=rolled[-1],
        aggregation="rollout through every layer",
        cumulative=True,
        layers=tuple(range(model.cfg.n_layers)),
    )
