"""Shared fixtures: the real embedded model (converted once per session into a fresh cache) and
the toy model."""

from __future__ import annotations

import os

import pytest
import torch

import mechkit as mk


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A fresh conversion cache for the whole session, so the first load really converts."""
    path = tmp_path_factory.mktemp("mechkit-cache")
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
