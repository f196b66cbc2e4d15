"""The logit lens against the model's own logits and a direct computation written here."""

from __future__ import annotations

import pytest
import torch

import mechkit as mk

PROMPTS = [
    "The Eiffel Tower is located in the city of",
    "When Mary and John went to the store, John gave a drink to",
]


@pytest.fixture(scope="module")
def lens(smollm2):
    return mk.logit_lens(smollm2, PROMPTS, targets=[" Paris", " Mary"], keep_logits=True)


@torch.no_grad()
def test_last_layer_is_the_models_output(smollm2, lens):
    assert lens.logits.shape == (31, 2, lens.tokens.shape[1], 49152)
    logits = smollm2(lens.tokens)
    mask = lens.mask
    assert (lens.logits[-1][mask] - logits[mask]).abs().max() < 1e-4


@torch.no_grad()
def test_every_layer_matches_a_direct_rms_computation(smollm2, lens):
    """RMS recomputed on each layer's own residual, written out by hand."""
    _, cache = smollm2.run_with_cache(lens.tokens)
    eps = smollm2.cfg.eps
    for layer in [0, 7, 15, 29]:
        h = cache[f"blocks.{layer}.hook_resid_pre"]
        direct = (h / (h.pow(2).mean(-1, keepdim=True) + eps).sqrt()) @ smollm2.W_U
        assert (lens.logits[layer] - direct).abs().max() < 1e-3
        # reusing the final layer's scale (accumulated_resid(apply_ln=True)) is not the same
        stale = (h / cache["ln_final.hook_scale"]) @ smollm2.W_U
        assert (lens.logits[layer] - stale).abs().max() > 1.0


def test_top_k_and_targets_agree_with_the_full_logits(lens):
    full = lens.logits
    probs = full.softmax(-1)
    top = probs.topk(5, dim=-1)
    assert torch.equal(lens.top_ids, top.indices)
    assert torch.allclose(lens.top_probs, top.values, atol=1e-6)
    for t in range(2):
        ids = lens.target_ids[..., t]  # (batch, pos)
        logit_t = full.gather(-1, ids.expand(31, *ids.shape)[..., None]).squeeze(-1)
        naive_rank = (full > logit_t[..., None]).sum(-1)
        assert torch.equal(lens.target_ranks[..., t], naive_rank)
        assert torch.allclose(lens.target_logits[..., t], logit_t)
    last = int(lens.mask[0].sum()) - 1
    assert lens.target_ranks[-1, 0, last, 0] == 0  # " Paris" is the final top-1
    assert lens.top_tokens[-1][0][last][0] == " Paris"


def test_chunking_and_no_full_tensor(smollm2, lens):
    small = mk.logit_lens(smollm2, PROMPTS, targets=[" Paris", " Mary"], chunk_tokens=7)
    assert small.logits is None
    # other chunk sizes change float rounding in the matmul, so near-ties may swap places
    assert (small.top_ids[..., 0] == lens.top_ids[..., 0]).float().mean() > 0.99
    assert torch.allclose(small.top_probs, lens.top_probs, atol=1e-5)
    assert torch.allclose(small.target_logits, lens.target_logits, atol=1e-4)
    assert (small.target_ranks - lens.target_ranks).abs().max() <= 5
    with pytest.raises(ValueError, match="keep_logits=True"):
        _ = small.probs


def test_per_position_targets_and_toy_model(toy):
    tokens = torch.randint(1, toy.cfg.d_vocab, (3, 12), generator=torch.Generator().manual_seed(1))
    tokens[:, 0] = 0
    nxt = torch.roll(tokens, -1, dims=1)
    lens = mk.logit_lens(toy, tokens, targets=nxt, keep_logits=True)
    assert lens.target_ids.shape == (3, 12, 1)
    assert lens.top_tokens is None
    with torch.no_grad():
        assert (lens.logits[-1] - toy(tokens)).abs().max() < 1e-4


def test_figures(lens):
    fig = lens.plot(prompt=1)
    assert len(fig.data[0].y) == 31 and fig.data[0].text[-1][-1] == "' Mary'".strip("'")
    line = lens.plot_target(1, prompt=1, value="prob")
    assert len(line.data[0].y) == 31
    df = lens.to_dataframe()
    assert {"layer", "pos", "top_token", "target0_rank"} <= set(df.columns)


def test_bad_targets(smollm2):
    with pytest.raises(mk.ShapeError, match="targets"):
        mk.logit_lens(smollm2, PROMPTS[0], targets=torch.zeros(3, 4, 5, 6, dtype=torch.long))


def test_logit_lens_top_follows_the_rank_rule(toy):
    from mechkit.core import rank

    lens = mk.logit_lens(toy, torch.tensor([[1, 2, 3, 4], [5, 6, 7, 0]]), top_k=4)
    ids = lens.top_ids[1, 1, 2].tolist()
    assert lens.top(3, layer=1, prompt=1, position=2) == rank(ids, lens.top_probs[1, 1, 2], 3)
    assert lens.top() == rank(lens.top_ids[-1, 0, -1].tolist(), lens.top_probs[-1, 0, -1], 10)
    assert len(lens.top()) == 4  # only the kept top_k
