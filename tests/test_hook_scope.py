"""The hook scopes restore exactly the hooks that were there, whatever happens inside."""

from __future__ import annotations

import pytest

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


def test_hook_scope_interrupted_inside_transformer_lens_cleanup(toy, monkeypatch):
    """The exact failure: TransformerLens's reset raises half-way; the scope still cleans up."""
    original = type(toy).reset_hooks
    calls = {"n": 0}

    def flaky_reset(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(toy), "reset_hooks", flaky_reset)
    level = toy.context_level
    with pytest.raises(KeyboardInterrupt):
        with hook_scope(toy, fwd_hooks=[("blocks.0.hook_resid_pre", lambda a, hook: None)]):
            pass
    assert hook_count(toy) == 0
    assert toy.context_level == level
