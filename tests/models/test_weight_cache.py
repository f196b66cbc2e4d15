"""The conversion cache is written atomically: a failure or a kill leaves nothing trusted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from mechkit.models import weight_cache


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("MECHKIT_CACHE_DIR", str(tmp_path))

    def fill(folder):
        (folder / "weights.safetensors").write_bytes(b"half")
        raise RuntimeError("conversion crashed")

    with pytest.raises(RuntimeError, match="crashed"):
        weight_cache.write_folder_atomically("m", "k1", fill)
    assert weight_cache.cached_folder("m", "k1") is None
    assert list((tmp_path / "models").iterdir()) == []


def test_complete_write_is_found(tmp_path, monkeypatch):
    monkeypatch.setenv("MECHKIT_CACHE_DIR", str(tmp_path))

    def fill(folder):
        (folder / "weights.safetensors").write_bytes(b"data")
        (folder / "meta.json").write_text(json.dumps({"ok": True}))

    final = weight_cache.write_folder_atomically("m", "k2", fill)
    assert weight_cache.cached_folder("m", "k2") == final
    assert (final / "weights.safetensors").read_bytes() == b"data"


def test_killed_writer_leaves_no_cache_entry(tmp_path, monkeypatch):
    """A process killed halfway through writing leaves no folder a later load would trust."""
    script = textwrap.dedent(
        f"""
        import os, time
        os.environ["MECHKIT_CACHE_DIR"] = {str(tmp_path)!r}
        from mechkit.models import weight_cache
        def fill(folder):
            (folder / "weights.safetensors").write_bytes(b"x" * 1000)
            print("writing", flush=True)
            time.sleep(60)
            (folder / "meta.json").write_text("{{}}")
        weight_cache.write_folder_atomically("m", "k3", fill)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    monkeypatch.setenv("MECHKIT_CACHE_DIR", str(tmp_path))
    assert weight_cache.cached_folder("m", "k3") is None
    assert not (tmp_path / "models" / "m-k3").exists()


def test_key_changes_with_processing_and_file(tmp_path):
    f = tmp_path / "a.gguf"
    f.write_bytes(b"1")
    k1 = weight_cache.cache_key(f, {"fold_ln": True})
    assert k1 == weight_cache.cache_key(f, {"fold_ln": True})
    assert k1 != weight_cache.cache_key(f, {"fold_ln": False})
    f.write_bytes(b"22")
    assert k1 != weight_cache.cache_key(f, {"fold_ln": True})
