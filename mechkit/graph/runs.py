"""Forward and backward passes over the graph: sender outputs, receiver gradients, and runs in
which chosen edges carry ablated values.

All of it goes through TransformerLens hooks inside :func:`graph_mode`, which turns on the
model's per-head query/key/value inputs (``use_split_qkv_input``) and the MLP input hook for the
duration of the run and restores the configuration afterwards, also after an exception.

Sender outputs are stacked as ``(batch, pos, sender, d_model)``: the input is the residual
entering block 0, a head's output is ``z[:, :, h] @ W_O[h]`` (the bias ``b_O`` is the same in
every run and belongs to no edge), an MLP's its ``hook_mlp_out``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mechkit.core.types import Model
from mechkit.graph.layout import GraphLayout
from mechkit.hook_scope import hook_scope, keep_hooks

__all__ = [
    "graph_mode",
    "sender_outputs",
    "receiver_gradients",
    "logits_at",
    "fused_qkv",
    "masked_logits",
    "receiver_hook_names",
]


@contextlib.contextmanager
def graph_mode(model: Model, *, split_qkv: bool = True) -> Iterator[None]:
    """Per-head q/k/v inputs (unless ``split_qkv`` is False) and the MLP input hook on, for the
    block; the config and the hooks restored on leaving it, also after an interrupt.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> with graph_mode(model):
        ...     inside = model.cfg.use_split_qkv_input
        >>> inside, model.cfg.use_split_qkv_input
        (True, False)
    """
    cfg = model.cfg
    old = (cfg.use_split_qkv_input, cfg.use_hook_mlp_in)

    def put_back() -> None:
        model.set_use_split_qkv_input(old[0])
        if not cfg.attn_only:
            model.set_use_hook_mlp_in(old[1])

    with keep_hooks(model, on_exit=put_back):
        model.set_use_split_qkv_input(split_qkv)
        if not cfg.attn_only:
            model.set_use_hook_mlp_in(True)
        yield


def _sender_hooks(
    model: Model, layout: GraphLayout, store: Callable[[int, int, Tensor], None]
) -> list[tuple[str, Callable]]:
    """Hooks that hand each sender block's outputs to ``store(first_index, count, values)``
    with values ``(batch, pos, count, d_model)``."""
    hooks: list[tuple[str, Callable]] = []

    def on_input(act: Tensor, hook: Any) -> None:
        store(0, 1, act[:, :, None])

    hooks.append(("blocks.0.hook_resid_pre", on_input))
    index = 1
    for layer in range(layout.n_layers):
        w_o = model.blocks[layer].attn.W_O  # (head, d_head, d_model)

        def on_z(z: Tensor, hook: Any, first: int = index, w_o: Tensor = w_o) -> None:
            # (batch, pos, head, d_head) x (head, d_head, d_model) -> (batch, pos, head, d_model)
            store(first, layout.n_heads, torch.einsum("bphd,hdm->bphm", z, w_o))

        hooks.append((f"blocks.{layer}.attn.hook_z", on_z))
        index += layout.n_heads
        if layout.has_mlp:

            def on_mlp(act: Tensor, hook: Any, first: int = index) -> None:
                store(first, 1, act[:, :, None])

            hooks.append((f"blocks.{layer}.hook_mlp_out", on_mlp))
            index += 1
    return hooks


def receiver_hook_names(layout: GraphLayout) -> list[tuple[str, int, int]]:
    """``(hook name, first receiver index, count)`` per receiver hook, in forward order.

    Example:
        >>> layout = GraphLayout.build(n_layers=1, n_heads=2, n_kv_heads=2, d_model=4,
        ...                            has_mlp=True)
        >>> receiver_hook_names(layout)[0], receiver_hook_names(layout)[-1]
        (('blocks.0.hook_q_input', 0, 2), ('blocks.0.hook_resid_post', 7, 1))
    """
    out = []
    index = 0
    for layer in range(layout.n_layers):
        out.append((f"blocks.{layer}.hook_q_input", index, layout.n_heads))
        index += layout.n_heads
        out.append((f"blocks.{layer}.hook_k_input", index, layout.n_kv_heads))
        index += layout.n_kv_heads
        out.append((f"blocks.{layer}.hook_v_input", index, layout.n_kv_heads))
        index += layout.n_kv_heads
        if layout.has_mlp:
            out.append((f"blocks.{layer}.hook_mlp_in", index, 1))
            index += 1
    out.append((f"blocks.{layout.n_layers - 1}.hook_resid_post", index, 1))
    return out


@torch.no_grad()
def sender_outputs(
    model: Model, layout: GraphLayout, tokens: Int[Tensor, "batch pos"]
) -> Float[Tensor, "batch pos sender d_model"]:
    """Every sender's output on ``tokens``: ``(batch, pos, sender, d_model)``.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> out = sender_outputs(model, GraphLayout.from_model(model), torch.tensor([[1, 2, 3]]))
        >>> tuple(out.shape)  # the input and 8 heads
        (1, 3, 9, 128)
    """
    n_batch, seq = tokens.shape
    out = torch.zeros(n_batch, seq, len(layout.senders), layout.d_model, device=tokens.device)

    def store(first: int, count: int, values: Tensor) -> None:
        out[:, :, first : first + count] = values.to(out.dtype)

    with graph_mode(model), hook_scope(model, fwd_hooks=_sender_hooks(model, layout, store)):
        model(tokens, stop_at_layer=layout.n_layers)
    return out


def receiver_gradients(
    model: Model,
    layout: GraphLayout,
    tokens: Int[Tensor, "batch pos"],
    value_of: Callable[[Tensor], Tensor],
    *,
    overrides: dict[str, Callable] | None = None,
    senders: bool = False,
    residual: Float[Tensor, "repeats_batch pos d_model"] | None = None,
    start_layer: int = 0,
    repeats: int = 1,
    positions: Int[Tensor, " repeats_batch"] | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """dM/d(input of every receiver) on ``tokens``: ``(batch, pos, receiver, d_model)``.

    Args:
        value_of: logits -> the scalar to differentiate (the mean metric).
        overrides: forward hooks ``{hook name: fn(act, hook) -> act}`` applied first (the
            interpolations of EAP-IG).
        senders: also return the sender outputs of this run.
        residual: start the run at block ``start_layer`` from this residual,
            ``(repeats * batch, pos, d_model)``, instead of embedding ``tokens``; receivers of
            earlier blocks get zero gradient. If it requires grad, its gradient is added to
            its ``.grad`` (the same backward pass).
        repeats: the run holds ``repeats`` stacked copies of the batch (the points of an
            integral, batched); the gradients returned are summed over the copies.
        positions: the one position each row's value reads, ``(repeats * batch,)``: the
            unembedding then runs at those positions only and ``value_of`` gets their logits,
            ``(repeats * batch, d_vocab)`` (for metrics that read one position per prompt; the
            unembedding of every position costs as much as several blocks).

    Returns:
        ``(gradients, metric value, sender outputs or None)``. Parameters get no ``.grad``.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> layout = GraphLayout.from_model(model)
        >>> grads, value, _ = receiver_gradients(model, layout, torch.tensor([[1, 2, 3]]),
        ...                                      lambda logits: logits[:, -1, 0].mean())
        >>> tuple(grads.shape)  # 24 head inputs and the logits
        (1, 3, 25, 128)
    """
    inputs: dict[int, Tensor] = {}
    names = receiver_hook_names(layout)
    n_batch, seq = tokens.shape
    fused = fused_qkv(model)
    sent = (
        torch.zeros(n_batch, seq, len(layout.senders), layout.d_model, device=tokens.device)
        if senders
        else None
    )

    def keep(first: int) -> Callable:
        def hook(act: Tensor, hook: Any) -> None:
            inputs[first] = act

        return hook

    def store(first: int, count: int, values: Tensor) -> None:
        assert sent is not None  # the sender hooks are added only when sent is
        sent[:, :, first : first + count] = values.detach().to(sent.dtype)

    def leaf(act: Tensor, hook: Any) -> Tensor:
        return act if act.requires_grad else act.detach().requires_grad_(True)

    def differentiable(fn: Callable) -> Callable:
        def hook(act: Tensor, hook: Any) -> Tensor:
            out = fn(act, hook)
            return out if out.requires_grad else out.detach().requires_grad_(True)

        return hook

    hooks = [("hook_embed", leaf)]
    hooks += [(name, differentiable(fn)) for name, fn in (overrides or {}).items()]
    if senders:
        hooks += _sender_hooks(model, layout, store)
    if fused:
        # q, k and v (one tensor each per layer, not one copy of the residual per head): their
        # gradients are carried back to the per-head inputs below (_qkv_input_gradients)
        resid: dict[int, Tensor] = {}
        wanted_names = []
        for name, first, count in names:
            if name.endswith(("hook_q_input", "hook_k_input", "hook_v_input")):
                layer = int(name.split(".")[1])
                name = f"blocks.{layer}.attn.hook_{name.split('.')[-1][5]}"
                if name.endswith("hook_q"):
                    hooks.append((f"blocks.{layer}.hook_resid_pre", _keep_into(resid, layer)))
            wanted_names.append((name, first, count))
        names = wanted_names
    hooks += [(name, keep(first)) for name, first, _ in names]
    with (
        torch.enable_grad(),
        graph_mode(model, split_qkv=not fused),
        hook_scope(model, fwd_hooks=hooks),
    ):
        stop = None if positions is None else layout.n_layers
        if residual is None:
            logits = model(tokens, stop_at_layer=stop)
        else:
            start = residual if residual.requires_grad else residual.detach().requires_grad_(True)
            logits = model(start, start_at_layer=start_layer, stop_at_layer=stop)
        if positions is not None:  # the final residual, (rows, pos, d_model)
            logits = logits_at(model, logits, positions)
        value = value_of(logits)
        fired = [(name, first, count) for name, first, count in names if first in inputs]
        wanted = [inputs[first] for _, first, _ in fired]
        if residual is not None and residual.requires_grad:
            wanted.append(residual)
        grads = list(torch.autograd.grad(value, wanted, allow_unused=True))
    if residual is not None and residual.requires_grad:
        extra = grads.pop()
        if extra is not None:
            residual.grad = extra if residual.grad is None else residual.grad + extra
    out = torch.zeros(n_batch, seq, len(layout.receivers), layout.d_model, device=tokens.device)
    for (name, first, count), grad in zip(fired, grads, strict=True):
        if grad is None:
            continue
        grad = grad.detach()
        if fused and name.split(".")[-1] in ("hook_q", "hook_k", "hook_v"):
            layer = int(name.split(".")[1])
            grad = _qkv_input_gradient(model, layer, name[-1], grad, resid[layer].detach())
        grad = grad if grad.ndim == 4 else grad[:, :, None]  # (repeats * batch, pos, count, d)
        out[:, :, first : first + count] = grad.reshape(repeats, n_batch, *grad.shape[1:]).sum(0)
    return out, value.detach(), sent


def _keep_into(store: dict[int, Tensor], key: int) -> Callable:
    def hook(act: Tensor, hook: Any) -> None:
        store[key] = act

    return hook


_NORMS = ("LayerNorm", "LayerNormPre", "RMSNorm", "RMSNormPre", "Identity")


def fused_qkv(model: Model) -> bool:
    """Whether receiver gradients can run without per-head copies of the residual (the
    q/k/v gradients carried back through ``W_Q``/``W_K``/``W_V`` and ``ln1`` by hand): true
    for the attention and norms TransformerLens models usually have.

    Example:
        >>> fused_qkv(mk.load_model("attn-only-2l"))
        True
    """
    cfg = model.cfg
    if cfg.use_attn_in or getattr(cfg, "ungroup_grouped_query_attention", False):
        return False
    if getattr(cfg, "load_in_4bit", False) or cfg.positional_embedding_type == "shortformer":
        return False
    return all(type(block.ln1).__name__ in _NORMS for block in model.blocks)


def _qkv_input_gradient(
    model: Model, layer: int, which: str, grad: Tensor, x: Tensor
) -> Float[Tensor, "batch pos head d_model"]:
    """The gradient at each head's q (k, v) input, the residual ``x`` entering ``ln1``, from
    the gradient at its q (k, v): ``J_ln1(x)^T (W[h] g_h)`` per head, as the per-head copies of
    ``use_split_qkv_input`` would get it."""
    attn = model.blocks[layer].attn
    weight = {"q": attn.W_Q, "k": getattr(attn, "_W_K", attn.W_K),
              "v": getattr(attn, "_W_V", attn.W_V)}[which]  # (head, d_model, d_head)  # fmt: skip
    # (batch, pos, head, d_head) x (head, d_model, d_head) -> (batch, pos, head, d_model)
    v = torch.einsum("bphe,hme->bphm", grad, weight.to(grad.dtype))
    norm = model.blocks[layer].ln1
    kind = type(norm).__name__
    if kind == "Identity":
        return v
    if kind in ("LayerNorm", "RMSNorm"):
        w = norm.w
        assert isinstance(w, Tensor)
        v = v * w.to(v.dtype)
    x = x.to(torch.float32)[:, :, None]  # (batch, pos, 1, d_model)
    v = v.to(torch.float32)
    if kind.startswith("LayerNorm"):
        x = x - x.mean(-1, keepdim=True)
    eps = norm.eps
    assert isinstance(eps, float)
    scale = (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    y = x / scale
    if kind.startswith("LayerNorm"):
        v = v - v.mean(-1, keepdim=True)
    return (v - y * (y * v).mean(-1, keepdim=True)) / scale


def logits_at(
    model: Model,
    residual: Float[Tensor, "batch pos d_model"],
    positions: Int[Tensor, " batch"],
) -> Float[Tensor, "batch d_vocab"]:
    """The logits of the final residual at one position per row, as the model's forward
    computes them (final norm, unembedding, soft cap) at every position.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> tokens = torch.tensor([[1, 2, 3], [4, 5, 6]])
        >>> residual = model(tokens, stop_at_layer=model.cfg.n_layers)
        >>> at = logits_at(model, residual, torch.tensor([2, 0]))
        >>> torch.allclose(at, model(tokens)[[0, 1], [2, 0]], atol=1e-5)
        True
    """
    rows = torch.arange(residual.shape[0], device=residual.device)
    picked = residual[rows, positions.to(residual.device)][:, None]  # (batch, 1, d_model)
    if model.cfg.normalization_type is not None:
        picked = model.ln_final(picked)
    # (batch, d_model) @ (d_model, d_vocab): not through the Unembed module, whose forward
    # copies W_U transposed on every call (as long as one pass of several blocks here)
    logits = torch.addmm(model.unembed.b_U, picked[:, 0], model.unembed.W_U)
    cap = getattr(model.cfg, "output_logits_soft_cap", None)
    if cap is not None and cap > 0:  # Gemma-style soft cap, as the forward applies it
        logits = cap * torch.tanh(logits / cap)
    return logits


@torch.no_grad()
def masked_logits(
    model: Model,
    layout: GraphLayout,
    tokens: Int[Tensor, "batch pos"],
    ablated: Float[Tensor, "batch_or_1 pos_or_1 sender d_model"],
    keep: Bool[Tensor, "circuit sender receiver"],
    read: Callable[[Tensor], Tensor],
) -> Tensor:
    """Runs in which every edge not kept carries the ablated sender value.

    Args:
        tokens: ``(batch, pos)``.
        ablated: the senders' ablated outputs, ``(batch or 1, pos, sender, d_model)``.
        keep: ``(circuit, sender, receiver)`` bool: True where the edge carries the run's own
            value, False where the receiver sees the ablated value instead.
        read: ``logits (circuit * batch, pos, d_vocab) -> values (circuit * batch, ...)``.

    Returns:
        ``read``'s values, ``(circuit, batch, ...)``.

    Each receiver's input becomes ``input + sum over dropped edges (ablated_u - current_u)``
    where ``current_u`` is the sender's output in this same run (so a sender downstream of a
    dropped edge passes on its changed value, as in a real circuit run).

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> layout, tokens = GraphLayout.from_model(model), torch.tensor([[1, 2, 3]])
        >>> ablated = torch.zeros(1, 1, len(layout.senders), layout.d_model)
        >>> keep = layout.valid[None]  # one circuit: every edge
        >>> out = masked_logits(model, layout, tokens, ablated, keep, lambda logits: logits)
        >>> torch.allclose(out[0], model(tokens), atol=1e-4)
        True
    """
    n_circ = keep.shape[0]
    n_batch, seq = tokens.shape
    n_send, d_model = len(layout.senders), layout.d_model
    # (circuit, receiver, sender): 1 where the receiver must see the ablated sender value
    drop = (~keep & layout.valid.to(keep.device)).to(ablated.dtype).transpose(1, 2).contiguous()
    # senders first, so that the senders computed so far are one contiguous block:
    # (circuit, sender, batch * pos * d_model)
    current = torch.zeros(n_circ, n_send, n_batch * seq * d_model,
                          device=tokens.device, dtype=ablated.dtype)  # fmt: skip
    abl = ablated.expand(n_batch, seq, -1, -1).permute(2, 0, 1, 3).reshape(n_send, -1)
    filled = [0]

    def store(first: int, count: int, values: Tensor) -> None:
        # (circuit * batch, pos, count, d_model) -> (circuit, count, batch * pos * d_model)
        block = values.reshape(n_circ, n_batch, seq, count, d_model).permute(0, 3, 1, 2, 4)
        current[:, first : first + count] = block.reshape(n_circ, count, -1)
        filled[0] = max(filled[0], first + count)

    # A layer's query, key and value inputs see the same senders (none is computed between
    # them): whichever of the three hooks runs first computes the changes of all three in one
    # pass over ``current`` (these passes are bound by reading it); the others take theirs.
    receivers = receiver_hook_names(layout)  # in forward order: each layer's q, k, v together
    span: dict[int, tuple[int, int]] = {}  # a q/k/v hook's first receiver -> its layer's q, k, v
    for k, (name, first, _) in enumerate(receivers):
        if name.endswith("hook_q_input"):
            group = receivers[k : k + 3]  # hook_q_input, hook_k_input, hook_v_input
            for _, member, _ in group:
                span[member] = (first, sum(count for _, _, count in group))
    done: dict[int, Tensor | None] = {}  # a layer's q, k, v changes, until each hook took its own
    taken: dict[int, int] = {}  # how many of a layer's three hooks took their part

    def change(first: int, count: int) -> Tensor | None:
        """Sum over dropped senders of (ablated - current): ``(circuit, receiver, b * p * d)``,
        None when no sender is dropped."""
        upto = filled[0]  # senders computed so far all come before these receivers
        weights = drop[:, first : first + count, :upto]  # (circuit, receiver, sender)
        if not bool(weights.any()):
            return None
        return torch.matmul(weights, abl[:upto]) - torch.bmm(weights, current[:, :upto])

    def patch(first: int, count: int) -> Callable:
        def hook(act: Tensor, hook: Any) -> Tensor:
            if first in span:
                group, total = span[first]
                if group not in done:
                    done[group] = change(group, total)
                whole = done[group]
                delta = None if whole is None else whole[:, first - group : first - group + count]
                taken[group] = taken.get(group, 0) + 1
                if taken[group] == 3:  # every hook of the layer took its part
                    del done[group], taken[group]
            else:
                delta = change(first, count)
            if delta is None or not bool(delta.any()):
                return act
            delta = delta.reshape(n_circ, count, n_batch, seq, d_model).permute(0, 2, 3, 1, 4)
            delta = delta.reshape(n_circ * n_batch, seq, count, d_model)
            return act + (delta if act.ndim == 4 else delta[:, :, 0]).to(act.dtype)

        return hook

    hooks = _sender_hooks(model, layout, store)
    hooks += [(name, patch(first, count)) for name, first, count in receivers]
    rows = tokens.repeat(n_circ, 1)  # (circuit * batch, pos)
    with graph_mode(model), hook_scope(model, fwd_hooks=hooks):
        logits = model(rows)
    values = read(logits)
    return values.reshape(n_circ, n_batch, *values.shape[1:])
