"""DecompX (Modarressi et al. 2023, "DecompX: Explaining Transformers Decisions by Propagating
Token Decomposition", ACL): the residual stream split into one vector per input token, carried
through every block, MLPs included, to the prediction.

At every position ``i`` the residual stream is kept as ``x_i = sum_j x_i[j] + b_i``: a part per
input token ``j`` and a part no token owns (the biases). It starts as the embedding at ``j = i``.
Each operation is applied to the parts exactly, so the parts always sum to the real stream:

- a norm (LayerNorm or RMSNorm) is linear once its scale is frozen at the run's value for the
  position: ``P(x_i[j]) / s_i * w`` (``P``: centring, LayerNorm only); its bias goes to ``b``;
- attention: ``sum_h sum_k A[h, i, k] (norm(x_k)[j] W_V[h]) W_O[h]``; rotary embeddings touch
  only ``A``, grouped-query heads share ``W_V``; value and output biases go to ``b``; Gemma's
  post-attention norm is linear with its frozen scale;
- a gated MLP ``act(x W_gate) * (x W_in)``: the gate ``act(x_i W_gate)`` is held at the run's
  value (a fixed multiplier per neuron), and the rest is linear in ``x``; a plain MLP
  ``act(x W_in + b_in)``: each neuron's activation is split in proportion to its input,
  ``act(z) / z`` (the paper's choice), so the parts still sum to ``act(z)``;
- the final norm and the unembedding give each part's share of the target logit.

``maps[l][i, j]`` is ``||x_i[j]||`` after block ``l``, each row divided by its sum (cumulative:
the representation after ``l`` blocks); ``logit[i, j]`` is token ``j``'s share of the target
logit (difference) at ``i`` and ``logit_rest`` the biases' share, so they sum to the model's logit
(tested). The cost is ``pos^2 x d_model x (d_model + 2 d_mlp)`` per layer: fine for the short
prompts of the paper, minutes for hundreds of tokens on a CPU.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mechkit.core.progress import progress_bar
from mechkit.core.types import Model
from mechkit.errors import UnsupportedModelError
from mechkit.mixing.attention import row_normalise
from mechkit.mixing.blocks import read_blocks
from mechkit.mixing.registry import LayerMaps, MixingRun, register

__all__ = ["split_norm"]


def split_norm(
    model: Model, module: Any, parts: Tensor, bias: Tensor, scale: Tensor | None
) -> tuple[Tensor, Tensor]:
    """A norm applied to ``(batch, pos, token, d_model)`` parts and a ``(batch, pos, d_model)``
    bias part, its scale ``(batch, pos, 1)`` frozen; the norm's own bias joins the bias part.

    Example:
        >>> model = mk.load_model("attn-only-2l")             # LNPre: centre, divide
        >>> parts, bias = split_norm(model, model.ln_final, torch.ones(1, 1, 2, 2) * 2,
        ...                          torch.tensor([[[1.0, 3.0]]]), torch.tensor([[[2.0]]]))
        >>> parts.tolist(), bias.tolist()
        ([[[[0.0, 0.0], [0.0, 0.0]]]], [[[-0.5, 0.5]]])
    """
    if model.cfg.normalization_type is None:
        return parts, bias
    centre = model.cfg.normalization_type in ("LN", "LNPre")
    if centre:
        parts = parts - parts.mean(-1, keepdim=True)
        bias = bias - bias.mean(-1, keepdim=True)
    if scale is not None:
        parts = parts / scale[:, :, None]
        bias = bias / scale
    w = getattr(module, "w", None)
    if w is not None:
        parts, bias = parts * w, bias * w
    b = getattr(module, "b", None)
    return parts, (bias + b if b is not None else bias)


def _scale(cache: dict[str, Tensor], name: str) -> Tensor | None:
    return cache.get(name)


@register("decompx")
@torch.no_grad()
def decompx(model: Model, run: MixingRun) -> LayerMaps:
    """DecompX: the token decomposition carried through attention and MLPs to the logit."""
    cfg = model.cfg
    if cfg.parallel_attn_mlp or cfg.act_fn in ("solu_ln",) or "ln" in str(cfg.act_fn):
        raise UnsupportedModelError(
            f"Expected sequential blocks with an elementwise MLP activation for DecompX; this "
            f"model has parallel_attn_mlp={cfg.parallel_attn_mlp}, act_fn={cfg.act_fn!r} (a "
            "norm inside the MLP is not linear in its parts). Hint: method='alti'."
        )
    extra = []
    for layer in range(cfg.n_layers):
        extra += [f"blocks.{layer}.ln1.hook_scale", f"blocks.{layer}.ln2.hook_scale"]
        extra += [f"blocks.{layer}.mlp.hook_pre", f"blocks.{layer}.mlp.hook_post"]
        extra += [f"blocks.{layer}.ln2_post.hook_scale", f"blocks.{layer}.hook_resid_mid"]
    blocks = read_blocks(model, run.tokens, extra=tuple(extra))
    cache = blocks.cache
    n_batch, n_pos = run.tokens.shape
    embed = blocks.resid_pre(0)  # the embeddings as they enter block 0 (scaled, positions)
    index = torch.arange(n_pos, device=embed.device)
    parts = torch.zeros(n_batch, n_pos, n_pos, cfg.d_model, device=embed.device)
    parts[:, index, index] = embed  # (batch, pos, token, d_model)
    bias = torch.zeros_like(embed)  # (batch, pos, d_model)
    maps = []
    both = cfg.use_normalization_before_and_after
    bar = progress_bar(cfg.n_layers, "DecompX", enabled=run.progress, unit="layer")
    for layer in range(cfg.n_layers):
        block = model.blocks[layer]
        attn = block.attn
        # attention: values of each part, mixed by the run's pattern
        xn, bn = split_norm(
            model, block.ln1, parts, bias, _scale(cache, f"blocks.{layer}.ln1.hook_scale")
        )
        w_v: Tensor = getattr(attn, "_W_V", attn.W_V)  # (kv_head, d_model, d_head)
        v = torch.einsum("bkjm,hmd->bhkjd", xn, w_v)  # (batch, kv_head, key, token, d_head)
        b_v: Tensor = getattr(attn, "_b_V", attn.b_V)  # (kv_head, d_head)
        vb = torch.einsum("bkm,hmd->bhkd", bn, w_v) + b_v[None, :, None]
        repeat = cfg.n_heads // v.shape[1]
        pattern = blocks.pattern(layer)  # (batch, head, query, key)
        out = torch.zeros_like(parts)
        out_b = attn.b_O.expand_as(bias).clone()
        for h in range(cfg.n_heads):
            z = torch.einsum("bqk,bkjd->bqjd", pattern[:, h], v[:, h // repeat])
            out += z @ attn.W_O[h]  # (batch, query, token, d_model)
            out_b += (pattern[:, h] @ vb[:, h // repeat]) @ attn.W_O[h]
        if both:
            s = cache[f"blocks.{layer}.ln1_post.hook_scale"]  # (batch, query, 1)
            w = getattr(block.ln1_post, "w", None)
            out, out_b = out / s[:, :, None], out_b / s
            if w is not None:
                out, out_b = out * w, out_b * w
        parts = parts + out
        bias = bias + out_b
        if not cfg.attn_only:
            xn, bn = split_norm(
                model, block.ln2, parts, bias, _scale(cache, f"blocks.{layer}.ln2.hook_scale")
            )
            mlp: Any = block.mlp
            pre = cache[f"blocks.{layer}.mlp.hook_pre"]  # (batch, pos, d_mlp)
            if cfg.gated_mlp:
                gate = mlp.act_fn(pre)  # held fixed
                post = gate[:, :, None] * (xn @ mlp.W_in)  # (batch, pos, token, d_mlp)
                post_b = gate * (bn @ mlp.W_in) + mlp.b_in
            else:
                act = cache[f"blocks.{layer}.mlp.hook_post"]
                slope = torch.where(pre != 0, act / torch.where(pre != 0, pre, 1.0), 0.0)
                post = slope[:, :, None] * (xn @ mlp.W_in)
                post_b = slope * (bn @ mlp.W_in + mlp.b_in)
            out, out_b = post @ mlp.W_out, post_b @ mlp.W_out + mlp.b_out
            if both:
                s = cache[f"blocks.{layer}.ln2_post.hook_scale"]
                w = getattr(block.ln2_post, "w", None)
                out, out_b = out / s[:, :, None], out_b / s
                if w is not None:
                    out, out_b = out * w, out_b * w
            parts = parts + out
            bias = bias + out_b
        maps.append(row_normalise(parts.norm(dim=-1)))
        bar.update(1)
    bar.close()
    u, unembed_bias = _unembed(model, run, blocks.logits)  # (batch, d_model), (batch,)
    final, final_b = split_norm(
        model, model.ln_final, parts, bias, cache.get("ln_final.hook_scale")
    )
    logit = torch.einsum("bqjm,bm->bqj", final, u)  # each token's share at each position
    rest = torch.einsum("bqm,bm->bq", final_b, u) + unembed_bias[:, None]
    stacked = torch.stack(maps)
    return LayerMaps(
        maps=stacked,
        aggregated=stacked[-1],
        aggregation="the decomposition after the last block",
        cumulative=True,
        layers=tuple(range(cfg.n_layers)),
        logit=logit,
        logit_rest=rest,
    )


def _unembed(model: Model, run: MixingRun, logits: Tensor) -> tuple[Tensor, Tensor]:
    """The target's unembedding direction ``(batch, d_model)`` and bias ``(batch,)``; the answer
    defaults to the top prediction at each prompt's last real token."""
    answer = run.answer
    if answer is None:
        last = run.mask.sum(-1) - 1
        answer = logits[torch.arange(logits.shape[0]), last].argmax(-1)
    u, b = model.W_U[:, answer].T, model.b_U[answer]
    if run.wrong is not None:
        u, b = u - model.W_U[:, run.wrong].T, b - model.b_U[run.wrong]
    return u, b
