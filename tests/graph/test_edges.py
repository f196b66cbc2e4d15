"""Edge attribution and circuit runs against naive implementations and exact identities.

The naive versions patch one edge (or take one gradient) at a time with plain TransformerLens
hooks and caches; the identities: keeping every edge gives the clean run, dropping every edge
gives the corrupt run, EAP-IG with one step is EAP.
"""

from __future__ import annotations

import pytest
import torch

import mechkit as mk
from mechkit.core.names import parse_node
from mechkit.demo import IOI_PAIRS
from mechkit.graph.layout import GraphLayout
from mechkit.graph.runs import graph_mode
from tests.conftest import hook_count


@pytest.fixture(scope="module")
def toy_runs():
    generator = torch.Generator().manual_seed(3)
    segment = torch.randint(1, 500, (3, 5), generator=generator)
    clean = torch.cat([torch.zeros(3, 1, dtype=torch.long), segment, segment], dim=1)
    corrupt = clean.clone()
    corrupt[:, 4:6] = torch.randint(1, 500, (3, 2), generator=generator)
    return clean, corrupt


def toy_metric(logits):
    return (logits[:, -1, 7] - logits[:, -1, 11]).mean()


def sender_value(model, cache, name):
    """A sender's output from a TransformerLens cache: (batch, pos, d_model)."""
    node = parse_node(name)
    if node.kind == "input":
        return cache["blocks.0.hook_resid_pre"]
    if node.kind == "mlp":
        return cache[f"blocks.{node.layer}.hook_mlp_out"]
    return (
        cache[f"blocks.{node.layer}.attn.hook_z"][:, :, node.head]
        @ model.W_O[node.layer, node.head]
    )


def receiver_hook(model, name):
    """(hook name, index into the hook's activation) of a receiver."""
    if name == "logits":
        return f"blocks.{model.cfg.n_layers - 1}.hook_resid_post", (slice(None),)
    node = parse_node(name)
    if node.kind == "mlp":
        return f"blocks.{node.layer}.hook_mlp_in", (slice(None),)
    return f"blocks.{node.layer}.hook_{node.port}_input", (slice(None), slice(None), node.head)


def run_caches(model, clean, corrupt):
    """Every activation of the clean and the corrupt run in graph mode (per-head q/k/v inputs);
    the naive references below take them, so a test of several edges caches once."""
    with torch.no_grad(), graph_mode(model):
        return model.run_with_cache(clean)[1], model.run_with_cache(corrupt)[1]


def naive_edge_patch(model, clean, corrupt, metric, edge, caches=None):
    """M(clean run with only this edge carrying the corrupt sender value) - M(clean)."""
    src, dst = edge.split("->")
    clean_cache, corrupt_cache = caches or run_caches(model, clean, corrupt)
    with torch.no_grad(), graph_mode(model):
        delta = sender_value(model, corrupt_cache, src) - sender_value(model, clean_cache, src)
        hook_name, index = receiver_hook(model, dst)

        def patch(act, hook):
            act = act.clone()
            act[index] = act[index] + delta
            return act

        base = float(metric(model(clean)))
        with model.hooks(fwd_hooks=[(hook_name, patch)]):
            return float(metric(model(clean))) - base


def naive_eap(model, clean, corrupt, metric, edge, embed_alpha=None, caches=None):
    """(a'_u - a_u) . dM/d(input_v) with the gradient from run_with_cache and autograd; with
    ``embed_alpha`` averaged over runs whose embeddings are interpolated."""
    src, dst = edge.split("->")
    clean_cache, corrupt_cache = caches or run_caches(model, clean, corrupt)
    delta = sender_value(model, corrupt_cache, src) - sender_value(model, clean_cache, src)
    hook_name, index = receiver_hook(model, dst)
    alphas = embed_alpha or [None]
    total = torch.zeros(())
    for alpha in alphas:
        kept: dict[str, torch.Tensor] = {}
        hooks = [(hook_name, lambda act, hook, kept=kept: kept.setdefault("x", act))]
        if alpha is not None:
            e0 = corrupt_cache["blocks.0.hook_resid_pre"]
            e1 = clean_cache["blocks.0.hook_resid_pre"]
            point = (e0 + alpha * (e1 - e0)).requires_grad_(True)
            hooks.insert(0, ("blocks.0.hook_resid_pre", lambda act, hook, p=point: p))
        with torch.enable_grad(), graph_mode(model), model.hooks(fwd_hooks=hooks):
            value = metric(model(clean))
            (grad,) = torch.autograd.grad(value, kept["x"])
        total = total + (delta * grad[index]).sum()
    return float(total.detach()) / len(alphas)


EDGES = ["input->L0H1.q", "input->L1H2.k", "L0H3->L1H0.v", "L0H1->logits", "L1H2->logits"]


def test_exact_equals_patching_each_edge_alone(toy, toy_runs):
    clean, corrupt = toy_runs
    graph = mk.edge_attribution(toy, clean, corrupt, toy_metric, method="exact", progress=False)
    layout = graph.layout
    for edge in EDGES:
        s, r = layout.edge_index(edge)
        expected = naive_edge_patch(toy, clean, corrupt, toy_metric, edge)
        assert float(graph.scores[s, r]) == pytest.approx(expected, abs=1e-5), edge


def test_eap_equals_naive_gradient_product(toy, toy_runs):
    clean, corrupt = toy_runs
    graph = mk.edge_attribution(toy, clean, corrupt, toy_metric, method="eap")
    for edge in EDGES:
        s, r = graph.layout.edge_index(edge)
        expected = naive_eap(toy, clean, corrupt, toy_metric, edge)
        assert float(graph.scores[s, r]) == pytest.approx(expected, abs=1e-5), edge


def test_eap_ig_inputs_equals_naive_average_and_one_step_is_eap(toy, toy_runs):
    clean, corrupt = toy_runs
    ig = mk.edge_attribution(
        toy, clean, corrupt, toy_metric, method="eap-ig-inputs", steps=4, progress=False
    )
    for edge in EDGES:
        s, r = ig.layout.edge_index(edge)
        expected = naive_eap(
            toy, clean, corrupt, toy_metric, edge, embed_alpha=[0.25, 0.5, 0.75, 1]
        )
        assert float(ig.scores[s, r]) == pytest.approx(expected, abs=1e-5), edge
    one = mk.edge_attribution(toy, clean, corrupt, toy_metric, method="eap-ig-inputs", steps=1)
    eap = mk.edge_attribution(toy, clean, corrupt, toy_metric, method="eap")
    torch.testing.assert_close(one.scores, eap.scores, atol=1e-6, rtol=0)


def test_eap_ig_activations_interpolates_one_block_at_a_time(toy, toy_runs):
    """For the heads of layer 0, the naive version moves hook_z itself (ours moves attn_out)."""
    clean, corrupt = toy_runs
    ig = mk.edge_attribution(
        toy, clean, corrupt, toy_metric, method="eap-ig-activations", steps=2, progress=False
    )
    with torch.no_grad(), graph_mode(toy):
        _, cc = toy.run_with_cache(clean)
        _, kc = toy.run_with_cache(corrupt)
    edge = "L0H2->L1H1.q"
    delta = sender_value(toy, kc, "L0H2") - sender_value(toy, cc, "L0H2")
    grads = []
    for alpha in (0.5, 1.0):
        z = kc["blocks.0.attn.hook_z"] + alpha * (
            cc["blocks.0.attn.hook_z"] - kc["blocks.0.attn.hook_z"]
        )
        kept: dict[str, torch.Tensor] = {}
        hooks = [
            ("blocks.0.attn.hook_z", lambda act, hook, z=z: z.clone().requires_grad_(True)),
            ("blocks.1.hook_q_input", lambda act, hook, kept=kept: kept.setdefault("x", act)),
        ]
        with torch.enable_grad(), graph_mode(toy), toy.hooks(fwd_hooks=hooks):
            (grad,) = torch.autograd.grad(toy_metric(toy(clean)), kept["x"])
        grads.append(grad[:, :, 1])
    expected = float((delta * (grads[0] + grads[1]) / 2).sum().detach())
    s, r = ig.layout.edge_index(edge)
    assert float(ig.scores[s, r]) == pytest.approx(expected, abs=1e-5)


def test_all_edges_kept_is_clean_and_none_is_corrupt(toy, toy_runs):
    clean, corrupt = toy_runs
    graph = mk.edge_attribution(toy, clean, corrupt, toy_metric, method="eap")
    with torch.no_grad():
        clean_value, corrupt_value = float(toy_metric(toy(clean))), float(toy_metric(toy(corrupt)))
    assert graph.clean_score == pytest.approx(clean_value, abs=1e-6)
    assert graph.ablated_score == pytest.approx(corrupt_value, abs=1e-5)
    full = mk.evaluate_circuit(
        toy, graph.top_edges(graph.layout.n_edges), clean, corrupt, toy_metric
    )
    empty = mk.evaluate_circuit(toy, graph.top_edges(0), clean, corrupt, toy_metric)
    assert full.circuit_score == pytest.approx(clean_value, abs=1e-5)
    assert empty.circuit_score == pytest.approx(corrupt_value, abs=1e-5)
    assert full.faithfulness == pytest.approx(1.0, abs=1e-3)
    assert empty.faithfulness == pytest.approx(0.0, abs=1e-3)


def test_zero_and_mean_ablation_of_every_edge_equal_hooked_runs(toy, toy_runs):
    clean, corrupt = toy_runs
    graph = mk.edge_attribution(toy, clean, corrupt, toy_metric, method="eap", ablation="zero")
    # every edge zero: every receiver sees only biases, i.e. resid_pre 0 = 0, heads' z = 0
    zero = lambda act, hook: torch.zeros_like(act)  # noqa: E731
    hooks = [("blocks.0.hook_resid_pre", zero)] + [
        (f"blocks.{layer}.attn.hook_z", zero) for layer in range(toy.cfg.n_layers)
    ]
    with torch.no_grad(), toy.hooks(fwd_hooks=hooks):
        expected = float(toy_metric(toy(clean)))
    assert graph.ablated_score == pytest.approx(expected, abs=1e-5)


def test_runs_leave_no_hooks_and_restore_the_config(toy, toy_runs):
    clean, corrupt = toy_runs
    before = hook_count(toy)
    flags = (toy.cfg.use_split_qkv_input, toy.cfg.use_hook_mlp_in)

    def broken(logits):
        raise RuntimeError("metric failed")

    with pytest.raises(RuntimeError, match="metric failed"):
        mk.edge_attribution(toy, clean, corrupt, broken, method="eap")
    assert hook_count(toy) == before
    assert (toy.cfg.use_split_qkv_input, toy.cfg.use_hook_mlp_in) == flags
    assert all(p.grad is None for p in toy.parameters())


def test_bad_arguments_are_refused(toy, toy_runs):
    clean, corrupt = toy_runs
    with pytest.raises(mk.MechkitError, match="Did you mean 'eap'"):
        mk.edge_attribution(toy, clean, corrupt, toy_metric, method="eap2")
    with pytest.raises(mk.PromptLengthError):
        mk.edge_attribution(toy, clean, corrupt[:, :-1], toy_metric)
    with pytest.raises(mk.MechkitError, match="ablation"):
        mk.edge_attribution(toy, clean, corrupt, toy_metric, ablation="resample")


@pytest.fixture(scope="module")
def ioi_pairs(smollm2):
    clean, corrupt, answers, wrongs = (list(x) for x in zip(*IOI_PAIRS[:4], strict=True))
    return mk.PromptPairs.from_lists(smollm2, clean, corrupt, answers, wrongs)


@pytest.mark.slow
def test_smollm2_grouped_heads_mlps_and_padding(smollm2, ioi_pairs):
    layout = GraphLayout.from_model(smollm2)
    assert len(layout.senders) == 1 + 30 * 9 + 30
    assert len(layout.receivers) == 30 * (9 + 3 + 3 + 1) + 1
    assert ioi_pairs.is_padded
    metric = mk.LogitDiff.from_pairs(ioi_pairs)
    graph = mk.edge_attribution(smollm2, ioi_pairs, method="eap", batch_size=2)
    with torch.no_grad():
        corrupt_value = float(metric(smollm2(ioi_pairs.corrupt_tokens)))
        clean_value = float(metric(smollm2(ioi_pairs.clean_tokens)))
    assert graph.clean_score == pytest.approx(clean_value, abs=1e-4)
    assert graph.ablated_score == pytest.approx(corrupt_value, abs=1e-3)
    clean, corrupt = ioi_pairs.clean_tokens, ioi_pairs.corrupt_tokens
    caches = run_caches(smollm2, clean, corrupt)
    for edge in ["L3H2->L20H1.k", "L10H4->L10.mlp", "L5.mlp->L22H7.q", "L23H3->logits"]:
        s, r = layout.edge_index(edge)
        expected = naive_eap(smollm2, clean, corrupt, metric, edge, caches=caches)
        assert float(graph.scores[s, r]) == pytest.approx(expected, abs=2e-4), edge
    exact = naive_edge_patch(smollm2, clean, corrupt, metric, "L10H4->L10.mlp", caches=caches)
    del caches
    keep = graph.without(["L10H4->L10.mlp"])
    assert keep.n_edges == layout.n_edges - 1
    ev = mk.evaluate_circuit(smollm2, keep, ioi_pairs)
    assert ev.circuit_score - ev.model_score == pytest.approx(exact, abs=2e-4)


def test_out_of_memory_splits_prompts_and_circuits(toy, toy_runs, monkeypatch):
    """A batch (of prompts, or of circuits in one run) that raises out-of-memory is split in
    two and retried; the scores equal the unsplit run's."""
    import mechkit.graph.methods.gradients as gradients_module
    import mechkit.graph.setup as setup_module

    clean, corrupt = toy_runs
    pairs = mk.PromptPairs.from_tokens(clean, corrupt, answers=[7, 7, 7], wrongs=[11, 11, 11])
    whole = mk.edge_attribution(toy, pairs, method="eap")
    exact_whole = mk.edge_attribution(toy, pairs, method="exact", progress=False)
    real_gradients, real_masked = gradients_module.receiver_gradients, setup_module.masked_logits
    calls = {"oom": 0}

    def gradients(model, layout, tokens, *args, **kwargs):
        if tokens.shape[0] > 1:
            calls["oom"] += 1
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real_gradients(model, layout, tokens, *args, **kwargs)

    def masked(model, layout, tokens, ablated, keep, read):
        if keep.shape[0] > 2 or tokens.shape[0] > 1:
            calls["oom"] += 1
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real_masked(model, layout, tokens, ablated, keep, read)

    monkeypatch.setattr(gradients_module, "receiver_gradients", gradients)
    monkeypatch.setattr(setup_module, "masked_logits", masked)
    split = mk.edge_attribution(toy, pairs, method="eap")
    exact_split = mk.edge_attribution(toy, pairs, method="exact", progress=False)
    assert calls["oom"] >= 3
    torch.testing.assert_close(split.scores, whole.scores, atol=1e-5, rtol=0)
    torch.testing.assert_close(exact_split.scores, exact_whole.scores, atol=1e-5, rtol=0)
    assert split.ablated_score == pytest.approx(whole.ablated_score, abs=1e-6)


def test_metric_vector_of_the_wrong_length_raises_shape_error_not_averaged(toy, toy_runs):
    clean, corrupt = toy_runs
    n = clean.shape[0]

    def too_many(logits):  # n + 1 values for n prompts
        return toy_metric(logits).expand(n + 1)

    for method in ("eap", "exact"):
        with pytest.raises(mk.ShapeError, match="one value per prompt"):
            mk.edge_attribution(toy, clean, corrupt, too_many, method=method, progress=False)

    def per_prompt(logits):  # one value per prompt is averaged, as a scalar metric
        return logits[:, -1, 3] - logits[:, -1, 8]

    a = mk.edge_attribution(toy, clean, corrupt, per_prompt, progress=False)
    b = mk.edge_attribution(toy, clean, corrupt, lambda lg: per_prompt(lg).mean(), progress=False)
    assert torch.allclose(a.scores, b.scores, atol=1e-6)


@pytest.fixture(scope="module")
def tiny_mlp_model():
    """A random two-layer pre-norm model with MLPs (the toy model is attention-only)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=32, d_vocab=40, n_ctx=12,
        act_fn="gelu", normalization_type="LN", model_name="tiny-mlp",
    )  # fmt: skip
    return HookedTransformer(cfg)


def naive_ig_activations(model, clean, corrupt, metric, steps, average):
    """EAP-IG on activations as a plain loop: for each block (the input, a layer's heads via
    their z, an MLP) and each point k/steps, one full run with that block moved from corrupt to
    clean, the gradient at every receiver input; an edge's gradient averaged over its sender's
    block's runs ("sender-runs") or over every run ("all-runs")."""
    layout = GraphLayout.from_model(model)
    with torch.no_grad(), graph_mode(model):
        _, cc = model.run_with_cache(clean)
        _, kc = model.run_with_cache(corrupt)
    names = [n.name for n in layout.senders]
    delta = torch.stack([sender_value(model, kc, n) - sender_value(model, cc, n) for n in names], 2)
    blocks = [("blocks.0.hook_resid_pre", [0])]
    for layer in range(model.cfg.n_layers):
        heads = [i for i, n in enumerate(names) if n.startswith(f"L{layer}H")]
        blocks.append((f"blocks.{layer}.attn.hook_z", heads))
        if not model.cfg.attn_only:
            blocks.append((f"blocks.{layer}.hook_mlp_out", [names.index(f"L{layer}.mlp")]))
    receivers = [receiver_hook(model, r.name) for r in layout.receivers]
    block_grads = []
    for hook_name, _ in blocks:
        total = torch.zeros(*clean.shape, len(receivers), model.cfg.d_model)
        for k in range(1, steps + 1):
            alpha = k / steps
            point = kc[hook_name] + alpha * (cc[hook_name] - kc[hook_name])
            kept: dict[str, torch.Tensor] = {}
            hooks = [(hook_name, lambda act, hook, p=point: p.clone().requires_grad_(True))]
            for name in {n for n, _ in receivers}:
                hooks.append((name, lambda act, hook, kept=kept: kept.setdefault(hook.name, act)))
            with torch.enable_grad(), graph_mode(model), model.hooks(fwd_hooks=hooks):
                value = metric(model(clean))
                order = sorted(kept)
                found = torch.autograd.grad(value, [kept[n] for n in order], allow_unused=True)
                grads = dict(zip(order, found, strict=True))
            for r, (name, index) in enumerate(receivers):
                if grads[name] is not None:  # None: upstream of the moved block, cut off
                    total[:, :, r] += grads[name][index].detach()
        block_grads.append(total / steps)
    scores = torch.zeros(len(names), len(receivers))
    mean_all = sum(block_grads) / len(block_grads)
    for (_, senders), grads in zip(blocks, block_grads, strict=True):
        use = mean_all if average == "all-runs" else grads
        for s in senders:
            scores[s] = torch.einsum("bpd,bprd->r", delta[:, :, s], use)
    return torch.where(layout.valid, scores, torch.zeros(()))


@pytest.mark.parametrize("average", ["sender-runs", "all-runs"])
@pytest.mark.parametrize("model_name", ["toy", "tiny_mlp_model"])
def test_eap_ig_activations_batched_points_equal_naive_loop(model_name, average, request):
    """The batched, block-started runs (and the one backward pass through the clean prefix for
    "all-runs") give every edge the score of the plain loop over blocks and points."""
    model = request.getfixturevalue(model_name)
    generator = torch.Generator().manual_seed(5)
    clean = torch.randint(1, min(500, model.cfg.d_vocab), (2, 7), generator=generator)
    corrupt = clean.clone()
    corrupt[:, 2:4] = torch.randint(1, min(500, model.cfg.d_vocab), (2, 2), generator=generator)
    graph = mk.edge_attribution(
        model, clean, corrupt, toy_metric, method="eap-ig-activations", steps=3,
        ig_average=average, progress=False,
    )  # fmt: skip
    expected = naive_ig_activations(model, clean, corrupt, toy_metric, 3, average)
    torch.testing.assert_close(graph.scores, expected, atol=2e-5, rtol=1e-4)
    assert ("all runs" in graph.method) == (average == "all-runs")


def test_ig_average_is_checked(toy, toy_runs):
    clean, corrupt = toy_runs
    with pytest.raises(mk.errors.InvalidArgumentError, match="Did you mean"):
        mk.edge_attribution(toy, clean, corrupt, toy_metric, method="eap-ig-activations",
                            ig_average="all-run")  # fmt: skip
    with pytest.raises(ValueError, match="eap-ig-activations"):
        mk.edge_attribution(toy, clean, corrupt, toy_metric, method="eap", ig_average="all-runs")


def test_a_method_registered_in_a_test_runs_through_edge_attribution(toy, toy_runs):
    from mechkit.graph import EDGE_METHODS, EdgeScores, register_edge_method, unregister_edge_method

    clean, corrupt = toy_runs
    seen = {}

    @register_edge_method(
        "constant", description="every edge scores `value`", options={"value": 2.0}
    )
    def constant(model, setup, *, progress, value):
        seen["prompts"] = setup.n_prompts
        # nonzero on impossible edges too: edge_attribution must zero them
        return EdgeScores(torch.full(setup.layout.valid.shape, value), 1.25, detail=f"{value}")

    try:
        with pytest.raises(mk.InvalidArgumentError, match="registered already"):
            register_edge_method("constant", description="again")(constant)
        graph = mk.edge_attribution(toy, clean, corrupt, toy_metric, method="constant", value=3.0)
        assert EDGE_METHODS["constant"].options == {"value": 2.0}
    finally:
        unregister_edge_method("constant")
    valid = graph.layout.valid
    torch.testing.assert_close(graph.scores, 3.0 * valid.float())
    assert (graph.method, graph.clean_score, seen["prompts"]) == ("constant (3.0)", 1.25, 3)
    with torch.no_grad():
        assert graph.ablated_score == pytest.approx(float(toy_metric(toy(corrupt))), abs=1e-5)
    assert "constant" not in EDGE_METHODS
    with pytest.raises(mk.InvalidArgumentError, match="Did you mean 'exact'"):
        mk.edge_attribution(toy, clean, corrupt, toy_metric, method="exac")


def test_options_a_method_does_not_take(toy, toy_runs):
    clean, corrupt = toy_runs
    with pytest.raises(mk.InvalidArgumentError, match="options of method 'exact'"):
        mk.edge_attribution(toy, clean, corrupt, toy_metric, method="exact", alpha=1)
    with pytest.raises(mk.InvalidArgumentError, match="steps"):
        mk.edge_attribution(toy, clean, corrupt, toy_metric, method="eap-ig-inputs", steps=0)
    plain = mk.edge_attribution(toy, clean, corrupt, toy_metric, method="eap")
    with pytest.warns(DeprecationWarning, match="steps has no effect"):
        old = mk.edge_attribution(toy, clean, corrupt, toy_metric, method="eap", steps=5)
    torch.testing.assert_close(old.scores, plain.scores)


def test_methods_tuple_is_a_deprecated_view_of_the_registry():
    with pytest.warns(DeprecationWarning, match="EDGE_METHODS"):
        names = mk.graph.METHODS
    assert names == tuple(mk.graph.EDGE_METHODS) and "eap-ig-inputs" in names


def test_edge_vocabulary_direction_and_ablations(toy, toy_runs):
    clean, corrupt = toy_runs
    with pytest.raises(mk.InvalidArgumentError, match="direction='noising'"):
        mk.edge_attribution(toy, clean, corrupt, toy_metric, direction="denoising")
    with pytest.raises(mk.InvalidArgumentError, match="Did you mean 'mean'"):
        mk.edge_attribution(toy, clean, corrupt, toy_metric, ablation="maen")
    with pytest.raises(mk.InvalidArgumentError, match="reference"):
        mk.edge_attribution(toy, clean, corrupt, toy_metric, ablation="zero", reference=clean)
    with pytest.raises(mk.InvalidArgumentError, match="corrupt prompts"):
        mk.edge_attribution(toy, clean, None, toy_metric)
    with pytest.raises(mk.InvalidArgumentError, match="memory budget"):
        mk.edge_attribution(toy, clean, corrupt, toy_metric, memory_budget="lots")
    noising = mk.edge_attribution(toy, clean, corrupt, toy_metric, direction="noising")
    default = mk.edge_attribution(toy, clean, corrupt, toy_metric)
    torch.testing.assert_close(noising.scores, default.scores)


def test_mean_ablation_is_over_the_reference_prompts(toy, toy_runs):
    """Every edge ablated to the reference mean = a run whose embeddings and every head's z are
    their per-position means over the reference prompts (head outputs are linear in z)."""
    clean, corrupt = toy_runs
    reference = torch.flip(clean, [1])
    graph = mk.edge_attribution(
        toy, clean, corrupt, toy_metric, ablation="mean", reference=reference
    )
    _, cache = toy.run_with_cache(reference)
    hooks = [("blocks.0.hook_resid_pre", cache["blocks.0.hook_resid_pre"].mean(0, keepdim=True))]
    for layer in range(toy.cfg.n_layers):
        z = f"blocks.{layer}.attn.hook_z"
        hooks.append((z, cache[z].mean(0, keepdim=True)))
    fwd = [(name, lambda act, hook, m=mean: m.expand_as(act).clone()) for name, mean in hooks]
    with torch.no_grad(), toy.hooks(fwd_hooks=fwd):
        expected = float(toy_metric(toy(clean)))
    assert graph.ablated_score == pytest.approx(expected, abs=1e-4)
    by_default = mk.edge_attribution(toy, clean, corrupt, toy_metric, ablation="mean")
    explicit = mk.edge_attribution(
        toy, clean, corrupt, toy_metric, ablation="mean", reference=corrupt
    )
    torch.testing.assert_close(by_default.scores, explicit.scores)
    assert by_default.ablation == "mean"


def test_evaluations_share_the_vocabulary_and_rank_rule(toy, toy_runs):
    clean, corrupt = toy_runs
    graph = mk.edge_attribution(toy, clean, corrupt, toy_metric)
    circuit = graph.top_edges(20)
    with pytest.raises(mk.InvalidArgumentError, match="direction='noising'"):
        mk.evaluate_circuit(toy, circuit, clean, corrupt, toy_metric, direction="denoising")
    ev = mk.evaluate_circuit(toy, circuit, clean, corrupt, toy_metric, memory_budget="64MB")
    scores = {"circuit": ev.circuit_score, "model": ev.model_score, "ablated": ev.ablated_score}
    assert ev.top() == sorted(scores.items(), key=lambda kv: -abs(kv[1]))
    curve = mk.faithfulness_curve(toy, graph, clean, corrupt, toy_metric, sizes=[5, 20, 81])
    flat = [(s, float(curve.faithfulness[0, i])) for i, s in enumerate(curve.sizes)]
    expected = sorted(flat, key=lambda kv: -kv[1])
    assert [(lab["size"], v) for lab, v in curve.top(absolute=False)] == expected
    assert curve.faithfulness[0, 1] == pytest.approx(ev.faithfulness, abs=1e-5)
    assert len(ev.plot().data) == 1 and len(curve.plot().data) == 1


@pytest.mark.parametrize("normalized", [False, True])
def test_eap_ig_activations_with_answer_positions_equals_naive_loop(toy, normalized):
    """A LogitDiff (or its Normalized) read at positions other than the last: the runs unembed
    only those positions, the plain loop every position."""
    generator = torch.Generator().manual_seed(6)
    clean = torch.randint(1, 500, (2, 7), generator=generator)
    corrupt = clean.clone()
    corrupt[:, 1:3] = torch.randint(1, 500, (2, 2), generator=generator)
    metric = mk.LogitDiff(torch.tensor([5, 9]), torch.tensor([8, 2]), torch.tensor([4, 6]))
    if normalized:
        with torch.no_grad():
            metric = mk.metrics.Normalized.from_runs(metric, toy(clean), toy(corrupt))
    graph = mk.edge_attribution(
        toy, clean, corrupt, metric, method="eap-ig-activations", steps=3, progress=False
    )
    # what edge attribution differentiates: the mean over prompts of each prompt's value
    mean = lambda logits: metric.per_prompt(logits).mean()  # noqa: E731
    expected = naive_ig_activations(toy, clean, corrupt, mean, 3, "sender-runs")
    torch.testing.assert_close(graph.scores, expected, atol=2e-5, rtol=1e-4)


def test_eap_ig_activations_with_one_step_is_eap(toy, toy_runs):
    """One point per block is the clean run for every block (the shared clean point alone)."""
    clean, corrupt = toy_runs
    one = mk.edge_attribution(
        toy, clean, corrupt, toy_metric, method="eap-ig-activations", steps=1, progress=False
    )
    eap = mk.edge_attribution(toy, clean, corrupt, toy_metric, method="eap", progress=False)
    torch.testing.assert_close(one.scores, eap.scores, atol=1e-6, rtol=1e-5)
    assert one.clean_score == pytest.approx(eap.clean_score, abs=1e-5)
