"""The activation store: every activation exactly once per epoch, the memmap cache equal to a
fresh forward, transcoder pairs equal to a hooked forward's values, resumption, errors."""

from __future__ import annotations

import json

import pytest
import torch

from mechkit.errors import MechkitError, ShapeError, SiteNotFoundError
from mechkit.sae import ActivationStore, SAEConfig, TrainConfig, train_sae
from mechkit.sae.activations import ActivationCacheError

torch.set_num_threads(1)

RESID = "blocks.1.hook_resid_pre"
LN_IN, ATTN_OUT = "blocks.0.ln1.hook_normalized", "blocks.0.hook_attn_out"


@pytest.fixture(scope="module")
def tokens(toy):
    g = torch.Generator().manual_seed(0)
    t = torch.randint(1, toy.cfg.d_vocab, (37, 17), generator=g)
    t[:, 0] = 0  # a BOS-like first token, dropped by exclude_bos
    return t


def all_rows(model, tokens, *names, drop_first=True):
    """Every activation of ``names`` by one plain hooked forward pass (no store code)."""
    _, cache = model.run_with_cache(tokens, names_filter=list(names))
    out = []
    for name in names:
        act = cache[name][:, 1:] if drop_first else cache[name]
        out.append(act.reshape(-1, act.shape[-1]))
    return torch.cat(out, dim=-1)


def sort_rows(rows):
    """Rows in a canonical order (lexicographic), so two sets can be compared."""
    for col in reversed(range(rows.shape[1])):
        rows = rows[rows[:, col].argsort(stable=True)]
    return rows


def test_every_activation_exactly_once_per_epoch(toy, tokens):
    store = ActivationStore(toy, RESID, tokens, batch_size=50, buffer_size=200, model_batch_size=4)
    assert store.n_rows == 37 * 16 and store.d_in == toy.cfg.d_model
    expected = sort_rows(all_rows(toy, tokens, RESID))
    epochs = []
    for e in range(2):
        batches = list(store.epoch(e))
        assert len(batches) == store.batches_per_epoch == 12
        assert [b.shape[0] for b in batches[:-1]] == [50] * 11 and batches[-1].shape[0] == 42
        got = torch.cat(batches)
        torch.testing.assert_close(sort_rows(got), expected, atol=1e-5, rtol=1e-5)
        epochs.append(got)
    assert not torch.equal(epochs[0], epochs[1])  # a new order each epoch
    # the buffer mixes chunks: the first batch holds rows of several forward passes
    first = torch.cat(list(store.epoch(0))[:1])
    chunk_of = {
        tuple(r.tolist()): i // (4 * 16) for i, r in enumerate(all_rows(toy, tokens, RESID))
    }
    assert len({chunk_of[tuple(r.tolist())] for r in first}) > 1


def test_iter_batches_resumes_at_any_batch_across_epochs(toy, tokens):
    store = ActivationStore(toy, RESID, tokens, batch_size=64, buffer_size=128, model_batch_size=8)
    it = store.iter_batches()
    stream = [next(it) for _ in range(store.batches_per_epoch + 3)]
    for start in (0, 5, store.batches_per_epoch + 1):
        resumed = store.iter_batches(start)
        for expected in stream[start : start + 2]:
            assert torch.equal(next(resumed), expected)


def test_memmap_cache_equals_a_fresh_forward_and_is_reused(toy, tokens, tmp_path, monkeypatch):
    kw = {"batch_size": 40, "buffer_size": 160, "model_batch_size": 5, "seed": 3}
    fresh = list(ActivationStore(toy, RESID, tokens, **kw).epoch(1))
    cached = ActivationStore(toy, RESID, tokens, cache_dir=tmp_path / "c", **kw)
    assert [torch.equal(a, b) for a, b in zip(cached.epoch(1), fresh, strict=True)] == [True] * len(
        fresh
    )
    header = json.loads((tmp_path / "c" / "header.json").read_text())
    assert header["rows"] == 37 * 16 and header["hook_name"] == RESID
    # a second store reads the file: the model is never run again after the width probe
    again = ActivationStore(toy, RESID, tokens, cache_dir=tmp_path / "c", **kw)
    monkeypatch.setattr(type(toy), "run_with_cache", lambda *a, **k: pytest.fail("forward ran"))
    assert all(torch.equal(a, b) for a, b in zip(again.epoch(1), fresh, strict=True))
    monkeypatch.undo()
    with pytest.raises(ActivationCacheError, match="tokens_sha256"):
        ActivationStore(toy, RESID, tokens[:-1], cache_dir=tmp_path / "c", **kw).build_cache()


def test_float16_cache_is_close_to_the_forward(toy, tokens, tmp_path):
    kw = {"batch_size": 100, "buffer_size": 200, "seed": 1}
    fresh = torch.cat(list(ActivationStore(toy, RESID, tokens, **kw).epoch(0)))
    half = ActivationStore(toy, RESID, tokens, cache_dir=tmp_path, cache_dtype="float16", **kw)
    torch.testing.assert_close(torch.cat(list(half.epoch(0))), fresh, atol=2e-3, rtol=2e-3)


def test_transcoder_pairs_equal_a_hooked_forward(toy, tokens, tmp_path):
    store = ActivationStore(
        toy,
        LN_IN,
        tokens,
        out_hook_name=ATTN_OUT,
        batch_size=64,
        buffer_size=256,
        cache_dir=tmp_path,
    )
    assert (store.d_in, store.d_out) == (toy.cfg.d_model, toy.cfg.d_model)
    pairs = list(store.epoch(0))
    assert all(isinstance(p, tuple) and p[0].shape[0] == p[1].shape[0] for p in pairs)
    got = torch.cat([torch.cat(p, dim=-1) for p in pairs])
    # the full model (no stop_at_layer), both hooks from one pass, rows kept together
    expected = all_rows(toy, tokens, LN_IN, ATTN_OUT)
    torch.testing.assert_close(sort_rows(got), sort_rows(expected), atol=1e-5, rtol=1e-5)


def test_bad_inputs_raise_clear_errors(toy, tokens):
    with pytest.raises(SiteNotFoundError, match="Did you mean 'blocks.1.hook_resid_pre'"):
        ActivationStore(toy, "blocks.1.hook_resid_pr", tokens)
    with pytest.raises(SiteNotFoundError, match="hook_attn_out"):
        ActivationStore(toy, LN_IN, tokens, out_hook_name="blocks.0.hook_atn_out")
    with pytest.raises(ShapeError, match="integer"):
        ActivationStore(toy, RESID, tokens.float())
    with pytest.raises(ShapeError, match="multiple of 2 \\* batch_size"):
        ActivationStore(toy, RESID, tokens, batch_size=10, buffer_size=30)
    store = ActivationStore(toy, RESID, tokens, batch_size=64, buffer_size=128)
    wrong = SAEConfig(architecture="topk", d_in=64, d_sae=32, k=4, hook_name=RESID)
    with pytest.raises(ShapeError, match="d_in=64.*got width 128") as info:
        train_sae(wrong, store, TrainConfig(total_tokens=128, progress=False))
    assert isinstance(info.value, MechkitError)
    tc = SAEConfig(
        architecture="relu", d_in=128, d_sae=32, hook_name=RESID, d_out=128, out_hook_name=ATTN_OUT
    )
    with pytest.raises(ShapeError, match="pairs"):
        train_sae(tc, store, TrainConfig(total_tokens=128, progress=False))


def test_train_sae_on_a_store_resumes_from_the_cache(toy, tokens, tmp_path):
    """Training through the store: a killed run resumed (data order from the store's state)
    equals an uninterrupted one."""
    cfg = SAEConfig(architecture="topk", d_in=128, d_sae=256, k=8, hook_name=RESID)
    kw = {"batch_size": 64, "buffer_size": 128, "cache_dir": tmp_path / "acts"}
    train = TrainConfig(total_tokens=64 * 14, log_every=2, checkpoint_every=4, progress=False)
    whole = train_sae(cfg, ActivationStore(toy, RESID, tokens, **kw), train)
    ckpt = tmp_path / "ckpt"
    part = train_sae(
        cfg,
        ActivationStore(toy, RESID, tokens, **kw),
        train,
        checkpoint_dir=ckpt,
        stop_after_steps=7,
    )
    assert part.result.tokens == 7 * 64
    resumed = train_sae(cfg, ActivationStore(toy, RESID, tokens, **kw), train, checkpoint_dir=ckpt)
    for name, tensor in whole.sae.state_dict().items():
        assert torch.equal(resumed.sae.state_dict()[name], tensor), name
