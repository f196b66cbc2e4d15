"""The tuned lens: identity at initialisation, trained below the logit lens, saved, resumed."""

from __future__ import annotations

import pytest
import torch

import mechkit as mk
from mechkit.lens import tuned_lens as tl
from tests.conftest import DAMAGES, JSON_DAMAGES, damage


def repeated_tokens(model, n: int, half: int, seed: int) -> torch.Tensor:
    """[BOS] + r + r sequences: text on which the toy model's later layers know more."""
    gen = torch.Generator().manual_seed(seed)
    body = torch.randint(1, model.cfg.d_vocab, (n, half), generator=gen)
    return torch.cat([torch.zeros(n, 1, dtype=torch.long), body, body], dim=1)


CFG = mk.lens.TunedLensConfig(steps=60, batch_size=8, lr=3e-3, warmup_steps=5, checkpoint_every=20)


@pytest.fixture(scope="module")
def trained(toy):
    return mk.train_tuned_lens(toy, repeated_tokens(toy, 256, 20, 0), CFG, progress=False)


def test_fresh_lens_is_the_logit_lens(smollm2):
    tokens = smollm2.to_tokens("The capital of Japan is Tokyo, and the capital of France is")
    fresh = mk.lens.TunedLens(30, 576)
    with torch.no_grad():
        resids, _ = tl._residuals(smollm2, tokens)
        for layer in [0, 13, 29]:
            lens_logits = fresh.logits(smollm2, resids[layer], layer)
            plain = mk.lens.decode_residual(smollm2, resids[layer])
            assert torch.equal(lens_logits, plain)


def test_compare_lenses_matches_the_logit_lens_kl(smollm2):
    tokens = smollm2.to_tokens(["The capital of Japan is Tokyo, and the capital of France is"])
    table = mk.lens.compare_lenses(smollm2, tokens)
    lens = mk.logit_lens(smollm2, tokens, keep_logits=True)
    logp = lens.logits.log_softmax(-1)  # (layer, batch, pos, d_vocab)
    final = logp[-1]
    naive = (final.exp() * (final - logp)).sum(-1).mean(dim=(1, 2))
    assert torch.allclose(table.logit_lens_kl, naive, atol=1e-3)
    assert table.tuned_lens_kl is None and table.logit_lens_kl[-1] < 1e-5


def test_trained_lens_beats_the_logit_lens_on_held_out_tokens(toy, trained):
    held_out = repeated_tokens(toy, 64, 20, seed=123)
    table = mk.lens.compare_lenses(toy, held_out, trained)
    assert (table.tuned_lens_kl[:-1] < table.logit_lens_kl[:-1]).all(), table.to_dataframe()
    assert set(table.to_dataframe().columns) == {"layer", "logit_lens_kl", "tuned_lens_kl"}
    assert len(table.plot().data) == 2


def test_save_and_load(trained, tmp_path):
    trained.save(tmp_path / "lens")
    again = mk.lens.TunedLens.load(tmp_path / "lens")
    assert torch.equal(again.A, trained.A) and torch.equal(again.b, trained.b)
    assert again.meta["config"]["steps"] == CFG.steps
    assert not list((tmp_path / "lens").glob("*.tmp"))


def test_killed_run_resumes_to_the_same_lens(toy, tmp_path, monkeypatch):
    tokens = repeated_tokens(toy, 64, 12, 1)
    cfg = mk.lens.TunedLensConfig(
        steps=8, batch_size=4, lr=3e-3, warmup_steps=2, checkpoint_every=3
    )
    straight = mk.train_tuned_lens(toy, tokens, cfg, progress=False)

    real = tl._residuals
    calls = {"n": 0}

    def crash_at_step_five(model, batch):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("killed")
        return real(model, batch)

    monkeypatch.setattr(tl, "_residuals", crash_at_step_five)
    with pytest.raises(KeyboardInterrupt):
        mk.train_tuned_lens(toy, tokens, cfg, checkpoint_dir=tmp_path, progress=False)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 3
    monkeypatch.setattr(tl, "_residuals", real)
    resumed = mk.train_tuned_lens(toy, tokens, cfg, checkpoint_dir=tmp_path, progress=False)
    assert torch.allclose(resumed.A, straight.A, atol=1e-6)
    assert torch.allclose(resumed.b, straight.b, atol=1e-6)
    assert all(p.requires_grad for p in toy.parameters())  # the model is left as it was


@pytest.mark.parametrize("how", JSON_DAMAGES)
def test_damaged_tuned_lens_record_raises_file_format_error(how, tmp_path):
    tl.TunedLens(2, 8, {"model": "toy"}).save(tmp_path / "lens")
    damage(tmp_path / "lens" / "lens.json", how)
    with pytest.raises(mk.FileFormatError, match="lens.json") as err:
        tl.TunedLens.load(tmp_path / "lens")
    assert "Hint" in str(err.value)


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_tuned_lens_weights_raise_file_format_error(how, tmp_path):
    tl.TunedLens(2, 8).save(tmp_path / "lens")
    damage(tmp_path / "lens" / "lens.safetensors", how)
    with pytest.raises(mk.FileFormatError, match="lens.safetensors") as err:
        tl.TunedLens.load(tmp_path / "lens")
    assert "Hint" in str(err.value)


def test_tuned_lens_record_that_does_not_fit_its_weights_raises_file_format_error(tmp_path):
    tl.TunedLens(2, 8).save(tmp_path / "lens")
    tl.TunedLens(3, 8).save(tmp_path / "other")
    (tmp_path / "lens" / "lens.json").write_bytes((tmp_path / "other" / "lens.json").read_bytes())
    with pytest.raises(mk.FileFormatError, match=r"\(3, 8, 8\)"):
        tl.TunedLens.load(tmp_path / "lens")


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_tuned_lens_checkpoint_raises_file_format_error(how, toy, tmp_path):
    tokens = repeated_tokens(toy, 16, 6, 1)
    cfg = mk.lens.TunedLensConfig(steps=4, batch_size=4, warmup_steps=1, checkpoint_every=2)
    torch.save({"lens": {}, "optimizer": {}, "step": 2}, tmp_path / "checkpoint.pt")
    damage(tmp_path / "checkpoint.pt", how)
    with pytest.raises(mk.FileFormatError, match="checkpoint.pt"):
        mk.train_tuned_lens(toy, tokens, cfg, checkpoint_dir=tmp_path, progress=False)


# ----------------------------------------------------------------------------------------------
# Issue 15: Sites for layers, .top by the rank rule, the core's batching
# ----------------------------------------------------------------------------------------------


def test_lens_takes_a_site_for_the_layer(toy, trained):
    lens = trained
    h = torch.randn(3, toy.cfg.d_model)
    assert torch.equal(lens.translate(h, mk.Site("resid_pre", layer=1)), lens.translate(h, 1))
    final = mk.Site("resid_post", layer=toy.cfg.n_layers - 1)
    assert torch.equal(lens.logits(toy, h, final), lens.logits(toy, h, toy.cfg.n_layers))
    with pytest.raises(mk.InvalidSiteError, match="resid_pre"):
        lens.translate(h, mk.Site("z", layer=0))


def test_lens_comparison_top_ranks_layers_by_the_tuned_lens_gain(toy, trained):
    from mechkit.core import rank

    lens = trained
    tokens = repeated_tokens(toy, 4, 20, 1)
    table = mk.lens.compare_lenses(toy, tokens, lens)
    gain = table.logit_lens_kl - table.tuned_lens_kl
    assert table.top() == rank(list(table.layer_labels), gain, 10)
    alone = mk.lens.compare_lenses(toy, tokens)
    assert alone.top(1)[0][1] == float(alone.logit_lens_kl.max())


def test_compare_lenses_is_the_same_in_one_pass_and_in_batches(toy, trained):
    lens = trained
    tokens = repeated_tokens(toy, 6, 20, 2)
    one = mk.lens.compare_lenses(toy, tokens, lens, batch_size=None)
    split = mk.lens.compare_lenses(toy, tokens, lens, batch_size=4)
    assert torch.allclose(one.logit_lens_kl, split.logit_lens_kl, atol=1e-5)
    assert torch.allclose(one.tuned_lens_kl, split.tuned_lens_kl, atol=1e-5)


def test_compare_lenses_progress_argument_drives_the_core_progress_bar(toy, monkeypatch):
    from mechkit.core import progress_bar

    bars = []

    def recording(total, description, *, enabled=True, **kw):
        bar = progress_bar(total, description, enabled=False, **kw)
        bars.append((total, enabled, bar))
        return bar

    monkeypatch.setattr(tl, "progress_bar", recording)
    tokens = repeated_tokens(toy, 5, 4, 0)
    shown = mk.lens.compare_lenses(toy, tokens, batch_size=2)
    hidden = mk.lens.compare_lenses(toy, tokens, batch_size=2, progress=False)
    torch.testing.assert_close(shown.logit_lens_kl, hidden.logit_lens_kl)
    assert [(total, enabled, bar.n) for total, enabled, bar in bars] == [
        (5, True, 5),  # one step per sequence, all done
        (5, False, 5),
    ]
