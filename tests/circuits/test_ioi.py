"""The IOI and greater-than reproductions: their datasets, metrics and ablation machinery against
direct computations. (The whole IOI pipeline runs in the demo, whose test checks its report.)"""

from __future__ import annotations

import pytest
import torch

import mechkit as mk
from circuits import greater_than, ioi


@pytest.fixture(scope="module")
def data(smollm2):
    return ioi.ioi_dataset(smollm2, 30, seed=1)


@pytest.mark.slow
def test_ioi_dataset_follows_the_paper(smollm2, data):
    assert len(ioi.BABA_TEMPLATES) == 15
    assert set(data.templates) == set(range(15))
    assert set(data.orders) == {"BABA", "ABBA"}
    pairs = data.pairs
    assert pairs.is_aligned  # p_ABC keeps every token position
    for i in range(len(data)):
        clean = smollm2.to_str_tokens(pairs.clean_tokens[i, : int(pairs.clean_lengths[i])])
        corrupt = smollm2.to_str_tokens(pairs.corrupt_tokens[i, : int(pairs.corrupt_lengths[i])])
        io = smollm2.to_string(pairs.answer[i : i + 1])
        s = smollm2.to_string(pairs.wrong[i : i + 1])
        assert clean[data.io[i]] == io and clean[data.s1[i]] == s and clean[data.s2[i]] == s
        assert data.s1[i] < data.s2[i] and data.end[i] == len(clean) - 1
        # BABA puts S first, ABBA puts IO first
        assert (data.io[i] < data.s1[i]) == (data.orders[i] == "ABBA")
        # p_ABC: three different names, none of them IO or S, at the same positions
        names = {corrupt[data.io[i]], corrupt[data.s1[i]], corrupt[data.s2[i]]}
        assert len(names) == 3 and not names & {io, s}
        others = [j for j in range(len(clean)) if j not in (data.io[i], data.s1[i], data.s2[i])]
        assert [clean[j] for j in others] == [corrupt[j] for j in others]
    again = ioi.ioi_dataset(smollm2, 30, seed=1)
    assert again.pairs.clean_texts == pairs.clean_texts  # the seed reproduces it


@pytest.mark.slow
def test_mean_ablation_score_identities(smollm2):
    data = ioi.ioi_dataset(smollm2, 8, seed=1)  # identities: a few prompts suffice
    metric = mk.LogitDiff.from_pairs(data.pairs)
    means = ioi._template_means(smollm2, data)
    scores = ioi._ablated_scores_fn(smollm2, data, metric, means)

    def score(kept):  # one head set: one pass
        return scores([kept])[0]

    everything = [(a, b) for a in range(smollm2.cfg.n_layers) for b in range(smollm2.cfg.n_heads)]
    with torch.no_grad():
        assert score(everything) == pytest.approx(
            float(metric(smollm2(data.pairs.clean_tokens))), abs=1e-4
        )
    # one head mean-ablated equals patching its z with its template's p_ABC mean by hand
    layer, head = 20, 3
    rows = torch.tensor(data.templates) == data.templates[0]
    with torch.no_grad(), mk.capture(smollm2, mk.Site("z", layer=layer)) as acts:
        smollm2(data.pairs.corrupt_tokens)
    length = int(data.pairs.corrupt_lengths[0])
    mean = acts[mk.Site("z", layer=layer)][rows, :length, head].mean(0)
    torch.testing.assert_close(means[layer][0, :length, head], mean)
    expected_value = means[layer][:, :, head]
    with (
        torch.no_grad(),
        mk.intervene(smollm2, mk.Patch(mk.Site("z", layer=layer, head=head), expected_value)),
    ):
        expected = float(metric(smollm2(data.pairs.clean_tokens)))
    kept = [h for h in everything if h != (layer, head)]
    assert score(kept) == pytest.approx(expected, abs=1e-4)
    # several head sets in one pass (the prompts repeated once per set) = one pass per set
    together = scores([kept, everything, [], kept])
    assert together == pytest.approx([expected, score(everything), score([]), expected], abs=1e-4)
    # sets started from a reference run at their first differing layer = sets run from the
    # start (a circuit, the circuit without one head, without a layer's heads, the circuit
    # itself, and the empty set, which differs from it at layer 0)
    circuit = [(3, 1), (8, 4), (15, 2), (20, 3), (22, 7), (27, 0)]
    sets = [circuit, [h for h in circuit if h != (20, 3)], [h for h in circuit if h[0] != 8], []]
    from_start = [score(kept) for kept in sets]
    assert scores(sets, reference=circuit) == pytest.approx(from_start, abs=1e-4)


def test_year_metric_equals_a_direct_sum():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 50, generator=generator)
    candidates = torch.arange(10, 20)  # ten "digit" tokens
    tens = torch.tensor([3, 0, 9])
    values = torch.arange(10)
    metric = greater_than.YearMetric(
        values[None] > tens[:, None], values[None] < tens[:, None], candidates,
        torch.tensor([4, 2, 3]),
    )  # fmt: skip
    probs = logits.softmax(-1)
    for i, (pos, d) in enumerate(zip([4, 2, 3], tens.tolist(), strict=True)):
        p = probs[i, pos, 10:20]
        assert float(metric.per_prompt(logits)[i]) == pytest.approx(
            float(p[d + 1 :].sum() - p[:d].sum()), abs=1e-6
        )
    assert metric.select([0, 2]).per_prompt(logits[[0, 2]]).shape == (2,)


@pytest.mark.slow
def test_greater_than_adapts_to_the_tokenizer(smollm2):
    pairs, metric, yys, mode = greater_than.dataset(smollm2, 12, seed=0)
    assert mode == "one-digit"  # SmolLM2 writes years digit by digit
    for text in pairs.clean_texts:  # "... from the year 1732 to the year 17"
        start = text.split("from the year ")[1][:4]
        assert text.endswith(f"to the year {start[:2]}")
    with torch.no_grad():
        clean = float(metric(smollm2(pairs.clean_tokens)))
        corrupt = float(metric(smollm2(pairs.corrupt_tokens)))
    assert clean > 0.2 and corrupt < clean  # later tens digits are preferred, less so after "01"


def test_attention_check_comes_before_the_name_mover_threshold():
    # head (0, 1) has the largest DLA but attends to neither name: it must not set the bar
    attention = [
        [
            {"attn_end_to_io": 0.6, "attn_end_to_s2": 0.1},
            {"attn_end_to_io": 0.002, "attn_end_to_s2": 0.002},
            {"attn_end_to_io": 0.3, "attn_end_to_s2": 0.4},
        ],
        [
            {"attn_end_to_io": 0.15, "attn_end_to_s2": 0.05},
            {"attn_end_to_io": 0.5, "attn_end_to_s2": 0.0},
            {"attn_end_to_io": 0.05, "attn_end_to_s2": 0.0},
        ],
    ]
    passes = ioi._attends_to_io(attention, 0.1)
    assert passes.tolist() == [[True, False, False], [True, True, False]]
    dla = torch.tensor([[1.0, 10.0, 3.0], [0.3, 0.5, 2.0]])
    picked = ioi._pick(dla.masked_fill(~passes, 0.0), 0.4, 4)
    # among the passing heads the best is 1.0: 0.5 passes the 40% bar, 0.3 does not
    assert [cell for cell, _ in picked] == [(0, 0), (1, 1)]
    # relative to an explicit best (the strongest head overall) the bar rises
    assert [cell for cell, _ in ioi._pick(dla, 0.25, 4, best=10.0)] == [(0, 1), (0, 2)]


@pytest.mark.slow
def test_mean_ablations_set_the_heads_to_their_means(smollm2, data):
    means = ioi._template_means(smollm2, data)
    site = mk.Site("z", layer=3)
    edits = ioi._mean_ablations([(3, 1), (3, 4), (5, 0)], [m[:4] for m in means])
    assert len(edits) == 2  # one per layer
    with torch.no_grad(), mk.intervene(smollm2, *edits), mk.capture(smollm2, site) as acts:
        smollm2(data.pairs.clean_tokens[:4])
    with torch.no_grad(), mk.capture(smollm2, site) as clean:
        smollm2(data.pairs.clean_tokens[:4])
    z, z_clean = acts[site], clean[site]
    torch.testing.assert_close(z[:, :, [1, 4]], means[3][:4, :, [1, 4]])
    others = [h for h in range(smollm2.cfg.n_heads) if h not in (1, 4)]
    torch.testing.assert_close(z[:, :, others], z_clean[:, :, others])


def test_report_tables_have_no_empty_cells():
    classes = {
        "name mover": [ioi._evidence(9, 9, dla=1.0, attn_end_to_io=0.5, attn_end_to_s2=0.1)],
        "s-inhibition": [ioi._evidence(7, 3, path_drop_into_movers=0.3)],
    }
    tables = [ioi._records_table(items) for items in classes.values()]
    assert "nan" not in "".join(tables).lower()
    assert "path_drop_into_movers" not in tables[0] and "dla" not in tables[1]
