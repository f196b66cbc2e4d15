"""Splicing SAEs and transcoders: the error term keeps the model's output; latent edits move the
activation by exactly the decoder difference; patch_latents equals a naive loop."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import mechkit as mk
from mechkit.errors import InvalidSiteError, MechkitError, SiteNotFoundError
from mechkit.sae.base import SAEConfig, SparseDictionary
from mechkit.sae.splice import patch_latents, splice
from tests.conftest import hook_count

torch.set_num_threads(1)


@dataclasses.dataclass(frozen=True)
class _Cfg:
    hook_name: str
    d_in: int
    d_sae: int
    d_out: int | None = None
    out_hook_name: str | None = None
    architecture: str = "relu"
    k: int | None = None
    skip: bool = False
    model_name: str | None = None
    dtype: str = "float32"


class DuckSAE(torch.nn.Module):
    """A ReLU dictionary with random weights, written against the interface only (the splice
    code must not need mechkit's own class)."""

    def __init__(self, hook, d_in, d_sae, *, out_hook=None, d_out=None, seed=0):
        super().__init__()
        self.cfg = _Cfg(hook, d_in, d_sae, d_out, out_hook)
        g = torch.Generator().manual_seed(seed)
        width = d_out or d_in
        self.W_enc = torch.nn.Parameter(torch.randn(d_in, d_sae, generator=g) / d_in**0.5)
        self.b_enc = torch.nn.Parameter(torch.randn(d_sae, generator=g) * 0.1)
        self.W_dec = torch.nn.Parameter(torch.randn(d_sae, width, generator=g) / d_sae**0.5)
        self.b_dec = torch.nn.Parameter(torch.randn(width, generator=g) * 0.1)

    def encode(self, x):
        return torch.relu(x @ self.W_enc + self.b_enc)

    def decode(self, f):
        return f @ self.W_dec + self.b_dec

    def forward(self, x):
        return self.decode(self.encode(x))


def make_dict(
    hook, d_in, d_sae, *, architecture="relu", k=None, out_hook=None, d_out=None, skip=False, seed=0
):
    """A mechkit dictionary with its initial weights and small random biases (and skip term)."""
    cfg = SAEConfig(
        architecture=architecture,
        d_in=d_in,
        d_sae=d_sae,
        hook_name=hook,
        k=k,
        d_out=d_out,
        out_hook_name=out_hook,
        skip=skip,
    )
    sae = SparseDictionary.from_config(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(d_sae, generator=g) * 0.1)
        sae.b_dec.copy_(torch.randn(sae.cfg.out_width, generator=g) * 0.1)
        if skip:
            sae.W_skip.copy_(torch.randn(d_in, d_out, generator=g) * 0.05)
    return sae


def induction_tokens(n: int = 4, half: int = 12, seed: int = 0) -> torch.Tensor:
    """``[BOS] + r + r`` rows: the toy model predicts the second copy."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randint(1, 500, (n, half), generator=g)
    return torch.cat([torch.zeros(n, 1, dtype=torch.long), r, r], dim=1)


RESID = "blocks.1.hook_resid_pre"


@pytest.fixture(scope="module")
def model():
    return mk.load_model("attn-only-2l", device="cpu")


@pytest.fixture(scope="module")
def sae():
    return make_dict(RESID, 128, 384, seed=1)


@pytest.fixture(scope="module")
def transcoder():
    return make_dict(
        "blocks.0.ln1.hook_normalized", 128, 256, out_hook="blocks.0.hook_attn_out", d_out=128
    )


def _acts(model, tokens, name):
    got = {}
    with model.hooks(fwd_hooks=[(name, lambda act, hook: got.setdefault("act", act.clone()))]):
        model(tokens)
    return got["act"]


@pytest.mark.parametrize("kind", ["mechkit", "duck", "bfloat16"])
@torch.no_grad()
def test_error_term_keeps_the_output_and_latents_are_the_encoding(model, sae, kind):
    if kind == "duck":
        sae = DuckSAE(RESID, 128, 384, seed=1)
    elif kind == "bfloat16":  # the error is taken in float32: still exact to float32 rounding
        sae = SparseDictionary.from_config(sae.cfg.replace(dtype="bfloat16"), seed=1)
    tokens = induction_tokens()
    reference = model(tokens)
    x = _acts(model, tokens, RESID)
    with splice(model, sae) as h:
        logits = model(tokens)
        latents, errors, recon = h.latents[RESID], h.errors[RESID], h.reconstructions[RESID]
    assert h.names == (RESID,)
    assert (logits - reference).abs().max() < 1e-5
    torch.testing.assert_close(latents, sae.encode(x), atol=1e-6, rtol=0)
    torch.testing.assert_close(recon + errors, x, atol=1e-5, rtol=0)
    assert (latents > 0).float().mean() > 0.2  # a real encoding, not all zeros
    with splice(model, sae, keep_error=False):
        alone = model(tokens)
    assert (alone - reference).abs().max() > 1e-2
    with mk.intervene(model, mk.Patch(mk.Site("resid_pre", layer=1), sae(x))):
        by_hand = model(tokens)  # the reconstruction alone, patched in by mechkit's own tools
    torch.testing.assert_close(alone, by_hand, atol=1e-5, rtol=0)
    assert hook_count(model) == 0


@torch.no_grad()
def test_latent_edits_move_the_activation_by_the_decoder_difference(model, sae):
    tokens = induction_tokens(seed=1)
    x = _acts(model, tokens, RESID)
    f = sae.encode(x)
    fired = (f[:, -1] > 0).float().sum(0).argsort(descending=True)[:3].tolist()
    edits = {
        "zero": lambda h: h.zero(fired, positions=[-1]),
        "set": lambda h: h.set(fired, 2.5, positions=[3, 5]),
        "scale": lambda h: h.scale([fired[0]], 3.0),
        "add": lambda h: h.add(fired[:2], torch.tensor([1.0, -0.5])),
    }
    expected_f = {name: f.clone() for name in edits}  # the same edits, made by hand
    expected_f["zero"][:, -1, fired] = 0.0
    for p in (3, 5):
        expected_f["set"][:, p, fired] = 2.5
    expected_f["scale"][:, :, fired[0]] *= 3.0
    expected_f["add"][:, :, fired[:2]] += torch.tensor([1.0, -0.5])
    for name, register in edits.items():
        with splice(model, sae) as h:
            register(h)
            with mk.capture(model, RESID) as after:  # added after the splice hook: sees its output
                edited_logits = model(tokens)
            torch.testing.assert_close(h.latents[RESID], f, atol=1e-6, rtol=0)  # as encoded
        moved = after[RESID] - x
        difference = sae.decode(expected_f[name]) - sae.decode(f)
        assert difference.abs().max() > 1e-3, name  # the edit does something
        torch.testing.assert_close(moved, difference, atol=2e-5, rtol=0)
        # downstream: the same as adding the difference with a plain hook
        with mk.intervene(model, mk.Add(mk.Site("resid_pre", layer=1), difference)):
            torch.testing.assert_close(edited_logits, model(tokens), atol=2e-5, rtol=0)
    assert hook_count(model) == 0


@torch.no_grad()
def test_error_edits(model, sae):
    a, b = induction_tokens(seed=2), induction_tokens(seed=3)
    with splice(model, sae, keep_error=False):
        alone = model(a)
    with splice(model, sae) as h:
        model(b)
        error_b = h.errors[RESID]
        h.zero_error()
        zeroed = model(a)
        recon_a = h.reconstructions[RESID]
        h.clear()
        h.patch_error(error_b, positions=None)
        with mk.capture(model, RESID) as after:
            model(a)
        h.clear()
        h.zero_error(positions=[-1])
        with mk.capture(model, RESID) as last_zeroed:
            model(a)
    torch.testing.assert_close(zeroed, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(after[RESID], recon_a + error_b, atol=1e-5, rtol=0)
    x_a = _acts(model, a, RESID)
    torch.testing.assert_close(last_zeroed[RESID][:, :-1], x_a[:, :-1], atol=1e-5, rtol=0)
    torch.testing.assert_close(last_zeroed[RESID][:, -1], recon_a[:, -1], atol=1e-5, rtol=0)


@torch.no_grad()
def test_transcoder_replaces_its_output_hook(model, transcoder):
    tokens = induction_tokens(seed=4)
    reference = model(tokens)
    normalized = _acts(model, tokens, "blocks.0.ln1.hook_normalized")
    with splice(model, transcoder) as h:
        kept = model(tokens)
        assert h.errors["blocks.0.hook_attn_out"].shape == (*tokens.shape, 128)
    assert (kept - reference).abs().max() < 1e-5
    with splice(model, transcoder, keep_error=False):
        alone = model(tokens)
    predicted = transcoder(normalized)
    with mk.intervene(model, mk.Patch(mk.Site("attn_out", layer=0), predicted)):
        torch.testing.assert_close(alone, model(tokens), atol=1e-5, rtol=0)
    assert (alone - reference).abs().max() > 1e-2


@torch.no_grad()
def test_skip_transcoder_edits_move_the_output_by_the_decoder_difference(model):
    tc = make_dict(
        "blocks.0.ln1.hook_normalized",
        128,
        64,
        architecture="topk",
        k=8,
        out_hook="blocks.0.hook_attn_out",
        d_out=128,
        skip=True,
        seed=5,
    )
    tokens = induction_tokens(seed=8)
    reference = model(tokens)
    normalized = _acts(model, tokens, "blocks.0.ln1.hook_normalized")
    attn_out = _acts(model, tokens, "blocks.0.hook_attn_out")
    f = tc.encode(normalized)
    assert bool(((f != 0).sum(-1) == 8).all())  # top-k: exactly k latents per token
    with splice(model, tc) as h:
        assert (model(tokens) - reference).abs().max() < 1e-5
        chosen = [int(f[0, -1].argmax()), 3]  # one active latent, one maybe not
        h.add(chosen, 1.5, positions=[-1, 2])
        with mk.capture(model, "blocks.0.hook_attn_out") as after:
            model(tokens)
    edited = f.clone()
    edited[:, -1, chosen] += 1.5
    edited[:, 2, chosen] += 1.5
    moved = after["blocks.0.hook_attn_out"] - attn_out
    torch.testing.assert_close(moved, tc.decode(edited) - tc.decode(f), atol=2e-5, rtol=0)
    with splice(model, tc, keep_error=False):
        with mk.capture(model, "blocks.0.hook_attn_out") as alone:
            model(tokens)
    skip = normalized @ tc.W_skip
    assert skip.abs().max() > 1e-2  # the skip term is part of the reconstruction
    expected = tc.decode(f) + skip
    torch.testing.assert_close(alone["blocks.0.hook_attn_out"], expected, atol=2e-5, rtol=0)


@torch.no_grad()
def test_several_dictionaries_at_once(model, sae, transcoder):
    tokens = induction_tokens(seed=5)
    reference = model(tokens)
    with splice(model, {"tc": transcoder, "resid": sae}) as h:
        assert (model(tokens) - reference).abs().max() < 1e-5
        assert set(h.latents) == {"tc", "resid"}
        with pytest.raises(MechkitError, match="sae= naming"):
            h.zero([0])
        with pytest.raises(SiteNotFoundError, match="resid"):
            h.zero([0], sae="resdi")
        h.zero(None, sae="tc")  # every transcoder latent off: attn_out becomes b_dec + error
        changed = model(tokens)
    assert (changed - reference).abs().max() > 1e-3
    with pytest.raises(MechkitError, match="at most one"):
        with splice(model, {"a": sae, "b": make_dict(RESID, 128, 64)}):
            pass
    assert hook_count(model) == 0


def test_bad_inputs_and_cleanup_after_errors(model, sae):
    tokens = induction_tokens()
    with splice(model, sae) as h:
        with pytest.raises(InvalidSiteError, match=r"\[0, 384\)"):
            h.zero([384])
        with pytest.raises(ValueError):  # InvalidSiteError is a ValueError
            h.set([-1], 1.0)
        h.zero([0], positions=[100])  # out of range only once the forward knows its length
        with pytest.raises(InvalidSiteError, match="positions"):
            model(tokens)
    assert hook_count(model) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with splice(model, sae):
            raise RuntimeError("boom")
    assert hook_count(model) == 0
    with pytest.raises(SiteNotFoundError, match="hook_resid_pre"):
        with splice(model, make_dict("blocks.1.hook_resid_pr", 128, 8)):
            pass
    with pytest.raises(mk.ShapeError, match="width 64"):
        with splice(model, make_dict(RESID, 64, 8)):
            model(tokens)
    foreign = make_dict("blocks.0.ln1.hook_normalized", 128, 8, d_out=128)  # output hook unknown
    with pytest.raises(MechkitError, match="out_hook_name"):
        with splice(model, foreign):
            pass
    assert hook_count(model) == 0


# ---------------------------------------------------------------------------------- patching


def _naive_patch(model, sae, clean, corrupt, metric, latents, position=None):
    """One full spliced forward per latent, the clean value set through the handle."""
    with splice(model, sae) as h:
        model(clean)
        f_clean = h.latents[h.names[0]]
    scores = []
    for latent in latents:
        with splice(model, sae) as h:
            if position is None:
                h.set([latent], f_clean[:, :, [latent]])
            else:
                h.set([latent], f_clean[:, [position], [latent]][:, :, None], positions=[position])
            scores.append(float(torch.as_tensor(metric(model(corrupt))).mean()))
    return torch.tensor(scores)


@torch.no_grad()
def test_patch_latents_matches_a_naive_loop(model, sae, transcoder):
    clean = induction_tokens(n=3, seed=6)
    corrupt = clean.clone()
    corrupt[:, 14:] = induction_tokens(n=3, seed=7)[:, 14:]  # break the repeat after position 13
    answer, wrong = clean[:, -1], corrupt[:, -1]
    metric = mk.LogitDiff(answer, wrong)
    result = patch_latents(model, sae, clean, corrupt, metric, latents=12, progress=False)
    assert result.axes == ("latent",) and result.scores.shape == (12,)
    naive = _naive_patch(model, sae, clean, corrupt, metric, result.labels["latent"])
    torch.testing.assert_close(result.scores, naive, atol=1e-4, rtol=0)
    assert result.scores.std() > 1e-3  # latents do differ in effect
    assert result.clean_score == pytest.approx(float(metric(model(clean))), abs=1e-4)
    assert result.corrupt_score == pytest.approx(float(metric(model(corrupt))), abs=1e-4)
    top = result.top(3)
    moved = (result.scores - result.corrupt_score).abs()
    assert [c["latent"] for c, _ in top] == [
        result.labels["latent"][i] for i in moved.argsort(descending=True)[:3]
    ]
    assert len(result.to_dataframe()) == 12
    result.plot()

    # a plain function of the logits, one patch per position, chosen latents
    def last_logit(logits):
        return logits[:, -1, 7]

    by_pos = patch_latents(
        model, sae, clean, corrupt, last_logit, latents=[3, 40], positions=[15, -1], progress=False
    )
    assert by_pos.axes == ("latent", "pos") and by_pos.labels["pos"] == [15, 24]
    for li, latent in enumerate([3, 40]):
        for pi, pos in enumerate([15, 24]):
            naive = _naive_patch(model, sae, clean, corrupt, last_logit, [latent], position=pos)
            assert float(by_pos.scores[li, pi]) == pytest.approx(float(naive[0]), abs=1e-4)
    # a transcoder: read at ln1.hook_normalized, patched at attn_out; noising (corrupt values
    # into the clean run) this time
    noised = patch_latents(
        model, transcoder, clean, corrupt, metric, latents=6, direction="noising", progress=False
    )
    naive = _naive_patch(model, transcoder, corrupt, clean, metric, noised.labels["latent"])
    torch.testing.assert_close(noised.scores, naive, atol=1e-4, rtol=0)
    assert noised.method == "noising" and noised.scores.std() > 1e-4
    assert hook_count(model) == 0


@torch.no_grad()
def test_patch_latents_old_keyword_names_warn_and_give_the_same_scores(model, sae):
    """The core's argument order (model, sae, clean, corrupt, metric): positional calls as before,
    the old keywords clean_tokens=/corrupt_tokens= still work with a DeprecationWarning."""
    clean = induction_tokens(n=2, seed=6)
    corrupt = clean.clone()
    corrupt[:, 14:] = induction_tokens(n=2, seed=7)[:, 14:]
    metric = mk.LogitDiff(clean[:, -1], corrupt[:, -1])
    new = patch_latents(model, sae, clean, corrupt, metric, latents=[1, 2], progress=False)
    with pytest.warns(DeprecationWarning, match="clean_tokens"):
        old = patch_latents(
            model, sae, clean_tokens=clean, corrupt_tokens=corrupt, metric=metric,
            latents=[1, 2], progress=False,
        )  # fmt: skip
    torch.testing.assert_close(old.scores, new.scores)
    with pytest.raises(MechkitError, match="not both"):
        patch_latents(model, sae, clean, clean_tokens=clean, metric=metric, progress=False)


@torch.no_grad()
def test_patch_latents_batches_equal_one_pass_and_zero_ablation_matches_a_naive_loop(model, sae):
    """batch_size splits the prompts with the same scores; ablation="zero" (noising) sets each
    latent to zero in the clean run, checked against the splice handle's own zeroing."""
    clean = induction_tokens(n=3, seed=6)
    corrupt = clean.clone()
    corrupt[:, 14:] = induction_tokens(n=3, seed=7)[:, 14:]
    metric = mk.LogitDiff(clean[:, -1], corrupt[:, -1])
    whole = patch_latents(model, sae, clean, corrupt, metric, latents=6, progress=False)
    split = patch_latents(
        model, sae, clean, corrupt, metric, latents=6, batch_size=2, progress=False
    )
    assert split.labels == whole.labels
    torch.testing.assert_close(split.scores, whole.scores, atol=1e-5, rtol=0)
    torch.testing.assert_close(split.per_prompt, whole.per_prompt, atol=1e-5, rtol=0)

    zero = patch_latents(
        model, sae, clean, None, metric, latents=5, ablation="zero", progress=False
    )
    assert zero.method == "zero" and zero.corrupt_score is None
    naive = []
    for latent in zero.labels["latent"]:
        with splice(model, sae) as h:
            h.zero([latent])
            naive.append(float(metric(model(clean))))
    torch.testing.assert_close(zero.scores, torch.tensor(naive), atol=1e-4, rtol=0)
    assert zero.clean_score == pytest.approx(float(metric(model(clean))), abs=1e-4)
    with pytest.raises(MechkitError, match="ablation"):
        patch_latents(model, sae, clean, corrupt, metric, ablation="resample", progress=False)
    with pytest.raises(MechkitError, match="direction='noising'"):
        patch_latents(model, sae, clean, corrupt, metric, ablation="zero", direction="denoising")
    assert hook_count(model) == 0


# ---------------------------------------------------------------------------------- real model


@pytest.mark.slow
@torch.no_grad()
def test_transcoder_in_a_gated_mlp_llama_keeps_logits_with_the_error_term(smollm2):
    """A transcoder replacing SmolLM2's gated MLP (layer 10): the error term restores it."""
    model = smollm2
    tokens = model.to_tokens("The Eiffel Tower is located in the city of")  # (1, pos)
    tc = make_dict(
        "blocks.10.ln2.hook_normalized",
        576,
        1024,
        architecture="topk",
        k=32,
        out_hook="blocks.10.hook_mlp_out",
        d_out=576,
        skip=True,
        seed=3,
    )
    reference = model(tokens)
    with splice(model, tc) as h:
        kept = model(tokens)
        error = h.errors["blocks.10.hook_mlp_out"]
    with splice(model, tc, keep_error=False):
        alone = model(tokens)
    assert (kept - reference).abs().max() < 1e-4
    assert error.abs().max() > 0.1  # a random transcoder is far from the MLP
    assert (alone - reference).abs().max() > 0.1
    assert hook_count(model) == 0
