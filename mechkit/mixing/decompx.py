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
(tested).

Cost. Only the parts ``j <= i`` exist (causal attention), so they are kept packed, one row per
pair, ``pos (pos + 1) / 2`` rows: every projection and the MLP are single matrix products on
those rows (the MLP's hidden layer in chunks within ``memory_budget``), and attention mixes
them with one product per key/value head. The MLP dominates: ``pos^2 x d_model x d_mlp`` per
layer, about a minute for 256 tokens on SmolLM2 on one CPU thread; the per-layer maps need it.

``"decompx_logit"``: the logit shares alone, in seconds. With its scales, patterns and gates
frozen, the model is an affine map of the embeddings ``E`` (the one DecompX propagates), so a
logit is ``sum_j J_ij e_j + c_i`` and token ``j``'s share ``J_ij e_j`` is the gradient of the
frozen logit at ``i`` with respect to ``e_j``, times ``e_j``: one backward pass per query (the
real blocks with the freezing hooks of :func:`frozen_hooks`), all tokens at once. The affine
rest ``c_i`` is the biases' part. Computed for the ``positions`` asked only (``positions=-1``:
the prediction); tested equal to the propagated decomposition.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mechkit.core.batching import each_batch
from mechkit.core.progress import progress_bar
from mechkit.core.types import Model
from mechkit.errors import UnsupportedModelError
from mechkit.hook_scope import hook_scope, run_with_cache
from mechkit.mixing.attention import row_normalise
from mechkit.mixing.blocks import frozen_norm, read_blocks
from mechkit.mixing.registry import LayerMaps, MixingRun, register

__all__ = ["split_norm", "check_decompx", "frozen_hooks", "adjoint_copies"]


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
    parts = frozen_norm(model, module, parts, None if scale is None else scale[:, :, None])
    bias = frozen_norm(model, module, bias, scale)
    b = getattr(module, "b", None)
    return parts, (bias + b if b is not None else bias)


@register("decompx")
@torch.no_grad()
def decompx(model: Model, run: MixingRun) -> LayerMaps:
    """DecompX: the token decomposition carried through attention and MLPs to the logit."""
    cfg = model.cfg
    check_decompx(model)
    extra = []
    for layer in range(cfg.n_layers):
        extra += [f"blocks.{layer}.ln1.hook_scale", f"blocks.{layer}.ln2.hook_scale"]
        extra += [f"blocks.{layer}.mlp.hook_pre", f"blocks.{layer}.mlp.hook_post"]
        extra += [f"blocks.{layer}.ln2_post.hook_scale"]
    blocks = read_blocks(model, run.tokens, extra=tuple(extra))
    cache = blocks.cache
    n_batch, n_pos = run.tokens.shape
    embed = blocks.resid_pre(0)  # the embeddings as they enter block 0 (scaled, positions)
    device = embed.device
    # the parts are packed: row r is token tok[r]'s part at position pos[r], tok[r] <= pos[r]
    pos, tok = torch.ones(n_pos, n_pos, dtype=torch.bool, device=device).tril().nonzero().T
    parts = torch.where((pos == tok)[None, :, None], embed[:, pos], 0.0)  # (batch, row, d)
    bias = torch.zeros_like(embed)  # (batch, pos, d_model)
    rows = _rows_per_chunk(model, n_batch, run.memory_budget)
    maps = []
    bar = progress_bar(cfg.n_layers, "DecompX", enabled=run.progress, unit="layer")
    for layer in range(cfg.n_layers):
        block = model.blocks[layer]
        xn, bn = _packed_norm(model, block.ln1, parts, bias, cache, f"blocks.{layer}.ln1", pos)
        out, out_b = _attention(model, blocks, layer, xn, bn, pos, tok)
        out, out_b = _post_norm(model, block, "ln1_post", cache, layer, out, out_b, pos)
        parts, bias = parts + out, bias + out_b
        if not cfg.attn_only:
            xn, bn = _packed_norm(model, block.ln2, parts, bias, cache, f"blocks.{layer}.ln2", pos)
            out, out_b = _mlp(model, cache, layer, xn, bn, pos, rows)
            out, out_b = _post_norm(model, block, "ln2_post", cache, layer, out, out_b, pos)
            parts, bias = parts + out, bias + out_b
        norms = torch.zeros(n_batch, n_pos, n_pos, device=device)
        norms[:, pos, tok] = parts.norm(dim=-1)
        maps.append(row_normalise(norms))
        bar.update(1)
    bar.close()
    u, unembed_bias = _unembed(model, run, blocks.logits)  # (batch, d_model), (batch,)
    final, final_b = _packed_norm(model, model.ln_final, parts, bias, cache, "ln_final", pos)
    logit = torch.zeros(n_batch, n_pos, n_pos, device=device)
    logit[:, pos, tok] = torch.einsum("brm,bm->br", final, u)  # each token's share
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


def check_decompx(model: Model) -> None:
    """Refuse what DecompX cannot split exactly: parallel blocks or a norm inside the MLP.

    Example:
        >>> check_decompx(mk.load_model("attn-only-2l"))     # fine: returns None
    """
    cfg = model.cfg
    if cfg.parallel_attn_mlp or cfg.act_fn in ("solu_ln",) or "ln" in str(cfg.act_fn):
        raise UnsupportedModelError(
            f"Expected sequential blocks with an elementwise MLP activation for DecompX; this "
            f"model has parallel_attn_mlp={cfg.parallel_attn_mlp}, act_fn={cfg.act_fn!r} (a "
            "norm inside the MLP is not linear in its parts). Hint: method='alti'."
        )


def _rows_per_chunk(model: Model, n_batch: int, budget: int) -> int:
    """Packed rows one MLP chunk takes within ``budget`` bytes (its hidden layer, float32)."""
    per_row = n_batch * (model.cfg.d_mlp or model.cfg.d_model) * 4 * 3
    return max(1, min(8192, budget // per_row))


def _packed_norm(
    model: Model,
    module: Any,
    parts: Tensor,
    bias: Tensor,
    cache: dict[str, Tensor],
    name: str,
    pos: Tensor,
) -> tuple[Tensor, Tensor]:
    """:func:`split_norm` on packed ``(batch, row, d_model)`` parts (row ``r`` at ``pos[r]``)."""
    if model.cfg.normalization_type is None:
        return parts, bias
    scale = cache.get(f"{name}.hook_scale")  # (batch, pos, 1)
    parts = frozen_norm(model, module, parts, None if scale is None else scale[:, pos])
    bias = frozen_norm(model, module, bias, scale)
    b = getattr(module, "b", None)
    return parts, (bias + b if b is not None else bias)


def _attention(
    model: Model, blocks: Any, layer: int, xn: Tensor, bn: Tensor, pos: Tensor, tok: Tensor
) -> tuple[Tensor, Tensor]:
    """Block ``layer``'s attention on packed parts: values of each part, mixed over keys by
    the run's pattern (one matrix product per key/value head), then ``W_O``."""
    cfg = model.cfg
    attn = model.blocks[layer].attn
    w_v: Tensor = getattr(attn, "_W_V", attn.W_V)  # (kv_head, d_model, d_head)
    b_v: Tensor = getattr(attn, "_b_V", attn.b_V)  # (kv_head, d_head)
    n_kv, _, d_head = w_v.shape
    n_batch, n_pos = bn.shape[:2]
    repeat = cfg.n_heads // n_kv
    pattern = blocks.pattern(layer)  # (batch, head, query, key)
    v_parts = xn @ w_v.permute(1, 0, 2).reshape(cfg.d_model, n_kv * d_head)  # (b, row, kv*dh)
    dense = torch.zeros(n_batch, n_pos, n_pos, n_kv, d_head, device=xn.device)  # (b,key,tok,..)
    dense[:, pos, tok] = v_parts.view(n_batch, -1, n_kv, d_head)
    vb = torch.einsum("bkm,hmd->bhkd", bn, w_v) + b_v[None, :, None]  # (b, kv, key, d_head)
    z_rows = []
    z_bias = []
    for g in range(n_kv):
        a = pattern[:, g * repeat : (g + 1) * repeat]  # (batch, repeat, query, key)
        mixed = a.reshape(n_batch, repeat * n_pos, n_pos) @ dense[..., g, :].reshape(
            n_batch, n_pos, n_pos * d_head
        )  # (batch, repeat * query, token * d_head)
        mixed = mixed.view(n_batch, repeat, n_pos, n_pos, d_head)[:, :, pos, tok]
        z_rows.append(mixed)  # (batch, repeat, row, d_head)
        z_bias.append(a @ vb[:, g, None])  # (batch, repeat, query, d_head)
    w_o = attn.W_O.reshape(cfg.n_heads * d_head, cfg.d_model)
    z = torch.cat(z_rows, dim=1).permute(0, 2, 1, 3).reshape(n_batch, -1, cfg.n_heads * d_head)
    zb = torch.cat(z_bias, dim=1).permute(0, 2, 1, 3).reshape(n_batch, n_pos, -1)
    return z @ w_o, zb @ w_o + attn.b_O


def _post_norm(
    model: Model,
    block: Any,
    name: str,
    cache: dict[str, Tensor],
    layer: int,
    out: Tensor,
    out_b: Tensor,
    pos: Tensor,
) -> tuple[Tensor, Tensor]:
    """Gemma's norm after a sublayer, linear with its scale frozen; nothing elsewhere."""
    if not model.cfg.use_normalization_before_and_after:
        return out, out_b
    s = cache[f"blocks.{layer}.{name}.hook_scale"]  # (batch, pos, 1)
    w = getattr(getattr(block, name), "w", None)
    out, out_b = out / s[:, pos], out_b / s
    if w is not None:
        out, out_b = out * w, out_b * w
    return out, out_b


def _mlp(
    model: Model,
    cache: dict[str, Tensor],
    layer: int,
    xn: Tensor,
    bn: Tensor,
    pos: Tensor,
    rows: int,
) -> tuple[Tensor, Tensor]:
    """The MLP on packed parts, its gate (gated) or its ``act(z) / z`` (plain) held at the
    run's value, ``rows`` parts at a time so the hidden layer stays within the budget."""
    mlp: Any = model.blocks[layer].mlp
    pre = cache[f"blocks.{layer}.mlp.hook_pre"]  # (batch, pos, d_mlp)
    if model.cfg.gated_mlp:
        gate = mlp.act_fn(pre)  # held fixed
        out_b = (gate * (bn @ mlp.W_in) + mlp.b_in) @ mlp.W_out + mlp.b_out
    else:
        act = cache[f"blocks.{layer}.mlp.hook_post"]
        gate = torch.where(pre != 0, act / torch.where(pre != 0, pre, 1.0), 0.0)
        out_b = (gate * (bn @ mlp.W_in + mlp.b_in)) @ mlp.W_out + mlp.b_out
    out = torch.empty_like(xn)
    for start in range(0, xn.shape[1], rows):
        chunk = slice(start, start + rows)
        hidden = xn[:, chunk] @ mlp.W_in  # (batch, rows, d_mlp)
        hidden *= gate[:, pos[chunk]]
        out[:, chunk] = hidden @ mlp.W_out
    return out, out_b


@register("decompx_logit")
def decompx_logit(model: Model, run: MixingRun) -> LayerMaps:
    """DecompX's logit shares alone, by one backward pass per query (see the module docstring).

    Only the query positions asked for (``positions=``) are computed; others stay zero."""
    check_decompx(model)
    n_batch, n_pos = run.tokens.shape
    with torch.no_grad():
        logits, cache = run_with_cache(model, run.tokens, names_filter="blocks.0.hook_resid_pre")
        u, unembed_bias = _unembed(model, run, logits)  # (batch, d_model), (batch,)
    embed = cache["blocks.0.hook_resid_pre"]  # (batch, pos, d_model)
    queries = run.queries if run.queries is not None else tuple(range(n_pos))
    pairs = [(b, q) for b in range(n_batch) for q in queries]
    logit = torch.zeros(n_batch, n_pos, n_pos, device=embed.device)
    rest = torch.zeros(n_batch, n_pos, device=embed.device)
    size = run.batch_size or adjoint_copies(model, max(queries) + 1, run.memory_budget)
    final_norm = getattr(model, "ln_final", None)
    bar = progress_bar(len(pairs), "DecompX (adjoint)", enabled=run.progress, unit="query")

    def work(chunk: slice) -> None:
        rows = torch.tensor([b for b, _ in pairs[chunk]], device=embed.device)
        at = torch.tensor([q for _, q in pairs[chunk]], device=embed.device)
        length = int(at.max()) + 1
        x = embed[rows, :length].clone().requires_grad_(True)  # (copy, pos, d_model)
        with torch.enable_grad(), hook_scope(model, fwd_hooks=frozen_hooks(model)):
            resid = model(x, start_at_layer=0, stop_at_layer=model.cfg.n_layers)
            final = final_norm(resid) if final_norm is not None else resid
            read = (final[torch.arange(len(at)), at] * u[rows]).sum(-1)  # (copy,)
            (grad,) = torch.autograd.grad(read.sum(), x)
        share = (grad * x.detach()).sum(-1)  # (copy, pos): token j's share, zero after the query
        share = share * (torch.arange(length, device=x.device)[None] <= at[:, None])
        logit[rows, at, :length] = share
        rest[rows, at] = read.detach() + unembed_bias[rows] - share.sum(-1)
        bar.update(len(at))

    each_batch(len(pairs), size, work)
    bar.close()
    return LayerMaps(
        maps=logit[None],
        aggregated=logit,
        aggregation="the prediction's decomposition after the last block",
        cumulative=True,
        layers=(model.cfg.n_layers - 1,),
        logit=logit,
        logit_rest=rest,
    )


def frozen_hooks(model: Model) -> list[tuple[Any, Any]]:
    """Forward hooks that make the model the linear map DecompX propagates: every norm's scale,
    every attention pattern and every MLP gate (gated) or ``act(z) / z`` (plain) held at the
    pass's own value (detached), so the gradient of a logit with respect to the embeddings is
    exactly the frozen map's adjoint. Use inside :func:`~mechkit.hook_scope.hook_scope`.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> len(frozen_hooks(model))              # scales and patterns (no MLP)
        1
    """

    def detach(x: Tensor, hook: Any) -> Tensor:
        return x.detach()

    def fixed(name: str) -> bool:
        return name.endswith(("hook_scale", "attn.hook_pattern")) or (
            gated and name.endswith("mlp.hook_pre")
        )

    gated = bool(model.cfg.gated_mlp)
    hooks: list[tuple[Any, Any]] = [(fixed, detach)]
    if model.cfg.attn_only or gated:
        return hooks
    live: dict[str, Tensor] = {}

    def keep(pre: Tensor, hook: Any) -> None:
        live[hook.name] = pre

    def slope(act: Tensor, hook: Any) -> Tensor:
        pre = live.pop(hook.name.replace("hook_post", "hook_pre"))
        ratio = torch.where(pre != 0, act / torch.where(pre != 0, pre, 1.0), 0.0)
        return ratio.detach() * pre

    hooks.append((lambda name: name.endswith("mlp.hook_pre"), keep))
    hooks.append((lambda name: name.endswith("mlp.hook_post"), slope))
    return hooks


def adjoint_copies(model: Model, n_pos: int, budget: int) -> int:
    """How many queries one adjoint pass takes within ``budget`` bytes: each is a copy of the
    input whose activations the backward pass keeps (patterns, MLP and residual widths).

    Example:
        >>> adjoint_copies(mk.load_model("attn-only-2l"), 10, 2**24)
        56
    """
    cfg = model.cfg
    width = cfg.n_heads * n_pos * 3 + 4 * (cfg.d_mlp or 0) + 12 * cfg.d_model
    per_copy = cfg.n_layers * n_pos * width * 4
    return max(1, budget // max(1, per_copy))


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
