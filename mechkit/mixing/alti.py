"""ALTI (Ferrando et al. 2022, "Measuring the Mixing of Contextual Information in the
Transformer", EMNLP) and ALTI-Logit (Ferrando et al. 2023, "Explaining How Transformers Use
Context to Build Predictions", ACL).

ALTI: block ``l``'s attention sublayer leaves ``y_i = sum_j T_i(x_j) + b_O`` with
``T_i(x_j) = f_i(x_j) + [i = j] x_i`` (the residual), each ``f_i(x_j)`` exact as shown in
:mod:`mechkit.mixing.blocks` (norm, rotary, grouped-query attention included). Token ``j``'s
contribution to ``y_i`` is by how much it is closer to ``y_i`` than nothing is, in the L1
(Manhattan) distance the paper uses::

    c[i, j] = max(0, ||y_i||_1 - ||y_i - T_i(x_j)||_1),   then each row divided by its sum.

Rows are non-negative and sum to 1 by construction. In a pre-norm decoder the representation
between blocks is the residual stream itself, so the distance is taken there; the MLPs act on
each position alone and count as no mixing. The per-layer maps are rolled out through the
layers (``maps[l]`` covers blocks ``0..l``).

ALTI-Logit: the target logit (difference) read at position ``i`` through the final norm with its
scale frozen at the run's value (``u~ = P(w_f * u)``, as in direct logit attribution) is split
into what each attention sublayer wrote from each source ``k`` (``f_i^l(x_k) . u~ / s_i``), what
each MLP wrote at ``i``, and the embedding at ``i``; each part is then carried back to the input
tokens by ALTI's rolled-out contributions of the layer it read (``R^{l-1}[k, :]`` for attention
from ``k``, ``R^l[i, :]`` for the MLP, the identity for the embedding). ``maps[l]`` is layer
``l``'s part, ``logit`` their sum with the embedding's; ``logit_rest`` holds the attention
output biases and the unembedding and final-norm biases, so ``logit.sum(-1) + logit_rest`` is
the model's logit (difference) at every position (tested).
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from mechkit.core.progress import progress_bar
from mechkit.core.types import Model
from mechkit.mixing.attention import roll_out
from mechkit.mixing.blocks import (
    BlockRun,
    post_scale,
    read_blocks,
    transformed_vectors,
    value_outputs,
)
from mechkit.mixing.registry import LayerMaps, MixingRun, register

__all__ = ["alti_contributions", "logit_direction"]

CHUNK = 32
"""Queries per chunk: small enough that each chunk's keys stop near its queries (about half the
work of the full square), large enough to keep the products efficient."""


@torch.no_grad()
def alti_contributions(
    model: Model, run: BlockRun, layer: int, memory_budget: int = 2 * 1024**3
) -> Float[Tensor, "batch query key"]:
    """Block ``layer``'s ALTI contributions ``c[i, j]`` (rows sum to 1), in chunks of queries
    that keep the ``(batch, query, key, d_model)`` vectors under ``memory_budget`` bytes.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> c = alti_contributions(model, read_blocks(model, torch.tensor([[1, 2, 3]])), 0)
        >>> c.shape, [round(float(s), 4) for s in c[0].sum(-1)]
        (torch.Size([1, 3, 3]), [1.0, 1.0, 1.0])
    """
    x = run.resid_pre(layer)  # (batch, pos, d_model)
    y = x + run.attn_out(layer)  # resid_mid
    n_batch, n_pos, d_model = x.shape
    per_query = max(1, n_batch * n_pos * d_model * x.element_size() * 3)
    step = max(1, min(n_pos, CHUNK, memory_budget // per_query))
    out = torch.zeros(n_batch, n_pos, n_pos, device=x.device)
    vo = value_outputs(model, run, layer)  # (batch, head, key, d_model), once per layer
    for start in range(0, n_pos, step):
        rows = slice(start, min(n_pos, start + step))
        keys = rows.stop  # keys after the chunk's last query get nothing (causal)
        t = transformed_vectors(model, run, layer, rows, keys, vo)  # (batch, query, key, d)
        index = torch.arange(rows.start, rows.stop, device=x.device)
        t[:, index - start, index] += x[:, index]  # the residual: T_i(x_i) gets x_i
        target = y[:, rows, None, :]  # (batch, query, 1, d_model)
        distance = (target - t).abs().sum(-1)  # (batch, query, key)
        c = (target.abs().sum(-1) - distance).clamp_min(0)
        causal = index[:, None] >= torch.arange(keys, device=x.device)[None]  # keys <= query
        out[:, rows, :keys] = c * causal
    total = out.sum(-1, keepdim=True)
    return torch.where(total > 0, out / total.clamp_min(1e-30), out)


def _alti_layers(model: Model, blocks: BlockRun, budget: int, progress: bool) -> Tensor:
    maps = []
    with progress_bar(model.cfg.n_layers, "ALTI", enabled=progress, unit="layer") as bar:
        for layer in range(model.cfg.n_layers):
            maps.append(alti_contributions(model, blocks, layer, budget))
            bar.update(1)
    return torch.stack(maps)


@register("alti")
@torch.no_grad()
def alti(model: Model, run: MixingRun) -> LayerMaps:
    """ALTI: per-layer L1-distance contributions, rolled out through the layers."""
    blocks = read_blocks(model, run.tokens)
    rolled = roll_out(_alti_layers(model, blocks, run.memory_budget, run.progress))
    return LayerMaps(
        maps=rolled,
        aggregated=rolled[-1],
        aggregation="rollout through every layer",
        cumulative=True,
        layers=tuple(range(model.cfg.n_layers)),
    )


def logit_direction(
    model: Model, run: MixingRun, logits: Tensor
) -> tuple[Float[Tensor, "batch d_model"], Float[Tensor, " batch"], Float[Tensor, " batch"]]:
    """``(u~, u . b_f, bias)``: the residual direction of the target through the final norm
    (centred and weighted, not yet divided by the scale), the final norm's bias term, and the
    unembedding bias of the target. The answer defaults to the model's top prediction at each
    prompt's last real token.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> run = MixingRun(tokens=torch.tensor([[1, 2]]), mask=torch.ones(1, 2, dtype=torch.bool),
        ...                 answer=torch.tensor([5]))
        >>> logit_direction(model, run, model(run.tokens))[0].shape          # (batch, d_model)
        torch.Size([1, 128])
    """
    answer = run.answer
    if answer is None:
        last = run.mask.sum(-1) - 1
        answer = logits[torch.arange(logits.shape[0]), last].argmax(-1)
    u = model.W_U[:, answer].T  # (batch, d_model)
    bias = model.b_U[answer]
    if run.wrong is not None:
        u = u - model.W_U[:, run.wrong].T
        bias = bias - model.b_U[run.wrong]
    w = getattr(model.ln_final, "w", None)
    u_norm = u * w if w is not None else u
    if model.cfg.normalization_type in ("LN", "LNPre"):
        u_norm = u_norm - u_norm.mean(-1, keepdim=True)
    b = getattr(model.ln_final, "b", None)
    final_bias = (u * b).sum(-1) if b is not None else torch.zeros_like(bias)
    return u_norm, final_bias, bias


@register("alti_logit")
@torch.no_grad()
def alti_logit(model: Model, run: MixingRun) -> LayerMaps:
    """ALTI-Logit: each input token's part of the target logit at every position."""
    blocks = read_blocks(
        model,
        run.tokens,
        extra=tuple(f"blocks.{layer}.hook_mlp_out" for layer in range(model.cfg.n_layers)),
    )
    n_layers = model.cfg.n_layers
    rolled = roll_out(
        _alti_layers(model, blocks, run.memory_budget, run.progress)
    )  # (layer, b, q, k)
    u, final_bias, bias = logit_direction(model, run, blocks.logits)
    if model.cfg.normalization_type is None:
        scale = torch.ones_like(run.tokens[..., None], dtype=u.dtype)
    else:
        scale = blocks.cache["ln_final.hook_scale"]  # (batch, pos, 1)
    inv = 1.0 / scale[..., 0]  # (batch, pos)
    n_batch, n_pos = run.tokens.shape
    eye = torch.eye(n_pos, device=u.device).expand(n_batch, n_pos, n_pos)
    maps = []
    rest = final_bias[:, None] + bias[:, None] + torch.zeros(n_batch, n_pos, device=u.device)
    for layer in range(n_layers):
        before = rolled[layer - 1] if layer > 0 else eye  # contributions to the layer's input
        pattern = blocks.pattern(layer)  # (batch, head, query, key)
        v = blocks.cache[f"blocks.{layer}.attn.hook_v"]
        if v.shape[2] != model.cfg.n_heads:
            v = v.repeat_interleave(model.cfg.n_heads // v.shape[2], dim=2)
        w_o_u = torch.einsum("hdm,bm->bhd", model.blocks[layer].attn.W_O, u)  # (b, head, d_head)
        read = torch.einsum("bkhd,bhd->bhk", v, w_o_u)  # (batch, head, key): f's readout
        post = post_scale(model, blocks, layer)
        if post is not None:  # the post-norm's weight sits between W_O and u: read it exactly
            f = transformed_vectors(model, blocks, layer)  # (batch, query, key, d_model)
            direct = torch.einsum("bqkm,bm->bqk", f, u)
            b_o = (model.blocks[layer].attn.b_O * post * u[:, None]).sum(-1)  # (batch, query)
        else:
            direct = torch.einsum("bhqk,bhk->bqk", pattern, read)
            b_o = (model.blocks[layer].attn.b_O * u).sum(-1)[:, None].expand(n_batch, n_pos)
        part = (direct * inv[..., None]) @ before  # (batch, query, key)
        rest = rest + b_o * inv
        if not model.cfg.attn_only:
            mlp = (blocks.cache[f"blocks.{layer}.hook_mlp_out"] * u[:, None]).sum(-1) * inv
            part = part + mlp[..., None] * rolled[layer]
        maps.append(part)
    embed = blocks.resid_pre(0)  # what the embeddings put in the stream, however made
    embedding = (embed * u[:, None]).sum(-1) * inv  # (batch, pos): stays with its own token
    stacked = torch.stack(maps)
    total = stacked.sum(0) + torch.diag_embed(embedding)
    return LayerMaps(
        maps=stacked,
        aggregated=total,
        aggregation="sum over layers, with the embeddings",
        cumulative=False,
        layers=tuple(range(n_layers)),
        logit=total,
        logit_rest=rest,
    )
