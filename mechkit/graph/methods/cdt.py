"""CD-T, contextual decomposition for transformers (Hsu et al. 2024, "Efficient Automated Circuit
Discovery in Transformers using Contextual Decomposition"), as an edge-attribution method.

Contextual decomposition (Murdoch et al. 2018; Singh et al. 2019) splits every activation ``x``
into a **relevant** part ``beta`` (what a chosen source contributes) and an **irrelevant** part
``gamma`` (everything else), ``x = beta + gamma``, and carries the split through the network
with one rule per operation. For an edge ``u -> v`` the source is the change the ablation makes
to ``u``'s output, ``delta_u = a_u - a'_u``, entering receiver ``v`` only: ``v``'s input splits
into ``beta = delta_u`` and ``gamma = input - delta_u``, every other input into ``beta = 0`` and
``gamma = input``; the split then runs to the logits, and the edge scores
``M(logits - beta_logits) - M(logits)``: the metric with the edge's relevant part taken out.

The rules (CD-T's, with the irrelevant part first):

- linear maps act on both parts; biases go to the irrelevant part (CD-T shares them out in
  proportion to the parts' sizes; here a bias belongs to no source);
- normalization (LayerNorm, RMSNorm) is linear in each part with the **scale frozen** at the
  clean run's value (CD-T's rule: the statistics of the whole input);
- an elementwise nonlinearity ``f``: ``gamma' = f(gamma)``, ``beta' = f(beta + gamma) -
  f(gamma)``; a gated MLP multiplies the parts out, ``gamma' = f(g_gamma) * u_gamma`` and
  ``beta'`` the rest of the product;
- attention: the pattern of the irrelevant queries and keys, ``A_gamma = softmax(q_gamma
  k_gamma^T)``, with ``A_beta = A - A_gamma`` (the nonlinearity rule applied to the softmax),
  and ``z_gamma = A_gamma v_gamma``, ``z_beta = A v_beta + A_beta v_gamma``.

Every rule keeps ``beta + gamma`` equal to the real activation (:func:`decompose` returns both
parts at every layer; the tests check the identity).

Two propagations (``propagation=``):

- ``"source"`` (the default, CD-T's cost): **one pass per source**, sources batched as copies of
  the prompts. A source's relevant part is its ablation change ``delta_u``, arriving at every
  receiver's input directly (an edge is a direct path); each receiver splits it with its own rule
  (a head's query, key or value input gives the head's ``z_beta``; the MLP's input its output's
  ``beta``), all receivers of the pass at once (heads are separate computations, so every head's
  query receivers share one copy, and likewise keys and values), and the edge ``u -> v`` scores
  ``-g_v . beta_v``: the relevant part leaving the receiver, weighed by the metric's gradient at
  the receiver's output on the clean run (one backward pass per batch, norm scales held
  constant as the rules hold them). Edges into the logits read the metric itself,
  ``M(logits - beta_logits) - M(logits)``. Cost per batch of prompts: one forward and backward
  pass, then per source the attention of every later layer three times (query, key and value
  receivers) and its MLP once on the source's copy: at most about three forward passes per
  source, whatever the number of receivers. SmolLM2's ~70,000 edges have 301 sources.
- ``"edge"``: **one pass per edge** from the receiver's layer to the logits (edges batched
  side by side to ``memory_budget``): the relevant part is carried through every later layer
  with the rules, and the edge scores ``M(logits - beta_logits) - M(logits)``. With the
  irrelevant part first, a model without normalization gives exactly the edge's real ablation
  (``method="exact"``); in a normalized model the frozen scales are the whole of the
  approximation. It costs what exact edge patching costs.

The two agree exactly wherever nothing nonlinear follows the receiver (edges into the last
layer's heads of an attention-only model, and into the logits: the tests check it); elsewhere
``"source"`` weighs the receiver's relevant output by the gradient where ``"edge"`` carries it
through the later layers' rules (rank correlation 0.9999 on the toy model's 81 edges).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from mechkit.core import Model, head_name, mlp_name, progress_bar
from mechkit.errors import UnsupportedModelError, check_choice
from mechkit.graph.layout import GraphLayout
from mechkit.graph.methods.gradients import answer_positions
from mechkit.graph.registry import EdgeScores, register_edge_method
from mechkit.graph.setup import EdgeSetup, batch_metric, mean_value
from mechkit.hook_scope import hook_scope

__all__ = ["cdt", "CleanRun", "Decomposition", "clean_run", "decompose", "PROPAGATIONS"]


@dataclasses.dataclass(frozen=True, eq=False)
class CleanRun:
    """What the decomposition freezes from the clean run: the residual entering each block and
    the final one ``(batch, pos, d_model)``, every norm's scale ``(batch, pos, 1)`` by hook
    name, and each layer's attention pattern ``(batch, head, query, key)``.

    Example:
        >>> run = clean_run(mk.load_model("attn-only-2l"), torch.tensor([[1, 2, 3]]))
        >>> sorted(run.scales)[:2], tuple(run.logits.shape)
        (['blocks.0.ln1', 'blocks.1.ln1'], (1, 3, 500))
    """

    resid: list[Tensor]
    scales: dict[str, Tensor]
    patterns: list[Tensor]
    logits: Tensor
    mid: list[Tensor] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True, eq=False)
class Decomposition:
    """The relevant and irrelevant parts: of the residual entering each block and the final
    residual (``resid_beta[l]``, ``(copy * batch, pos, d_model)``), and of the logits.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> run = clean_run(model, torch.tensor([[1, 2, 3]]))
        >>> parts = decompose(model, run, 0, {("v", 1): torch.ones(1, 1, 3, 128)})
        >>> len(parts.resid_beta), bool(parts.resid_beta[0].abs().max() == 0)
        (3, True)
    """

    resid_beta: list[Tensor]
    resid_gamma: list[Tensor]
    logits_beta: Tensor
    logits_gamma: Tensor


def _check_model(model: Model) -> None:
    cfg = model.cfg
    if cfg.parallel_attn_mlp or (cfg.act_fn or "").startswith("solu"):
        raise UnsupportedModelError(
            "Expected a sequential transformer without SoLU for CD-T; got "
            f"parallel_attn_mlp={cfg.parallel_attn_mlp}, act_fn={cfg.act_fn!r}. Hint: "
            "method='eap' or 'exact' support it."
        )


@torch.no_grad()
def clean_run(model: Model, tokens: Tensor) -> CleanRun:
    """The clean run's residuals (entering each block, and between its attention and MLP),
    norm scales, patterns and logits.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> run = clean_run(model, torch.tensor([[1, 2, 3]]))
        >>> len(run.resid), tuple(run.patterns[0].shape)   # 2 blocks and the final residual
        (3, (1, 4, 3, 3))
    """
    _check_model(model)
    n_layers = model.cfg.n_layers
    resid: dict[int, Tensor] = {}
    scales: dict[str, Tensor] = {}
    patterns: dict[int, Tensor] = {}
    mid: dict[int, Tensor] = {}
    hooks: list[tuple[str, Any]] = []
    for layer in range(n_layers):

        def keep_resid(act: Tensor, hook: Any, layer: int = layer) -> None:
            resid[layer] = act

        def keep_mid(act: Tensor, hook: Any, layer: int = layer) -> None:
            mid[layer] = act

        def keep_pattern(act: Tensor, hook: Any, layer: int = layer) -> None:
            patterns[layer] = act

        hooks += [
            (f"blocks.{layer}.hook_resid_pre", keep_resid),
            (f"blocks.{layer}.attn.hook_pattern", keep_pattern),
        ]
        if not model.cfg.attn_only:
            hooks.append((f"blocks.{layer}.hook_resid_mid", keep_mid))

    def keep_final(act: Tensor, hook: Any) -> None:
        resid[n_layers] = act

    def keep_scale(act: Tensor, hook: Any) -> None:
        scales[hook.name.removesuffix(".hook_scale")] = act

    hooks.append((f"blocks.{n_layers - 1}.hook_resid_post", keep_final))
    hooks += [(name, keep_scale) for name in model.hook_dict if name.endswith(".hook_scale")]
    with hook_scope(model, fwd_hooks=hooks):
        logits = model(tokens)
    return CleanRun(
        [resid[i] for i in range(n_layers + 1)],
        scales,
        [patterns[i] for i in range(n_layers)],
        logits,
        [mid[i] for i in sorted(mid)],
    )


def _norm_linear(module: Any, name: str, run: CleanRun, x: Tensor, repeats: int) -> Tensor:
    """A norm's linear part with the clean run's scale (no bias): what a relevant part becomes."""
    kind = type(module).__name__
    if kind == "Identity":
        return x
    scale = run.scales[name].repeat(repeats, 1, 1)  # (copy * batch, pos, 1)
    if x.ndim == 4:  # per-head inputs (copy * batch, pos, head, d_model)
        scale = scale[:, :, None]
    if kind in ("LayerNorm", "LayerNormPre"):
        x = x - x.mean(-1, keepdim=True)
    elif kind not in ("RMSNorm", "RMSNormPre"):
        raise UnsupportedModelError(
            f"Expected LayerNorm, RMSNorm or no normalization for CD-T; got {kind}."
        )
    x = x / scale
    weight = getattr(module, "w", None)
    return x if weight is None else x * weight


def _norm(
    module: Any, name: str, run: CleanRun, beta: Tensor, gamma: Tensor, repeats: int
) -> tuple[Tensor, Tensor]:
    """A norm, linear in each part with the clean run's scale; its bias to ``gamma``."""
    beta = _norm_linear(module, name, run, beta, repeats)
    gamma = _norm_linear(module, name, run, gamma, repeats)
    bias = getattr(module, "b", None)
    return beta, gamma if bias is None else gamma + bias


def _kv_weights(attn: Any, which: str) -> tuple[Tensor, Tensor]:
    """``W`` ``(kv_head, d_model, d_head)`` and ``b`` of keys or values, unexpanded in GQA."""
    if hasattr(attn, f"_W_{which}"):
        return getattr(attn, f"_W_{which}"), getattr(attn, f"_b_{which}")
    return getattr(attn, f"W_{which}"), getattr(attn, f"b_{which}")


def _project(x: Tensor, weight: Tensor) -> Tensor:
    """``x`` ``(copy * batch, pos, d_model)`` (shared by every head) or ``(..., head,
    d_model)`` through per-head ``weight`` ``(head, d_model, d_head)``."""
    pattern = "bpm,hmd->bphd" if x.ndim == 3 else "bphm,hmd->bphd"
    return torch.einsum(pattern, x, weight)


def _attention_z(
    model: Model,
    layer: int,
    run: CleanRun,
    inputs: dict[str, tuple[Tensor, Tensor]],
    repeats: int,
) -> tuple[Tensor, Tensor]:
    """Every head's ``z`` split ``(copy * batch, pos, head, d_head)``: ``inputs`` maps ``q``,
    ``k`` and ``v`` to pre-norm inputs ``(beta, gamma)``, per head (``q``) or key/value head
    (``k``, ``v``), ``(copy * batch, pos, head, d_model)``, or shared by all heads
    ``(copy * batch, pos, d_model)``."""
    block = model.blocks[layer]
    attn = block.attn
    name = f"blocks.{layer}.ln1"
    _, q_g = _norm(block.ln1, name, run, *inputs["q"], repeats)
    _, k_g = _norm(block.ln1, name, run, *inputs["k"], repeats)
    v_b, v_g = _norm(block.ln1, name, run, *inputs["v"], repeats)
    group = model.cfg.n_heads // (model.cfg.n_key_value_heads or model.cfg.n_heads)
    W_K, b_K = _kv_weights(attn, "K")
    W_V, b_V = _kv_weights(attn, "V")
    # (copy * batch, pos, head, d_head)
    q = _project(q_g, attn.W_Q) + attn.b_Q
    k = (_project(k_g, W_K) + b_K).repeat_interleave(group, dim=2)
    value_b = _project(v_b, W_V).repeat_interleave(group, dim=2)
    value_g = (_project(v_g, W_V) + b_V).repeat_interleave(group, dim=2)
    if model.cfg.positional_embedding_type == "rotary":
        q, k = attn.apply_rotary(q), attn.apply_rotary(k)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / attn.attn_scale
    if getattr(model.cfg, "attn_scores_soft_cap", -1.0) > 0:
        cap = model.cfg.attn_scores_soft_cap
        scores = cap * torch.tanh(scores / cap)
    a_gamma = attn.apply_causal_mask(scores).softmax(-1)  # (copy * batch, head, query, key)
    a_full = run.patterns[layer].repeat(repeats, 1, 1, 1)
    z_b = torch.einsum("bhqk,bkhd->bqhd", a_full, value_b) + torch.einsum(
        "bhqk,bkhd->bqhd", a_full - a_gamma, value_g
    )
    z_g = torch.einsum("bhqk,bkhd->bqhd", a_gamma, value_g)
    return z_b, z_g


def _attention(
    model: Model,
    layer: int,
    run: CleanRun,
    inputs: dict[str, tuple[Tensor, Tensor]],
    repeats: int,
) -> tuple[Tensor, Tensor]:
    """The attention block's output, split (inputs as for :func:`_attention_z`)."""
    attn = model.blocks[layer].attn
    z_b, z_g = _attention_z(model, layer, run, inputs, repeats)
    out_b = torch.einsum("bqhd,hdm->bqm", z_b, attn.W_O)
    out_g = torch.einsum("bqhd,hdm->bqm", z_g, attn.W_O) + attn.b_O
    return out_b, out_g


def _mlp(
    model: Model, layer: int, run: CleanRun, beta: Tensor, gamma: Tensor, repeats: int
) -> tuple[Tensor, Tensor]:
    block = model.blocks[layer]
    mlp: Any = block.mlp  # MLP or GatedMLP, whose weights the type checker does not see
    x_b, x_g = _norm(block.ln2, f"blocks.{layer}.ln2", run, beta, gamma, repeats)
    pre_b, pre_g = x_b @ mlp.W_in, x_g @ mlp.W_in
    if model.cfg.gated_mlp:  # TransformerLens: act(x W_gate) * (x W_in) + b_in
        gate_b, gate_g = x_b @ mlp.W_gate, x_g @ mlp.W_gate
        h_g = mlp.act_fn(gate_g) * pre_g + mlp.b_in
        h_b = mlp.act_fn(gate_b + gate_g) * (pre_b + pre_g) + mlp.b_in - h_g
    else:
        pre_g = pre_g + mlp.b_in
        h_g = mlp.act_fn(pre_g)
        h_b = mlp.act_fn(pre_b + pre_g) - h_g
    return h_b @ mlp.W_out, h_g @ mlp.W_out + mlp.b_out


@torch.no_grad()
def decompose(
    model: Model,
    run: CleanRun,
    start_layer: int,
    injections: dict[tuple[str, int], Float[Tensor, "copy batch pos d_model"]],
) -> Decomposition:
    """Carry the split from block ``start_layer`` to the logits: ``beta`` is zero in the
    residual entering ``start_layer``; ``injections[(kind, index)]`` (``kind`` ``"q"`` with a
    query head, ``"k"``/``"v"`` with a key/value head of that block, ``"mlp"`` and ``"logits"``
    with 0) is moved from ``gamma`` to ``beta`` at that input only, one copy of the batch per
    row of its first dimension (zeros where a copy has none).

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> tokens = torch.tensor([[1, 2, 3]])
        >>> run = clean_run(model, tokens)
        >>> delta = torch.randn(1, 1, 3, 128)   # one copy, moved into head 2's query
        >>> parts = decompose(model, run, 1, {("q", 2): delta})
        >>> torch.allclose(parts.logits_beta + parts.logits_gamma, run.logits, atol=1e-4)
        True
    """
    n_batch = run.resid[0].shape[0]
    copies = next(iter(injections.values())).shape[0] if injections else 1
    cfg = model.cfg
    n_kv = cfg.n_key_value_heads or cfg.n_heads

    def inject(kind: str, count: int, beta: Tensor, gamma: Tensor) -> tuple[Tensor, Tensor]:
        # (copy * batch, pos, d_model) -> (copy * batch, pos, count, d_model)
        beta = beta[:, :, None].repeat(1, 1, count, 1)
        gamma = gamma[:, :, None].repeat(1, 1, count, 1)
        for (k, index), delta in injections.items():
            if k == kind:
                flat = delta.flatten(0, 1).to(beta.dtype)  # (copy * batch, pos, d_model)
                beta[:, :, index] += flat
                gamma[:, :, index] -= flat
        return beta, gamma

    gamma = run.resid[start_layer].repeat(copies, 1, 1)
    beta = torch.zeros_like(gamma)
    betas, gammas = [beta], [gamma]
    for layer in range(start_layer, cfg.n_layers):
        first = layer == start_layer
        inputs = {
            kind: inject(kind, count, beta, gamma) if first else
            (beta[:, :, None].expand(-1, -1, count, -1),
             gamma[:, :, None].expand(-1, -1, count, -1))
            for kind, count in (("q", cfg.n_heads), ("k", n_kv), ("v", n_kv))
        }  # fmt: skip
        out_b, out_g = _attention(model, layer, run, inputs, copies)
        beta, gamma = beta + out_b, gamma + out_g
        if not cfg.attn_only:
            m_b, m_g = inject("mlp", 1, beta, gamma) if first else (beta, gamma)
            if first:
                m_b, m_g = m_b[:, :, 0], m_g[:, :, 0]
            out_b, out_g = _mlp(model, layer, run, m_b, m_g, copies)
            beta, gamma = beta + out_b, gamma + out_g
        betas.append(beta)
        gammas.append(gamma)
    if start_layer == cfg.n_layers or any(kind == "logits" for kind, _ in injections):
        f_b, f_g = inject("logits", 1, beta, gamma)
        beta, gamma = f_b[:, :, 0], f_g[:, :, 0]
    name = "ln_final"
    x_b, x_g = _norm(getattr(model, "ln_final", torch.nn.Identity()), name, run, beta, gamma,
                     copies)  # fmt: skip
    logits_b = x_b @ model.W_U
    logits_g = x_g @ model.W_U + model.b_U
    del n_batch
    return Decomposition(betas, gammas, logits_b, logits_g)


def _receiver_key(layout: GraphLayout, receiver: int) -> tuple[int, tuple[str, int]]:
    """``(layer the receiver reads in, injection key)``."""
    r = layout.receivers[receiver]
    if r.kind == "logits":
        return layout.n_layers, ("logits", 0)
    assert r.layer is not None
    if r.kind == "mlp":
        return r.layer, ("mlp", 0)
    assert r.head is not None
    return r.layer, (r.kind, r.head)


def _output_gradients(
    model: Model, tokens: Tensor, metric: Any
) -> tuple[float, list[Tensor], list[Tensor]]:
    """The metric on the clean run and its gradient at every head's ``z`` ``(batch, pos,
    head, d_head)`` and every MLP's output ``(batch, pos, d_model)``, one backward pass, the
    norms' scales held constant as the decomposition holds them."""
    n_layers = model.cfg.n_layers
    kept: dict[str, Tensor] = {}

    def leaf(act: Tensor, hook: Any) -> Tensor:
        return act.detach().requires_grad_(True)

    def keep(act: Tensor, hook: Any) -> None:
        kept[hook.name] = act

    def frozen(act: Tensor, hook: Any) -> Tensor:  # CD-T's norm rule: the scale is a constant
        return act.detach()

    names = [f"blocks.{layer}.attn.hook_z" for layer in range(n_layers)]
    if not model.cfg.attn_only:
        names += [f"blocks.{layer}.hook_mlp_out" for layer in range(n_layers)]
    hooks = [("blocks.0.hook_resid_pre", leaf)] + [(name, keep) for name in names]
    hooks += [(name, frozen) for name in model.hook_dict if name.endswith(".hook_scale")]
    with torch.enable_grad(), hook_scope(model, fwd_hooks=hooks):
        value = mean_value(metric, model(tokens))
        grads = torch.autograd.grad(value, [kept[name] for name in names], allow_unused=True)
    by_name = {
        name: torch.zeros_like(kept[name]) if g is None else g.detach()
        for name, g in zip(names, grads, strict=True)
    }
    z = [by_name[f"blocks.{layer}.attn.hook_z"] for layer in range(n_layers)]
    mlp = [by_name.get(f"blocks.{layer}.hook_mlp_out") for layer in range(n_layers)]
    return float(value.detach()), z, [g for g in mlp if g is not None]


def _chunks(items: list[int], size: int) -> list[list[int]]:
    return [items[lo : lo + size] for lo in range(0, len(items), size)]


@dataclasses.dataclass(frozen=True, eq=False)
class _Clean:
    """One layer's clean queries, keys, values (rotated, per head) and MLP pre-activations, so
    that a source's copy computes only what its relevant part changes: its gamma is the clean
    value minus the relevant part's (the rules are linear up to the nonlinearity)."""

    model: Model
    layer: int
    run: CleanRun
    q: Tensor
    k: Tensor
    v: Tensor
    pre: Tensor | None
    gate: Tensor | None

    @classmethod
    def of(cls, model: Model, layer: int, run: CleanRun) -> _Clean:
        block = model.blocks[layer]
        attn = block.attn
        x = _norm(block.ln1, f"blocks.{layer}.ln1", run, run.resid[layer], run.resid[layer], 1)[1]
        W_K, b_K = _kv_weights(attn, "K")
        W_V, b_V = _kv_weights(attn, "V")
        group = model.cfg.n_heads // (model.cfg.n_key_value_heads or model.cfg.n_heads)
        q = _project(x, attn.W_Q) + attn.b_Q
        k = (_project(x, W_K) + b_K).repeat_interleave(group, dim=2)
        v = (_project(x, W_V) + b_V).repeat_interleave(group, dim=2)
        if model.cfg.positional_embedding_type == "rotary":
            q, k = attn.apply_rotary(q), attn.apply_rotary(k)
        pre = gate = None
        if not model.cfg.attn_only:
            mlp: Any = block.mlp
            m = _norm(block.ln2, f"blocks.{layer}.ln2", run, run.mid[layer], run.mid[layer], 1)[1]
            pre = m @ mlp.W_in + (0 if model.cfg.gated_mlp else mlp.b_in)
            gate = m @ mlp.W_gate if model.cfg.gated_mlp else None
        return cls(model, layer, run, q, k, v, pre, gate)

    def _moved(self, d: Tensor, weight: Tensor, copies: int) -> Tensor:
        """The relevant part ``d`` ``(copy * batch, pos, d_model)`` through ln1 and ``weight``,
        per head ``(copy * batch, pos, head, d_head)``."""
        block = self.model.blocks[self.layer]
        x = _norm_linear(block.ln1, f"blocks.{self.layer}.ln1", self.run, d, copies)
        group = self.model.cfg.n_heads // weight.shape[0]
        return _project(x, weight).repeat_interleave(group, dim=2)

    def relevant_z(self, kind: str, d: Tensor, copies: int) -> Tensor:
        """Every head's ``z_beta`` when ``d`` enters its ``kind`` input alone (:func:`_attention_z`
        with the other inputs clean)."""
        attn = self.model.blocks[self.layer].attn
        a_full = self.run.patterns[self.layer].repeat(copies, 1, 1, 1)
        v = self.v.repeat(copies, 1, 1, 1)
        if kind == "v":
            return torch.einsum("bhqk,bkhd->bqhd", a_full, self._moved(d, _kv_weights(attn, "V")[0],
                                                                       copies))  # fmt: skip
        q, k = self.q.repeat(copies, 1, 1, 1), self.k.repeat(copies, 1, 1, 1)
        rotary = self.model.cfg.positional_embedding_type == "rotary"
        if kind == "q":
            moved = self._moved(d, attn.W_Q, copies)
            q = q - (attn.apply_rotary(moved) if rotary else moved)
        else:
            moved = self._moved(d, _kv_weights(attn, "K")[0], copies)
            k = k - (attn.apply_rotary(moved) if rotary else moved)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / attn.attn_scale
        if getattr(self.model.cfg, "attn_scores_soft_cap", -1.0) > 0:
            cap = self.model.cfg.attn_scores_soft_cap
            scores = cap * torch.tanh(scores / cap)
        a_gamma = attn.apply_causal_mask(scores).softmax(-1)
        return torch.einsum("bhqk,bkhd->bqhd", a_full - a_gamma, v)

    def relevant_mlp(self, d: Tensor, copies: int) -> Tensor:
        """The MLP output's ``beta`` when ``d`` enters its input alone (:func:`_mlp`)."""
        assert self.pre is not None
        block = self.model.blocks[self.layer]
        mlp: Any = block.mlp
        x_b = _norm_linear(block.ln2, f"blocks.{self.layer}.ln2", self.run, d, copies)
        pre = self.pre.repeat(copies, 1, 1)
        pre_b = x_b @ mlp.W_in
        if self.gate is not None:
            gate = self.gate.repeat(copies, 1, 1)
            gate_b = x_b @ mlp.W_gate
            h_b = mlp.act_fn(gate) * pre - mlp.act_fn(gate - gate_b) * (pre - pre_b)
        else:
            h_b = mlp.act_fn(pre) - mlp.act_fn(pre - pre_b)
        return h_b @ mlp.W_out


def _by_source(
    model: Model,
    layout: GraphLayout,
    tokens: Tensor,
    metric: Any,
    delta: Tensor,
    memory_budget: int,
    bar: Any,
) -> tuple[Tensor, float]:
    """Scores of every edge from one pass per source (module docstring), sources batched as
    copies of the prompts: ``delta`` ``(batch, pos, sender, d_model)``."""
    cfg = model.cfg
    run = clean_run(model, tokens)
    base, grad_z, grad_mlp = _output_gradients(model, tokens, metric)

    n_batch, seq = tokens.shape
    per_copy = n_batch * seq * 4 * (
        cfg.n_heads * (cfg.d_model + 3 * cfg.d_head + 2 * seq) + 4 * cfg.d_model
        + 3 * (cfg.d_mlp or 0) + cfg.d_vocab
    )  # fmt: skip
    size = max(1, int(memory_budget // max(1, per_copy)))
    scores = torch.zeros(len(layout.senders), len(layout.receivers), device=delta.device)
    index = {r.name: i for i, r in enumerate(layout.receivers)}
    group = cfg.n_heads // layout.n_kv_heads

    def sources(receiver: int) -> list[int]:
        return layout.valid[:, receiver].nonzero()[:, 0].tolist()

    def relevant(part: list[int]) -> Tensor:
        """``delta`` of these senders as copies ``(copy * batch, pos, d_model)``."""
        return delta[:, :, part].permute(2, 0, 1, 3).flatten(0, 1)

    for layer in range(cfg.n_layers):
        first = index[head_name(layer, 0, "q")]
        clean = _Clean.of(model, layer, run)
        for part in _chunks(sources(first), size):
            d = relevant(part)
            for kind in ("q", "k", "v"):
                z_b = clean.relevant_z(kind, d, len(part))
                # the metric's change when the head loses the relevant part of its z
                per_head = -(z_b.unflatten(0, (len(part), n_batch)) * grad_z[layer]).sum((1, 2, 4))
                if kind == "q":
                    targets = [index[head_name(layer, h, "q")] for h in range(cfg.n_heads)]
                else:
                    per_head = per_head.unflatten(1, (layout.n_kv_heads, group)).sum(2)
                    targets = [index[head_name(layer, h, kind)] for h in range(layout.n_kv_heads)]
                scores[torch.tensor(part)[:, None], torch.tensor(targets)[None, :]] = per_head
        if not cfg.attn_only:
            receiver = index[mlp_name(layer)]
            for part in _chunks(sources(receiver), size):
                out_b = clean.relevant_mlp(relevant(part), len(part))
                value = -(out_b.unflatten(0, (len(part), n_batch)) * grad_mlp[layer]).sum((1, 2, 3))
                scores[torch.tensor(part), receiver] = value
        bar.update(1)
    # into the logits: nothing downstream but the frozen final norm and the unembedding, so the
    # metric itself is read
    receiver = index["logits"]
    ln_final = getattr(model, "ln_final", torch.nn.Identity())
    at = answer_positions(metric, tokens)  # one position per prompt: unembed only those
    rows = torch.arange(n_batch, device=tokens.device)
    for part in _chunks(sources(receiver), size):
        x_b = _norm_linear(ln_final, "ln_final", run, relevant(part), len(part))
        clean_logits = run.logits if at is None else run.logits[rows, at]
        if at is not None:  # (copy * batch, d_model) at each prompt's position
            x_b = x_b[torch.arange(len(x_b), device=x_b.device), at.repeat(len(part))]
        logits = clean_logits.repeat(len(part), *[1] * (clean_logits.ndim - 1)) - x_b @ model.W_U
        for c, s in enumerate(part):
            chunk = logits[c * n_batch : (c + 1) * n_batch]
            scores[s, receiver] = float(mean_value(metric, chunk)) - base
    bar.update(1)
    return scores, base


def _by_edge(
    model: Model,
    layout: GraphLayout,
    tokens: Tensor,
    metric: Any,
    delta: Tensor,
    memory_budget: int,
    bar: Any,
) -> tuple[Tensor, float]:
    """Scores of every edge from one pass per edge, from the receiver's layer to the logits."""
    by_layer: dict[int, list[tuple[int, int, tuple[str, int]]]] = {}
    for s, r in layout.valid.nonzero().tolist():
        layer, key = _receiver_key(layout, r)
        by_layer.setdefault(layer, []).append((s, r, key))
    run = clean_run(model, tokens)
    base = float(mean_value(metric, run.logits))
    n_batch, seq = tokens.shape
    per_copy = n_batch * seq * (model.cfg.d_model * 16 + model.cfg.d_vocab) * 4
    size = max(1, int(memory_budget // max(1, per_copy)))
    scores = torch.zeros(len(layout.senders), len(layout.receivers))
    for layer, items in sorted(by_layer.items()):
        for lo in range(0, len(items), size):
            part = items[lo : lo + size]
            injections: dict[tuple[str, int], Tensor] = {}
            for c, (s, _, key) in enumerate(part):
                if key not in injections:
                    injections[key] = delta.new_zeros(len(part), n_batch, seq, delta.shape[-1])
                injections[key][c] = delta[:, :, s]
            parts = decompose(model, run, layer, injections)
            logits = run.logits.repeat(len(part), 1, 1) - parts.logits_beta
            for c, (s, r, _) in enumerate(part):
                chunk = logits[c * n_batch : (c + 1) * n_batch]
                scores[s, r] = float(mean_value(metric, chunk)) - base
            bar.update(len(part))
    return scores, base


PROPAGATIONS = ("source", "edge")
"""``"source"``: one pass per source, CD-T's cost; ``"edge"``: one pass per edge."""


@register_edge_method(
    "cd-t",
    description="contextual decomposition: each source's ablation change as the relevant part, "
    "split through its receivers with CD-T's rules, norms frozen",
    paper="Hsu et al. 2024, Efficient Automated Circuit Discovery in Transformers using "
    "Contextual Decomposition",
    options={"propagation": "source"},
)
@torch.no_grad()
def cdt(model: Model, setup: EdgeSetup, *, progress: bool, propagation: str) -> EdgeScores:
    """CD-T edge scores (module docstring); run through
    ``mk.edge_attribution(..., method="cd-t")``, with ``propagation="edge"`` for the pass per
    edge.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> graph = mk.edge_attribution(model, torch.tensor([[1, 2, 3]]),
        ...     torch.tensor([[1, 7, 3]]), lambda logits: logits[:, -1, 0].mean(), method="cd-t")
        >>> graph.method, graph.n_edges
        ('cd-t', 81)
    """
    _check_model(model)
    check_choice("propagation", propagation, PROPAGATIONS)
    layout = setup.layout
    n_prompts = setup.n_prompts
    scores = torch.zeros(len(layout.senders), len(layout.receivers))
    totals = {"clean": 0.0}
    n_batches = -(-n_prompts // setup.batch_size)
    steps = layout.n_layers + 1 if propagation == "source" else int(layout.valid.sum())
    score = _by_source if propagation == "source" else _by_edge

    with progress_bar(steps * n_batches, f"cd-t ({propagation})", enabled=progress) as bar:

        def work(rows: slice) -> None:
            weight = (rows.stop - rows.start) / n_prompts
            metric = batch_metric(setup.metric, rows, n_prompts)
            tokens = setup.clean_tokens[rows]
            delta = setup.clean_senders[rows] - setup.ablated_rows(rows)  # (b, p, sender, d)
            local, base = score(model, layout, tokens, metric, delta, setup.memory_budget, bar)
            scores.add_(local.cpu() * weight)  # only once the whole batch has run
            totals["clean"] += base * weight

        setup.each_batch(work)
    return EdgeScores(scores, totals["clean"], detail="" if propagation == "source" else "per edge")
