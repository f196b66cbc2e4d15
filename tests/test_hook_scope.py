"""The hook scopes restore exactly the hooks that were there, whatever happens inside."""

from __future__ import annotations

import pytest
import torch

from mechkit.hook_scope import hook_scope, keep_hooks
from tests.conftest import hook_count


def test_keep_hooks_restores_what_was_there(toy):
    """Hooks that were on the model before stay; every hook added inside goes, both ways."""

    def mark(activation, hook):
        return None

    before_hook = ("blocks.0.hook_resid_pre", mark)
    with toy.hooks(fwd_hooks=[before_hook]):
        count = hook_count(toy)
        with keep_hooks(toy):
            toy.add_hook("blocks.1.hook_resid_pre", mark)
            toy.add_hook("blocks.1.hook_resid_pre", mark, dir="bwd")
            toy.add_hook("blocks.0.hook_resid_pre", mark, is_permanent=True)
            assert hook_count(toy) == count + 6  # each: a TransformerLens handle, a torch entry
        assert hook_count(toy) == count
    assert hook_count(toy) == 0


def test_an_interrupt_during_the_restore_restarts_it_and_is_raised_after(toy, monkeypatch):
    """A Ctrl-C that lands half-way through the restore: the restore runs again to the end, and
    the interrupt reaches the caller once the model is clean."""
    from mechkit import hook_scope as scope

    original = scope._restore
    calls = {"n": 0}

    def interrupted_once(model, snapshot):
        calls["n"] += 1
        if calls["n"] == 1:
            hp = model.hook_dict["blocks.0.hook_resid_pre"]
            hp.fwd_hooks[-1].hook.remove()  # part of the work done, then the interrupt
            raise KeyboardInterrupt
        original(model, snapshot)

    monkeypatch.setattr(scope, "_restore", interrupted_once)
    level = toy.context_level
    with pytest.raises(KeyboardInterrupt):
        with hook_scope(toy, fwd_hooks=[("blocks.0.hook_resid_pre", lambda a, hook: None)]):
            with hook_scope(toy, fwd_hooks=[("blocks.1.hook_resid_pre", lambda a, hook: None)]):
                pass
    assert calls["n"] >= 2
    assert hook_count(toy) == 0
    assert toy.context_level == level


def test_run_with_cache_equals_transformer_lens(toy):
    from mechkit.hook_scope import run_with_cache

    tokens = torch.randint(1, 500, (2, 6), generator=torch.Generator().manual_seed(1))
    names = ["blocks.0.hook_resid_pre", "blocks.1.attn.hook_z"]
    with torch.no_grad():
        logits, cache = run_with_cache(toy, tokens, names_filter=names)
        ref_logits, ref = toy.run_with_cache(tokens, names_filter=lambda n: n in names)
    assert sorted(cache) == sorted(names)
    torch.testing.assert_close(logits, ref_logits)
    for name in names:
        torch.testing.assert_close(cache[name], ref[name])
    assert hook_count(toy) == 0
