"""Causal tracing against identities and a hand-written hooked forward."""

from __future__ import annotations

import pytest
import torch

import mechkit as mk
from mechkit.editing import TokenizedFact
from mechkit.editing.tracing import (
    TOKEN_CLASSES,
    embedding_std,
    restore_hook_names,
    subject_noise,
    token_classes,
)
from tests.conftest import hook_count

LAST = TOKEN_CLASSES.index("last")
LAST_SUBJECT = TOKEN_CLASSES.index("last subject")


def hand_cell(model, fact, kind, layer, position, window, noise, samples, seed):
    """P(target) with one state restored, by plain hooked forwards: one per noise sample."""
    tokens = fact.tokens[None]
    names = restore_hook_names(kind, layer, model.cfg.n_layers, window)
    _, cache = model.run_with_cache(tokens)
    start, stop = fact.subject
    std = embedding_std(model, [fact]) * noise
    shift = subject_noise(samples, stop - start, model.cfg.d_model, std, seed)
    probs = []
    for s in range(samples):

        def corrupt(embed, hook, s=s):
            embed = embed.clone()
            embed[:, start:stop] += shift[s]
            return embed

        def restore(act, hook):
            act = act.clone()
            act[:, position] = cache[hook.name][:, position]
            return act

        hooks = [("hook_embed", corrupt)] + [(n, restore) for n in names]
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
        probs.append(logits[0, -1].softmax(-1)[fact.target])
    return float(torch.stack(probs).mean().detach())


@pytest.mark.parametrize("kind", ["hidden", "mlp", "attn"])
def test_a_cell_equals_a_hand_written_hooked_forward(tiny, tiny_facts, kind):
    fact = tiny_facts[0]  # subject at positions 2..4, prompt of 7 tokens
    r = mk.causal_trace(tiny, fact, noise=3.0, samples=3, window=3, seed=5, progress=False)
    k = r.kinds.index(kind)
    for layer in range(tiny.cfg.n_layers):
        for cls, position in ((LAST_SUBJECT, 4), (LAST, 6)):
            hand = hand_cell(tiny, fact, kind, layer, position, 3, 3.0, 3, seed=5)
            assert r.per_fact[0, k, layer, cls] == pytest.approx(hand, abs=1e-5)
    assert hook_count(tiny) == 0


def test_restoring_the_whole_corrupted_state_at_layer_0_gives_the_clean_probability(tiny):
    # a one-token subject at the prompt's end: its layer-0 hidden state is the only state that
    # the noise changed, so restoring it restores the whole clean state of layer 0
    fact = TokenizedFact(torch.tensor([1, 5, 6, 7, 8]), (4, 5), target=3)
    r = mk.causal_trace(tiny, fact, kinds=("hidden",), samples=4, progress=False)
    assert r.corrupt_prob[0] != pytest.approx(float(r.clean_prob[0]), abs=1e-4)  # noise hurts
    assert r.per_fact[0, 0, 0, LAST] == pytest.approx(float(r.clean_prob[0]), abs=1e-6)
    # and in any fact, the last layer's hidden state at the last token is the whole output
    r = mk.causal_trace(tiny, TokenizedFact(torch.tensor([1, 5, 6, 7, 8]), (1, 3), 3),
                        kinds=("hidden",), samples=2, progress=False)  # fmt: skip
    assert r.per_fact[0, 0, -1, LAST] == pytest.approx(float(r.clean_prob[0]), abs=1e-6)


def test_zero_noise_gives_zero_effects(tiny, tiny_facts):
    r = mk.causal_trace(tiny, tiny_facts, noise=0.0, samples=2, window=2, progress=False)
    assert torch.allclose(r.clean_prob, r.corrupt_prob, atol=1e-6)
    effect = r.indirect_effect
    assert torch.nan_to_num(effect).abs().max() < 1e-5
    assert r.total_effect == pytest.approx(0.0, abs=1e-6)


def test_small_memory_budget_splits_batches_with_the_same_result(tiny, tiny_facts):
    big = mk.causal_trace(tiny, tiny_facts[:2], samples=3, window=2, progress=False)
    small = mk.causal_trace(tiny, tiny_facts[:2], samples=3, window=2, memory_budget=20_000,
                            progress=False)  # fmt: skip
    assert torch.allclose(big.per_fact, small.per_fact, atol=1e-6, equal_nan=True)


def test_token_classes_and_averaging(tiny, tiny_facts):
    assert token_classes(tiny_facts[1]) == [[1], [], [1], [2], [3], [4]]  # one-token subject
    r = mk.causal_trace(tiny, tiny_facts, kinds=("mlp",), samples=2, window=2, progress=False)
    assert torch.isnan(r.per_fact[1, 0, :, TOKEN_CLASSES.index("middle subject")]).all()
    assert torch.allclose(r.scores, r.per_fact.nanmean(0), equal_nan=True)
    frame = r.to_dataframe()
    assert len(frame) == 1 * tiny.cfg.n_layers * len(TOKEN_CLASSES)
    fig = r.plot()
    assert len(fig.data) == 1


def test_save_and_load_round_trip(tiny, tiny_facts, tmp_path):
    r = mk.causal_trace(tiny, tiny_facts[:1], kinds=("attn",), samples=2, progress=False)
    back = mk.TraceResult.load(r.save(tmp_path / "trace.safetensors"))
    assert torch.equal(back.per_fact.nan_to_num(), r.per_fact.nan_to_num())
    assert back.kinds == r.kinds and back.noise_std == r.noise_std


def test_bad_input(tiny, toy, tiny_facts):
    with pytest.raises(mk.InvalidArgumentError, match="Did you mean 'mlp'"):
        mk.causal_trace(tiny, tiny_facts, kinds=("mpl",), progress=False)
    with pytest.raises(mk.UnsupportedModelError, match="attention-only"):
        mk.causal_trace(toy, TokenizedFact(torch.tensor([0, 1, 2]), (1, 2), 3), progress=False)
    with pytest.raises(mk.InvalidArgumentError, match="noise"):
        mk.causal_trace(tiny, tiny_facts, noise=-1.0, progress=False)
    with pytest.raises(mk.InvalidArgumentError, match="subject span"):
        TokenizedFact(torch.tensor([0, 1, 2]), (2, 5), 3)
    with pytest.raises(mk.InvalidArgumentError, match="replacement"):
        mk.causal_trace(tiny, tiny_facts, replacement="Italy", progress=False)
