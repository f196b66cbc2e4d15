"""The training recipes keep their working files under the user's mechkit cache."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize("recipe", ["train_smollm2_topk", "train_smollm2_transcoder"])
def test_recipe_checkpoints_default_to_the_user_cache_not_the_temp_dir(
    recipe, tmp_path, monkeypatch
):
    """The default --cache (activations and checkpoint.pt) lies under $MECHKIT_CACHE_DIR, not
    at a fixed name under the system temporary directory that any local user can write to."""
    cache = tmp_path / "user-cache"
    monkeypatch.setenv("MECHKIT_CACHE_DIR", str(cache))
    monkeypatch.setattr(sys, "argv", [recipe])
    seen = {}
    parse = argparse.ArgumentParser.parse_args

    def stop_after_parsing(self, *args, **kwargs):
        seen["args"] = parse(self, *args, **kwargs)
        raise SystemExit(0)  # before the model is loaded

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", stop_after_parsing)
    module = importlib.import_module(f"mechkit.sae.recipes.{recipe}")
    with pytest.raises(SystemExit):
        module.main()
    default = Path(seen["args"].cache)
    assert default.is_relative_to(cache)
    assert not str(default).startswith("/tmp/mechkit-sae-cache")
