"""Shared fixtures: the real embedded model (converted once per session into a fresh cache) and
the toy model; the ``slow`` marker, set on every test that loads a real model.

``slow`` means "loads the 135M model (or Gemma)": ``make test-fast`` (``-m "not slow"``) skips
those tests. A test that requests ``smollm2`` or ``session_cache`` (directly or through another
fixture) is marked automatically; a test that loads a real model any other way must carry
``@pytest.mark.slow`` itself, and fails when it does not (a real model is loaded through the
GGUF reader, which refuses while an unmarked test or doctest runs: the guard is in the root
conftest.py, so that it sees the doctests under mechkit/ too). Tests that load a real model in a
subprocess (notebooks, the CLI) cannot be checked that way and carry the mark explicitly.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import mechkit as mk

pytest_plugins = ["pytester"]

SLOW_FIXTURES = frozenset({"smollm2", "session_cache"})
"""Fixtures that exist only for the real models: requesting one makes a test slow."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A fresh conversion cache for the whole session, so the first load really converts.

    One folder for all the workers of ``pytest -n``: the first worker to load a model converts
    it, the others wait for that entry (the cache's lock file) instead of converting again."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    path = shared / "mechkit-cache"
    path.mkdir(exist_ok=True)
    old = os.environ.get("MECHKIT_CACHE_DIR")
    os.environ["MECHKIT_CACHE_DIR"] = str(path)
    yield str(path)
    if old is None:
        os.environ.pop("MECHKIT_CACHE_DIR", None)
    else:
        os.environ["MECHKIT_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def smollm2(session_cache: str):
    """SmolLM2-135M loaded by mechkit on the CPU (the first, converting load of the session)."""
    torch.set_grad_enabled(True)
    return mk.load_model("smollm2-135m", device="cpu")


@pytest.fixture(scope="session")
def toy():
    """The shipped two-layer attention-only toy model."""
    return mk.load_model("attn-only-2l", device="cpu")


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs; a zombie waiting for its parent counts as gone (the
    state follows the last ")" of /proc/PID/stat: a process name may hold spaces)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def hook_count(model) -> int:
    """How many hooks the model's hook points carry (TransformerLens's lists and torch's own)."""
    return sum(
        len(hp.fwd_hooks) + len(hp.bwd_hooks) + len(hp._forward_hooks) + len(hp._backward_hooks)
        for hp in model.hook_dict.values()
    )


DAMAGES = ("truncated", "random bytes", "another format")
JSON_DAMAGES = (*DAMAGES, "JSON of the wrong shape")


def damage(path, how: str) -> None:
    """Spoil a file as a bad disk, an interrupted copy or a wrong path would: cut it in half,
    replace it with random bytes, with a file of another format (a PNG header for a JSON or
    safetensors file), or (JSON) with valid JSON of the wrong shape."""
    import pathlib

    path = pathlib.Path(path)
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "random bytes":
        path.write_bytes(torch.randint(0, 256, (len(data),), dtype=torch.uint8).numpy().tobytes())
    elif how == "another format":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    elif how == "JSON of the wrong shape":
        path.write_text('[{"edges": 3}, "d_in", 4]')
    else:
        raise ValueError(how)


@pytest.fixture(scope="module")
def toy_tokens(toy):
    """Three clean/corrupt token rows for the toy model, differing at position 2."""
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(1, toy.cfg.d_vocab, (3, 6), generator=g)
    corrupt = clean.clone()
    corrupt[:, 2] = torch.randint(1, toy.cfg.d_vocab, (3,), generator=g)
    return clean, corrupt


@pytest.fixture(scope="module")
def toy_sae(toy):
    """A random ReLU SAE on the toy model's residual stream after block 0."""
    from mechkit.sae import SAEConfig, SparseDictionary

    cfg = SAEConfig(
        architecture="relu", d_in=toy.cfg.d_model, d_sae=16, hook_name="blocks.0.hook_resid_post"
    )
    return SparseDictionary.from_config(cfg, seed=0)


def per_prompt_metric(logits):
    """A metric with one value per prompt: logit 3 minus logit 8 at the last position."""
    return logits[:, -1, 3] - logits[:, -1, 8]
