"""Path patching against a plain two-pass implementation and a hand-built model."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

import mechkit as mk
from mechkit.demo import IOI_PAIRS
from tests.conftest import hook_count

TOL = 1e-4


@pytest.fixture(scope="module")
def pairs(smollm2):
    clean, corrupt, answers, wrongs = (list(x) for x in zip(*IOI_PAIRS[:2], strict=True))
    return mk.PromptPairs.from_lists(smollm2, clean, corrupt, answers, wrongs)


@torch.no_grad()
def slow_path_patch(model, reference, source, metric, sender, receivers):
    """Wang et al.'s two passes, written plainly with one full forward each."""
    _, ref = model.run_with_cache(reference)
    _, src = model.run_with_cache(source)
    n_layers = model.cfg.n_layers
    fwd = [(sender.hook_name, lambda act, hook: _put(act, sender, src[sender.hook_name]))]
    for layer in range(sender.layer + 1, n_layers):
        name = f"blocks.{layer}.attn.hook_z"
        fwd.append((name, lambda act, hook, name=name: ref[name].clone()))
    if receivers is None:  # the path into the logits: the first pass is the answer
        return float(metric(model.run_with_hooks(reference, fwd_hooks=fwd)))
    recorded = {}

    def keep(act, hook):
        recorded[hook.name] = act.clone()

    names = sorted({r.hook_name for r in receivers})
    model.run_with_hooks(reference, fwd_hooks=fwd + [(n, keep) for n in names])
    second = []
    for r in receivers:
        if r.layer <= sender.layer:
            continue
        second.append((r.hook_name, lambda act, hook, r=r: _put(act, r, recorded[r.hook_name])))
    return float(metric(model.run_with_hooks(reference, fwd_hooks=second)))


def _put(act, site, values):
    out = act.clone()
    index = site.index(act.ndim)
    out[index] = values[index]
    return out


RECEIVER_SETS = {
    "final": None,
    "queries": [mk.Site("q", layer=20, head=3), mk.Site("q", layer=23, head=3)],
    "keys and values (shared heads)": [
        mk.Site("k", layer=18, head=2),
        mk.Site("v", layer=21, head=0),
    ],
}


@pytest.mark.parametrize("receivers", list(RECEIVER_SETS), ids=list(RECEIVER_SETS))
def test_equals_the_slow_two_pass_implementation(smollm2, pairs, receivers):
    receiver_sites = RECEIVER_SETS[receivers]
    senders = [
        mk.Site("z", layer=2, head=4),
        mk.Site("z", layer=14, head=3),
        mk.Site("mlp_out", layer=10),
        mk.Site("z", layer=22, head=0),
    ]
    metric = mk.LogitDiff.from_pairs(pairs)
    result = mk.path_patch(
        smollm2,
        pairs,
        senders=senders,
        receivers="resid_final" if receiver_sites is None else receiver_sites,
        progress=False,
    )
    assert result.axes == ("site",) and result.method == "noising"
    for i, sender in enumerate(senders):
        expected = slow_path_patch(
            smollm2, pairs.clean_tokens, pairs.corrupt_tokens, metric, sender, receiver_sites
        )
        assert abs(float(result.scores[i]) - expected) < TOL, (sender, receivers)
    assert hook_count(smollm2) == 0


def test_every_head_as_sender_is_one_call(smollm2, pairs):
    receivers = [mk.Site("q", layer=23, head=3)]
    result = mk.path_patch(
        smollm2,
        pairs,
        senders="heads",
        receivers=receivers,
        layers=[20, 21, 22, 23, 24],
        progress=False,
    )
    assert result.scores.shape == (5, smollm2.cfg.n_heads)
    # senders in the receiver's layer or later cannot reach it: exactly the reference score
    assert torch.equal(result.scores[3:], torch.full((2, 9), result.clean_score))
    metric = mk.LogitDiff.from_pairs(pairs)
    expected = slow_path_patch(
        smollm2,
        pairs.clean_tokens,
        pairs.corrupt_tokens,
        metric,
        mk.Site("z", layer=21, head=7),
        receivers,
    )
    assert abs(float(result.scores[1, 7]) - expected) < TOL


@pytest.fixture(scope="module")
def linear_model():
    """Two attention-only layers, no layer norm: logits are linear in each head's output."""
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=32,
        n_heads=4,
        d_head=8,
        d_vocab=50,
        n_ctx=16,
        attn_only=True,
        normalization_type=None,
        act_fn="relu",
        seed=3,
    )
    model = HookedTransformer(cfg)
    model.eval()
    return model


@torch.no_grad()
def test_path_to_the_logits_is_the_head_output_difference_times_the_unembedding(linear_model):
    model = linear_model
    generator = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 50, (3, 10), generator=generator)
    corrupt = torch.randint(0, 50, (3, 10), generator=generator)
    answer, wrong = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])
    pairs = mk.PromptPairs.from_tokens(clean, corrupt, answer, wrong)
    result = mk.path_patch(model, pairs, senders="heads", progress=False)
    _, ref = model.run_with_cache(clean)
    _, src = model.run_with_cache(corrupt)
    direction = model.W_U[:, answer] - model.W_U[:, wrong]  # (d_model, batch)
    for layer in range(2):
        for head in range(4):
            delta_z = (src["z", layer] - ref["z", layer])[:, -1, head]  # (batch, d_head)
            change = delta_z @ model.W_O[layer, head]  # (batch, d_model)
            expected = result.clean_score + float((change * direction.T).sum(-1).mean())
            assert abs(float(result.scores[layer, head]) - expected) < 1e-4


@torch.no_grad()
def test_a_receiver_that_ignores_its_queries_gets_no_effect(linear_model):
    model = linear_model
    saved = model.blocks[1].attn.W_Q.data.clone()
    model.blocks[1].attn.W_Q.data[0] = 0.0  # head 1.0 reads nothing through its queries
    try:
        generator = torch.Generator().manual_seed(1)
        clean = torch.randint(0, 50, (2, 8), generator=generator)
        corrupt = torch.randint(0, 50, (2, 8), generator=generator)
        pairs = mk.PromptPairs.from_tokens(clean, corrupt, [1, 2], [3, 4])
        into_q = mk.path_patch(
            model,
            pairs,
            senders="heads",
            receivers=[mk.Site("q", layer=1, head=0)],
            progress=False,
        )
        assert torch.allclose(into_q.scores, torch.tensor(into_q.clean_score), atol=1e-6)
        # its keys do not matter either (uniform attention), but its values do
        into_k = mk.path_patch(
            model,
            pairs,
            senders="heads",
            receivers=[mk.Site("k", layer=1, head=0)],
            progress=False,
        )
        assert torch.allclose(into_k.scores, torch.tensor(into_k.clean_score), atol=1e-6)
        into_v = mk.path_patch(
            model,
            pairs,
            senders="heads",
            receivers=[mk.Site("v", layer=1, head=0)],
            progress=False,
        )
        assert not torch.allclose(into_v.scores[0], torch.tensor(into_v.clean_score), atol=1e-4)
    finally:
        model.blocks[1].attn.W_Q.data.copy_(saved)


def test_bad_senders_and_receivers_are_refused(smollm2, pairs):
    with pytest.raises(mk.InvalidSiteError, match="receivers"):
        mk.path_patch(smollm2, pairs, receivers=[mk.Site("z", layer=3, head=1)], progress=False)
    with pytest.raises(mk.InvalidSiteError, match="one head"):
        mk.path_patch(smollm2, pairs, receivers=[mk.Site("q", layer=3)], progress=False)
    with pytest.raises(mk.InvalidSiteError, match="senders"):
        mk.path_patch(smollm2, pairs, senders="neurons", progress=False)
    assert hook_count(smollm2) == 0


@torch.no_grad()
def test_toy_previous_token_head_feeds_the_induction_heads_keys(toy):
    """On repeated random tokens, the layer-0 head that matters most through the induction
    heads' keys is the toy's previous-token head (K-composition, Elhage et al. 2021)."""
    generator = torch.Generator().manual_seed(0)
    segment = torch.randint(1, 500, (4, 10), generator=generator)
    clean = torch.cat([torch.zeros(4, 1, dtype=torch.long), segment, segment[:, :-1]], dim=1)
    corrupt = clean.clone()
    corrupt[:, 1:11] = torch.randint(1, 500, (4, 10), generator=generator)  # break the copy
    pairs = mk.PromptPairs.from_tokens(clean, corrupt, segment[:, -1], corrupt[:, 10])
    receivers = [mk.Site("k", layer=1, head=h) for h in range(4)]
    result = mk.path_patch(toy, pairs, senders="heads", receivers=receivers, progress=False)
    drop = result.clean_score - result.scores[0]  # (head,): layer-0 senders
    previous_token = mk.detect_heads(toy, "previous_token").scores[0].argmax()
    assert int(drop.argmax()) == int(previous_token)
    assert float(drop.max()) > 0.5 * (result.clean_score - result.corrupt_score)
    assert torch.equal(result.scores[1], torch.full((4,), result.clean_score))


def test_path_patch_layer_outside_the_model_is_refused_not_wrapped(toy):
    """layers=[5] on a 2-layer model once returned layer 1's scores (5 % 2); negative indices
    count from the end, as in activation_patch."""
    generator = torch.Generator().manual_seed(1)
    clean = torch.randint(1, 500, (2, 6), generator=generator)
    corrupt = clean.clone()
    corrupt[:, 1] = torch.randint(1, 500, (2,), generator=generator)
    pairs = mk.PromptPairs.from_tokens(clean, corrupt, [3, 4], [5, 6])
    for bad in ([5], [2], [-3], [0, 7]):
        with pytest.raises(mk.InvalidSiteError, match=r"layers in \[0, 2\)"):
            mk.path_patch(toy, pairs, layers=bad, progress=False)
        with pytest.raises(mk.InvalidSiteError, match=r"layers in \[0, 2\)"):
            mk.activation_patch(toy, pairs, layers=bad, progress=False)
    last = mk.path_patch(toy, pairs, layers=[-1], progress=False)
    one = mk.path_patch(toy, pairs, layers=[1], progress=False)
    assert last.labels["layer"] == one.labels["layer"] == [1]
    assert torch.equal(last.scores, one.scores)
    whole = mk.path_patch(toy, pairs, progress=False)
    assert torch.equal(one.scores[0], whole.scores[1])
