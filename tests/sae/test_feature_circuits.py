"""Sparse feature circuits: node scores equal single-dictionary attribution patching, every
node's edges sum to its node score, an edge equals the naive chain-rule term with the paths
through other dictionaries frozen, evaluation's extremes are the clean and corrupt runs, and the
graph tools work on latents."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

import mechkit as mk
from mechkit.core.results import rank
from mechkit.errors import InvalidSiteError, MechkitError
from mechkit.graph.feature_layout import FeatureLayout
from mechkit.sae import SAEConfig, SparseDictionary, attribute_latents
from tests.conftest import hook_count


@pytest.fixture(scope="module")
def tiny():
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=16, d_head=4, n_heads=4, d_mlp=32, d_vocab=30, n_ctx=12,
        act_fn="gelu", normalization_type="LN", dtype=torch.float64, seed=3,
    )  # fmt: skip
    model = HookedTransformer(cfg)
    model.eval()

    def make(name, hook, arch, d_sae, out_hook=None, **kw):
        extra = {"d_out": 16, "out_hook_name": out_hook} if out_hook else {}
        cfg = SAEConfig(architecture=arch, d_in=16, d_sae=d_sae, hook_name=hook, **extra, **kw)
        sae = SparseDictionary.from_config(cfg, seed=len(name)).double()
        with torch.no_grad():  # biases away from zero so that latents switch on and off
            sae.b_enc.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(d_sae))
        return sae

    saes = {
        "r0": make("r0", "blocks.0.hook_resid_post", "topk", 24, k=6),
        "a1": make("a1x", "blocks.1.hook_attn_out", "relu", 18),
        "m1": make(
            "m1xx",
            "blocks.1.ln2.hook_normalized",
            "relu",
            20,
            out_hook="blocks.1.hook_mlp_out",
            skip=True,
        ),  # fmt: skip
        "r1": make("r1xxx", "blocks.1.hook_resid_post", "relu", 22),
    }
    g = torch.Generator().manual_seed(5)
    clean = torch.randint(0, 30, (3, 7), generator=g)
    corrupt = clean.clone()
    corrupt[:, 1:4] = torch.randint(0, 30, (3, 3), generator=g)
    return model, saes, clean, corrupt


def metric(logits):
    return (logits[:, -1, 3] - logits[:, -1, 8]).mean()


@pytest.fixture(scope="module")
def full(tiny):
    model, saes, clean, corrupt = tiny
    return mk.feature_circuit(model, saes, clean, corrupt, metric, latents_per_dictionary=100)


def test_node_scores_equal_attribution_patching_of_each_dictionary_alone(tiny, full):
    model, saes, clean, corrupt = tiny
    for name, sae in saes.items():
        alone = attribute_latents(model, sae, clean, corrupt, metric, direction="noising")
        expected = alone.scores - alone.clean_score  # first-order terms (float32)
        got = torch.tensor(
            [full.node_scores[f"{name}.f{i}"] for i in range(sae.cfg.d_sae)]
            + [full.node_scores[f"{name}.err"]],
            dtype=torch.float32,
        )
        assert got.abs().max() > 1e-3, "the test needs latents with an effect"
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_each_nodes_edges_sum_to_its_node_score(full):
    layout = full.layout
    for s, node in enumerate(layout.senders):
        total = float(full.scores[s].double().sum())
        assert total == pytest.approx(full.node_scores[node.name], rel=1e-4, abs=1e-7), node.name
    assert abs(full.node_scores["input"]) > 1e-5


def test_edge_equals_the_chain_rule_term_with_other_dictionaries_frozen(tiny, full):
    """edge(r0.f_i -> m1.f_j) = sum G_j * d f_j / d alpha, r0's output moved by alpha * delta_i *
    W_dec[i], a1's output frozen at its clean value, G_j = dM/df_j from the clean run."""
    model, saes, clean, corrupt = tiny
    r0, m1 = saes["r0"], saes["m1"]
    h_r0, h_a1 = "blocks.1.hook_resid_pre", "blocks.1.hook_attn_out"
    with torch.no_grad():
        _, c_clean = model.run_with_cache(clean)
        _, c_corr = model.run_with_cache(corrupt)
    f_clean = r0.encode(c_clean["blocks.0.hook_resid_post"])
    f_corr = r0.encode(c_corr["blocks.0.hook_resid_post"])
    e_clean = c_clean["blocks.0.hook_resid_post"] - r0(c_clean["blocks.0.hook_resid_post"])
    e_corr = c_corr["blocks.0.hook_resid_post"] - r0(c_corr["blocks.0.hook_resid_post"])

    # G = dM/df of the transcoder's latents on the clean run, its error held fixed
    x_in = c_clean["blocks.1.ln2.hook_normalized"]
    f_leaf = m1.encode(x_in).detach().requires_grad_(True)
    err = c_clean["blocks.1.hook_mlp_out"] - m1(x_in)
    out = lambda a, hook: m1.decode(f_leaf) + x_in @ m1.W_skip + err  # noqa: E731
    with model.hooks(fwd_hooks=[("blocks.1.hook_mlp_out", out)]):
        (big_g,) = torch.autograd.grad(metric(model(clean)), f_leaf)

    def naive(move, j):
        alpha = torch.zeros((), dtype=torch.float64, requires_grad=True)
        held = {}
        hooks = [
            (h_r0, lambda a, hook: a + alpha * move),
            (h_a1, lambda a, hook: c_clean[h_a1]),
            ("blocks.1.ln2.hook_normalized", lambda a, hook: held.update(f=m1.encode(a))),
        ]
        with model.hooks(fwd_hooks=hooks):
            model(clean)
        seed = (big_g[..., j] * held["f"][..., j]).sum()
        return float(torch.autograd.grad(seed, alpha)[0])

    layout = full.layout
    # latents with a gradient after position 0 (the runs differ from position 1 on)
    active_m1 = (big_g[:, 1:].abs().sum((0, 1)) > 0).nonzero()[:, 0].tolist()
    moved = ((f_corr - f_clean).abs().sum((0, 1)) > 0).nonzero()[:, 0].tolist()
    checked = 0
    for i in moved[:4]:
        delta = (f_corr - f_clean)[..., i : i + 1] * r0.W_dec[i]
        for j in active_m1[:3]:
            s, r = layout.edge_index(f"r0.f{i}->m1.f{j}")
            want = naive(delta, j)
            assert float(full.scores[s, r]) == pytest.approx(want, rel=1e-4, abs=1e-8)
            checked += abs(want) > 1e-6
    wants = []
    for j in active_m1[:6]:
        s, r = layout.edge_index(f"r0.err->m1.f{j}")
        wants.append(naive(e_corr - e_clean, j))
        assert float(full.scores[s, r]) == pytest.approx(wants[-1], rel=1e-4, abs=1e-8)
    assert checked >= 3 and max(abs(w) for w in wants) > 1e-6, wants


def test_edges_exist_only_where_no_stream_dictionary_intervenes(full):
    layout = full.layout
    assert [d.name for d in layout.dictionaries] == ["r0", "a1", "m1", "r1"]

    def ok(edge):
        s, r = layout._sender_map[edge.split("->")[0]], layout._receiver_map[edge.split("->")[1]]
        return bool(layout.valid[s, r])

    assert ok("input->r0.err") and not ok("input->a1.err") and not ok("input->logits")
    assert ok("r0.err->a1.err") and ok("r0.err->m1.err") and ok("r0.err->r1.err")
    assert not ok("r0.err->logits") and ok("a1.err->m1.err") and not ok("m1.err->a1.err")
    assert ok("m1.err->r1.err") and ok("r1.err->logits") and not ok("r1.err->r1.err")
    # scores off the valid edges are zero, and every score on them was computed
    assert float(full.scores[~layout.valid].abs().sum()) == 0.0


def test_evaluation_extremes_are_the_clean_and_corrupt_runs(tiny, full):
    model, saes, clean, corrupt = tiny
    every = [n for n in full.layout.nodes if n not in ("input", "logits")]
    result = mk.evaluate_feature_circuit(model, saes, [every, []], clean, corrupt, metric)
    with torch.no_grad():
        m_clean, m_corrupt = float(metric(model(clean))), float(metric(model(corrupt)))
    assert result.model_score == pytest.approx(m_clean, abs=1e-9)
    assert result.ablated_score == pytest.approx(m_corrupt, abs=1e-9)
    assert result.rows[0][1] == pytest.approx(1.0) and result.rows[1][1] == pytest.approx(0.0)
    frame = result.to_dataframe()
    assert list(frame["n_nodes"]) == [len(every), 0]
    assert result.plot().data


def test_kept_nodes_compute_from_what_reaches_them(tiny):
    """Keep r0 whole and r1's latent i and error; a1 and m1 ablated (to the corrupt run). Then
    block 1's output is clean resid + corrupt attention and MLP outputs, r1's latent i and error
    are computed from it, r1's other latents carry their corrupt values."""
    model, saes, clean, corrupt = tiny
    r1 = saes["r1"]
    with torch.no_grad():
        _, c_cl = model.run_with_cache(clean)
        _, c_co = model.run_with_cache(corrupt)
        x = c_cl["blocks.1.hook_resid_pre"] + c_co["blocks.1.hook_attn_out"]
        x = x + c_co["blocks.1.hook_mlp_out"]
        f_co = r1.encode(c_co["blocks.1.hook_resid_post"])
        i = int((r1.encode(x) - f_co).abs().sum((0, 1)).argmax())
        f = f_co.clone()
        f[..., i] = r1.encode(x)[..., i]
        want = float(metric(model.unembed(model.ln_final(r1.decode(f) + x - r1(x)))))
    kept = [f"r0.f{j}" for j in range(24)] + ["r0.err", f"r1.f{i}", "r1.err"]
    result = mk.evaluate_feature_circuit(model, saes, kept, clean, corrupt, metric)
    assert result.rows[0][2] == pytest.approx(want, abs=1e-9)
    assert want != pytest.approx(result.model_score) and want != pytest.approx(result.empty_score)


def test_graph_tools_work_on_latents(tiny, tmp_path):
    model, saes, clean, corrupt = tiny
    graph = mk.feature_circuit(model, saes, clean, corrupt, metric, latents_per_dictionary=4)
    assert all(len(chosen) == 4 for chosen in graph.layout.latents)
    alone = attribute_latents(model, saes["r0"], clean, corrupt, metric, direction="noising")
    ranked = (alone.scores[:-1] - alone.clean_score).abs().argsort(descending=True)
    assert list(graph.layout.latents[0]) == ranked[:4].tolist()  # the strongest latents kept
    circuit = graph.top_edges(12).prune()
    assert 0 < circuit.n_edges <= 12
    assert "logits" in circuit.nodes_in_circuit()
    greedy = graph.greedy(6)
    assert greedy.n_edges == 6
    assert circuit.plot().data and "<svg" in circuit.to_svg() and "digraph" in circuit.to_dot()
    frame = circuit.to_dataframe()
    assert {"src", "dst", "score"} <= set(frame.columns)
    path = circuit.save(tmp_path / "features.json")
    back = mk.CircuitGraph.load(path)
    assert isinstance(back.layout, FeatureLayout) and back.layout.same_as(circuit.layout)
    assert torch.allclose(back.scores, circuit.scores) and back.node_scores == circuit.node_scores
    assert back.edge_names() == circuit.edge_names()


def test_mean_and_zero_ablation_and_batches(tiny):
    model, saes, clean, corrupt = tiny
    bound = mk.LogitDiff(torch.full((3,), 3), torch.full((3,), 8))  # the metric, sliceable
    whole = mk.feature_circuit(model, saes, clean, None, bound, ablation="zero")
    split = mk.feature_circuit(model, saes, clean, None, bound, ablation="zero", batch_size=2)
    torch.testing.assert_close(whole.scores, split.scores, atol=1e-6, rtol=1e-5)
    assert whole.ablated_score is None
    mean = mk.feature_circuit(model, saes, clean, None, bound, ablation="mean")
    with pytest.raises(MechkitError, match="Metric"):
        mk.feature_circuit(model, saes, clean, None, metric, ablation="zero", batch_size=2)
    assert not torch.allclose(mean.scores, whole.scores)


def test_bad_input_is_refused_and_leaves_no_hooks(tiny):
    model, saes, clean, corrupt = tiny
    before = hook_count(model)
    q = SparseDictionary.from_config(
        SAEConfig(architecture="relu", d_in=16, d_sae=8, hook_name="blocks.0.hook_resid_mid")
    ).double()
    q.cfg = q.cfg.replace(hook_name="blocks.0.attn.hook_q")
    with pytest.raises(InvalidSiteError, match="hook_resid_post"):
        mk.feature_circuit(model, [q], clean, corrupt, metric)
    with pytest.raises(MechkitError, match="one dictionary writing each hook"):
        mk.feature_circuit(model, {"x": saes["r0"], "y": saes["r0"]}, clean, corrupt, metric)

    def broken(logits):
        raise RuntimeError("metric failed")

    with pytest.raises(RuntimeError, match="metric failed"):
        mk.feature_circuit(model, saes, clean, corrupt, broken)
    graph = mk.feature_circuit(model, saes, clean, corrupt, metric, latents_per_dictionary=2)
    with pytest.raises(MechkitError, match="evaluate_feature_circuit"):
        mk.evaluate_circuit(model, graph.top_edges(3), clean, corrupt, metric)
    with pytest.raises(MechkitError, match=r"dictionaries \['a1', 'm1', 'r0', 'r1'\]"):
        mk.evaluate_feature_circuit(model, saes, ["r9.f1"], clean, corrupt, metric)
    assert hook_count(model) == before


def test_one_ig_step_is_attribution(tiny, full):
    model, saes, clean, corrupt = tiny
    one = mk.feature_circuit(
        model, saes, clean, corrupt, metric, latents_per_dictionary=100, method="ig", steps=1
    )
    torch.testing.assert_close(one.scores, full.scores, atol=1e-6, rtol=1e-5)
    assert one.node_scores == pytest.approx(full.node_scores, rel=1e-6, abs=1e-9)


def test_ig_node_scores_are_complete(tiny):
    """Integrated gradients sum to the whole change: a stream dictionary's latents and error
    moved to the corrupt run (or the input alone) turn the clean run into the corrupt one, so
    their IG scores add up to M(corrupt) - M(clean), the Riemann error shrinking like 1/steps."""
    model, saes, clean, corrupt = tiny
    with torch.no_grad():
        change = float(metric(model(corrupt)) - metric(model(clean)))
    misses = {}
    for steps in (8, 64):
        g = mk.feature_circuit(
            model, saes, clean, corrupt, metric, latents_per_dictionary=100, method="ig",
            steps=steps,
        )  # fmt: skip
        for name in ("r0", "r1", "input"):
            total = sum(v for k, v in g.node_scores.items() if k.split(".")[0] == name)
            misses[name, steps] = abs(total - change)
        assert g.method == f"sparse feature circuit (integrated gradients, {steps} steps)"
    assert abs(change) > 0.1
    for name in ("r0", "r1", "input"):
        assert misses[name, 64] < 0.03 * abs(change), misses
        assert misses[name, 64] < misses[name, 8] / 4, misses


def test_batched_receivers_equal_one_backward_pass_per_receiver(tiny, full, monkeypatch):
    """Edges from stacked receivers (one batched backward pass, chunked) equal the scores of
    one backward pass per receiving node, the old loop; the batched path really ran."""
    import mechkit.sae.feature_edges as fc

    model, saes, clean, corrupt = tiny
    calls = {"batched": 0}
    real = torch.autograd.grad

    def spy(*args, **kwargs):
        calls["batched"] += bool(kwargs.get("is_grads_batched"))
        return real(*args, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("fell back to one pass per receiver")

    monkeypatch.setattr(fc, "_grad_per_seed", refuse)
    monkeypatch.setattr(torch.autograd, "grad", spy)
    monkeypatch.setattr(fc, "RECEIVER_BYTES", 3 * 7 * 60 * 8 * 5)  # chunks of a few receivers
    chunked = mk.feature_circuit(model, saes, clean, corrupt, metric, latents_per_dictionary=100)
    monkeypatch.setattr(torch.autograd, "grad", real)
    assert calls["batched"] > len(saes)  # several chunks per dictionary

    def one_per_receiver(outputs, inputs, seeds):
        rows = []
        for i in range(seeds[0].shape[0]):
            seed = sum((s[i] * o).sum() for s, o in zip(seeds, outputs, strict=True))
            rows.append(real(seed, inputs, retain_graph=True, allow_unused=True))
        return [
            None if rows[0][j] is None else torch.stack([r[j] for r in rows])
            for j in range(len(inputs))
        ]

    monkeypatch.setattr(fc, "_batched_grad", one_per_receiver)
    loop = mk.feature_circuit(model, saes, clean, corrupt, metric, latents_per_dictionary=100)
    torch.testing.assert_close(chunked.scores, loop.scores, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(full.scores, loop.scores, rtol=1e-9, atol=1e-12)
    assert bool((loop.scores != 0).any())


def test_evaluation_names_its_ablated_score_as_circuit_evaluation_does(tiny, full):
    """ablated_score (CircuitEvaluation's name); empty_score still reads, with a warning; .top
    ranks circuits by faithfulness with the core's rule."""
    model, saes, clean, corrupt = tiny
    every = [n for n in full.layout.nodes if n not in ("input", "logits")]
    result = mk.evaluate_feature_circuit(model, saes, [[], every], clean, corrupt, metric)
    with pytest.warns(DeprecationWarning, match="ablated_score"):
        assert result.empty_score == result.ablated_score
    assert result.top(1) == [(1, pytest.approx(1.0))]
    assert result.top() == rank([0, 1], [r[1] for r in result.rows])


def test_mean_over_one_reference_prompt_equals_the_corrupt_ablation_with_it(tiny):
    """ablation="mean" over reference prompts: with one reference prompt of the clean prompt's
    length the mean is that prompt's values at each position, so the graph is the one of
    ablation="corrupt" with that prompt as the corruption."""
    model, saes, clean, corrupt = tiny
    kw = {"latents_per_dictionary": 5, "progress": False}
    by_corrupt = mk.feature_circuit(model, saes, clean[:1], corrupt[:1], metric, **kw)
    by_mean = mk.feature_circuit(
        model, saes, clean[:1], None, metric, ablation="mean", reference=corrupt[:1], **kw
    )
    assert by_mean.node_scores == pytest.approx(by_corrupt.node_scores, rel=1e-6, abs=1e-9)
    torch.testing.assert_close(by_mean.scores, by_corrupt.scores, rtol=1e-5, atol=1e-7)
    assert by_mean.ablation == "mean" and by_mean.ablated_score is None


def test_feature_circuit_speaks_the_cores_vocabulary(tiny):
    """direction is "noising" only (the scores are gradients at the clean run); "resample" is
    not offered; reference= only with "mean"; evaluate_feature_circuit takes the graph's own
    ablation when none is given, as evaluate_circuit does."""
    model, saes, clean, corrupt = tiny
    before = hook_count(model)
    with pytest.raises(MechkitError, match="direction"):
        mk.feature_circuit(model, saes, clean, corrupt, metric, direction="denoising")
    with pytest.raises(MechkitError, match="ablation"):
        mk.feature_circuit(model, saes, clean, corrupt, metric, ablation="resample")
    with pytest.raises(MechkitError, match="reference"):
        mk.feature_circuit(model, saes, clean, corrupt, metric, reference=corrupt)
    graph = mk.feature_circuit(
        model, saes, clean, None, metric, ablation="zero", latents_per_dictionary=2,
        progress=False,
    )  # fmt: skip
    result = mk.evaluate_feature_circuit(model, saes, graph.top_edges(3), clean, None, metric)
    assert result.ablation == "zero"
    assert hook_count(model) == before
