"""evaluate_sae against a direct computation: reconstruction figures from one cached forward,
spliced and ablated losses from full hooked forward passes; a perfect dictionary scores 1."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mechkit as mk
from mechkit.errors import EmptyDatasetError, InvalidSiteError
from mechkit.sae.base import SAEConfig, SparseDictionary
from mechkit.sae.evaluate import SAEEvaluation, counted_positions, evaluate_sae

torch.set_num_threads(1)

RESID = "blocks.1.hook_resid_pre"


def make_dict(hook, d_in, d_sae, *, architecture="relu", k=None, out_hook=None, d_out=None, seed=0):
    """A mechkit dictionary with its initial weights and small random biases."""
    cfg = SAEConfig(
        architecture=architecture,
        d_in=d_in,
        d_sae=d_sae,
        hook_name=hook,
        k=k,
        d_out=d_out,
        out_hook_name=out_hook,
    )
    sae = SparseDictionary.from_config(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(d_sae, generator=g) * 0.1)
        sae.b_dec.copy_(torch.randn(sae.cfg.out_width, generator=g) * 0.1)
    return sae


def perfect_dict(hook, d, seed=0):
    """W_enc = [Q, -Q], W_dec = W_enc.T, no biases: relu(xQ) Q^T - relu(-xQ) Q^T = x exactly."""
    sae = make_dict(hook, d, 2 * d)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed)))
    w = torch.cat([q, -q], dim=1)  # (d, 2d)
    with torch.no_grad():
        sae.W_enc.copy_(w)
        sae.W_dec.copy_(w.T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def induction_tokens(n: int = 6, half: int = 15, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    r = torch.randint(1, 500, (n, half), generator=g)
    return torch.cat([torch.zeros(n, 1, dtype=torch.long), r, r], dim=1)


@pytest.fixture(scope="module")
def model():
    return mk.load_model("attn-only-2l", device="cpu")


def _acts(model, tokens, name):
    got = {}
    with model.hooks(fwd_hooks=[(name, lambda act, hook: got.setdefault("a", act.clone()))]):
        model(tokens)
    return got["a"]


@torch.no_grad()
def _naive(model, sae, tokens, counted, mask, in_hook, out_hook):
    """Every figure computed directly: one forward per run, all positions, then masks."""
    x, y = _acts(model, tokens, in_hook), _acts(model, tokens, out_hook)
    f, y_hat = sae.encode(x), sae(x)
    n = int(counted.sum())
    yc, yhc = y[counted], y_hat[counted]
    out = {
        "l0": float((f[counted] != 0).sum()) / n,
        "mse": float(((yc - yhc) ** 2).mean()),
        "explained_variance": 1
        - float(((yc - yhc) ** 2).sum()) / float(((yc - yc.mean(0)) ** 2).sum()),
        "cosine": float(F.cosine_similarity(yc, yhc, dim=-1).mean()),
        "frequency": (f[counted] != 0).float().mean(0),
    }

    def run(value):
        def hook(act, hook):
            return torch.where(counted[..., None], value.expand_as(act), act)

        with model.hooks(fwd_hooks=[(out_hook, hook)]):
            return model(tokens)

    clean = model(tokens)
    ce_at = counted[:, :-1] & mask[:, 1:]
    logp_clean = clean.log_softmax(-1)

    def ce(logits):
        per = F.cross_entropy(
            logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="none"
        )
        return float(per[ce_at.flatten()].mean())

    def kl(logits):
        logp = logits.log_softmax(-1)
        per = (logp_clean.exp() * (logp_clean - logp)).sum(-1)
        return float(per[counted].mean())

    out["ce_clean"] = ce(clean)
    for name, value in (("sae", y_hat), ("zero", torch.zeros_like(y)), ("mean", yc.mean(0))):
        logits = run(value)
        out[f"ce_{name}"], out[f"kl_{name}"] = ce(logits), kl(logits)
    return out


def _check(ev: SAEEvaluation, naive: dict, atol: float = 1e-4) -> None:
    for key, value in naive.items():
        if key == "frequency":
            torch.testing.assert_close(ev.frequency, value, atol=1e-6, rtol=0)
        else:
            assert getattr(ev, key) == pytest.approx(value, abs=atol, rel=1e-4), key


def test_sae_figures_equal_a_direct_computation(model, monkeypatch):
    sae = make_dict(RESID, 128, 96, seed=1)
    tokens = induction_tokens(n=5)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[0, -4:] = False  # row 0 right-padded: its last 4 tokens are padding
    ev = evaluate_sae(model, sae, tokens, batch_size=2, mask=mask, progress=False)
    counted = mask.clone()
    counted[:, 0] = False  # the BOS position
    assert ev.n_tokens == int(counted.sum()) == 5 * 30 - 4
    naive = _naive(model, sae, tokens, counted, mask, RESID, RESID)
    _check(ev, naive)
    assert ev.ce_zero - ev.ce_clean > 0.5  # the layer-1 residual matters (induction)
    assert ev.ce_recovered == pytest.approx(
        (naive["ce_zero"] - naive["ce_sae"]) / (naive["ce_zero"] - naive["ce_clean"]), abs=1e-4
    )
    assert ev.kl_recovered_mean == pytest.approx(1 - naive["kl_sae"] / naive["kl_mean"], abs=1e-4)
    # the same figures counting position 0 too
    everything = evaluate_sae(model, sae, tokens, batch_size=4, exclude="none", progress=False)
    every = torch.ones_like(counted)
    _check(everything, _naive(model, sae, tokens, every, every, RESID, RESID))
    assert everything.n_tokens == tokens.numel()
    # with no room to keep the first pass's residual streams, the second pass recomputes them
    import mechkit.sae.evaluate as evaluate_module

    monkeypatch.setattr(evaluate_module, "_START_CACHE_BYTES", 0)
    recomputed = evaluate_sae(model, sae, tokens, batch_size=2, mask=mask, progress=False)
    _check(recomputed, naive)


def test_transcoder_figures_equal_a_direct_computation(model):
    tc = make_dict(
        "blocks.0.ln1.hook_normalized", 128, 200, out_hook="blocks.0.hook_attn_out", d_out=128
    )
    tokens = induction_tokens(n=3, seed=2)
    ev = evaluate_sae(model, tc, tokens, batch_size=2, exclude="first", progress=False)
    counted = torch.ones_like(tokens, dtype=torch.bool)
    counted[:, 0] = False
    naive = _naive(
        model, tc, tokens, counted, torch.ones_like(counted), tc.cfg.hook_name, tc.cfg.out_hook_name
    )
    _check(ev, naive)
    assert ev.hook_name == "blocks.0.ln1.hook_normalized"
    assert ev.out_hook_name == "blocks.0.hook_attn_out"


def test_perfect_reconstruction_recovers_everything(model):
    sae = perfect_dict(RESID, 128)
    ev = evaluate_sae(model, sae, induction_tokens(), progress=False)
    assert ev.explained_variance == pytest.approx(1.0, abs=1e-5)
    assert ev.cosine == pytest.approx(1.0, abs=1e-5)
    assert ev.mse < 1e-10
    assert ev.ce_recovered == pytest.approx(1.0, abs=1e-4)
    assert ev.ce_recovered_mean == pytest.approx(1.0, abs=1e-4)
    assert ev.kl_sae < 1e-6 and ev.kl_zero > 0.1
    assert ev.kl_recovered == pytest.approx(1.0, abs=1e-5)
    assert ev.l0 == pytest.approx(128.0)  # one of each (x, -x) pair fires per coordinate
    assert ev.n_dead == 0 and ev.n_dense == 256


@torch.no_grad()
def test_zero_ablation_baseline_is_a_hooked_forward_with_zeros(model):
    sae = make_dict(RESID, 128, 32)
    tokens = induction_tokens(n=4, seed=3)
    ev = evaluate_sae(model, sae, tokens, exclude="none", progress=False)
    with mk.intervene(model, mk.Zero(mk.Site("resid_pre", layer=1))):
        logits = model(tokens)
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    assert ev.ce_zero == pytest.approx(float(ce), abs=1e-4)
    clean = F.cross_entropy(model(tokens)[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    assert ev.ce_clean == pytest.approx(float(clean), abs=1e-4)


def test_dead_and_dense_latents(model):
    sae = make_dict(RESID, 128, 16, seed=4)
    with torch.no_grad():
        sae.b_enc[[2, 5]] = -1e6  # never fire
        sae.W_enc[:, 7] = 0.0
        sae.b_enc[7] = 1.0  # always fires
    tokens = induction_tokens(n=3)
    ev = evaluate_sae(model, sae, tokens, dense_threshold=0.99, progress=False)
    assert ev.dead_latents.tolist() == [2, 5]
    assert 7 in ev.dense_latents.tolist()
    assert ev.frequency[7] == 1.0
    loose = evaluate_sae(model, sae, tokens, dense_threshold=0.0, progress=False)
    assert loose.n_dense == 16 - 2
    frame = ev.to_dataframe()
    assert frame.set_index("metric").loc["dead_latents", "value"] == 2
    assert len(ev.density_dataframe()) == 16
    fig = ev.plot()
    assert "2 dead of 16" in fig.layout.title.text
    assert sum(len(t.x) for t in fig.data) == 14  # the living latents
    assert "CE recovered" in ev.summary() and "dead=2/16" in repr(ev)


def test_which_positions_count(model):
    tokens = induction_tokens(n=3)
    tokens[1, 0] = 9  # row 1 does not start with BOS
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[2, -2:] = False
    first = counted_positions(model, tokens, mask=mask)  # the default: "first"
    assert not first[:, 0].any() and first[:, 1:].sum() == 3 * (tokens.shape[1] - 1) - 2
    bos = counted_positions(model, tokens, exclude="bos", mask=mask)
    assert bos[:, 0].tolist() == [False, True, False]
    assert torch.equal(counted_positions(model, tokens, exclude="none", mask=mask), mask)
    with pytest.raises(mk.MechkitError, match="exclude"):
        counted_positions(model, tokens, exclude="start")


def test_topk_l0_is_k(model):
    sae = make_dict(RESID, 128, 64, architecture="topk", k=5)
    ev = evaluate_sae(model, sae, induction_tokens(n=3), progress=False)
    assert ev.l0 == pytest.approx(5.0)


def test_bad_inputs(model):
    sae = make_dict(RESID, 128, 8)
    with pytest.raises(mk.MechkitError, match="no tokenizer"):
        evaluate_sae(model, sae, progress=False)
    with pytest.raises(EmptyDatasetError):
        evaluate_sae(model, sae, torch.zeros(2, 1, dtype=torch.long), progress=False)
    with pytest.raises(mk.ShapeError, match="width 64"):
        evaluate_sae(model, make_dict(RESID, 64, 8), induction_tokens(2), progress=False)
    with pytest.raises(mk.SiteNotFoundError):
        evaluate_sae(model, make_dict("blocks.7.hook_resid_pre", 128, 8), induction_tokens(2))
    bad = make_dict(
        "blocks.1.ln1.hook_normalized", 128, 8, out_hook="blocks.0.hook_attn_out", d_out=128
    )
    with pytest.raises(InvalidSiteError, match="reads"):
        evaluate_sae(model, bad, induction_tokens(2), progress=False)


@pytest.mark.slow
def test_rotary_gated_model_from_the_cached_block(smollm2):
    """SmolLM2 (rotary, RMSNorm): the losses run from the cached residual at the SAE's block
    equal the model's own loss, and a perfect dictionary recovers all of it."""
    tokens = mk.corpus.corpus_tokens(smollm2, seq_len=24, split="test", max_sequences=2)
    sae = perfect_dict("blocks.20.hook_resid_post", 576)
    ev = evaluate_sae(smollm2, sae, tokens, exclude="first", progress=False)
    with torch.no_grad():
        logits = smollm2(tokens)
    ce = F.cross_entropy(logits[:, 1:-1].flatten(0, 1), tokens[:, 2:].flatten())
    assert ev.ce_clean == pytest.approx(float(ce), abs=1e-4)
    assert ev.explained_variance == pytest.approx(1.0, abs=1e-5)
    assert ev.ce_recovered == pytest.approx(1.0, abs=1e-3)
    assert ev.ce_zero > ev.ce_clean + 1.0


def test_top_ranks_latents_by_firing_frequency(model):
    """SAEEvaluation.top(n): the n most frequent latents, densest first, ties in latent order
    (the core's rank rule), checked against a sort of the frequencies."""
    sae = make_dict(RESID, 128, 16, seed=4)
    with torch.no_grad():
        sae.b_enc[[2, 5]] = -1e6  # never fire
        sae.W_enc[:, 7] = 0.0
        sae.b_enc[7] = 1.0  # always fires
    ev = evaluate_sae(model, sae, induction_tokens(n=3), progress=False)
    top = ev.top(4)
    order = sorted(range(16), key=lambda i: (-float(ev.frequency[i]), i))[:4]
    assert [latent for latent, _ in top] == order and top[0] == (7, 1.0)
    assert [latent for latent, _ in ev.top(16)][-2:] == [2, 5]
    assert len(ev.top()) == 10
