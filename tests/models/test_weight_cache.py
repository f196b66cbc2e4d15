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
    # only the (empty) lock file that writers of this entry take turns on
    assert [p.name for p in (tmp_path / "models").iterdir()] == [".m-k1.lock"]


def test_writers_at_once_fill_the_entry_once(tmp_path, monkeypatch):
    """Workers loading the same model at the same time convert it once: the others wait on
    the entry's lock file and get the first one's folder."""
    import threading
    import time

    monkeypatch.setenv("MECHKIT_CACHE_DIR", str(tmp_path))
    fills = []

    def fill(folder):
        fills.append(threading.get_ident())
        time.sleep(0.3)  # the others arrive while this one converts
        (folder / "weights.safetensors").write_bytes(b"data")
        (folder / "meta.json").write_text("{}")

    results = []
    threads = [
        threading.Thread(
            target=lambda: results.append(weight_cache.write_folder_atomically("m", "k0", fill))
        )
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(fills) == 1 and len(results) == 3 and len(set(results)) == 1
    assert weight_cache.cached_folder("m", "k0") == results[0]
    assert not list((tmp_path / "models").glob("*.partial"))


def test_complete_write_is_found(tmp_path, monkeypatch):
    monkeypatch.setenv("MECHKIT_CACHE_DIR", str(tmp_path))

    def fill(folder):
        (folder / "weights.safetensors").write_bytes(b"data")
        (folder / "meta.json").write_text(json.dumps({"ok": True}))

    final = weight_cache.write_folder_atomically("m", "k2", fill)
    assert weight_cache.cached_folder("m", "k2") == final
    assert (final / "weights.safetensors").read_bytes() == b"data"


@pytest.mark.slow  # a writer subprocess (importing mechkit), killed
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

    def fill(folder):
        (folder / "meta.json").write_text("{}")

    # the kill released the lock (the OS drops it with the process): a new writer goes on
    assert weight_cache.write_folder_atomically("m", "k3", fill) == tmp_path / "models" / "m-k3"


def test_key_changes_with_processing_and_file(tmp_path):
    f = tmp_path / "a.gguf"
    f.write_bytes(b"1")
    k1 = weight_cache.cache_key(f, {"fold_ln": True})
    assert k1 == weight_cache.cache_key(f, {"fold_ln": True})
    assert k1 != weight_cache.cache_key(f, {"fold_ln": False})
    f.write_bytes(b"22")
    assert k1 != weight_cache.cache_key(f, {"fold_ln": True})


# ---------------------------------------------------------------------------------- checksums


def _entry(tmp_path, monkeypatch, key="k4"):
    monkeypatch.setenv("MECHKIT_CACHE_DIR", str(tmp_path))

    def fill(folder):
        (folder / "weights.safetensors").write_bytes(bytes(range(256)) * 400)
        (folder / "tokenizer").mkdir()
        (folder / "tokenizer" / "tokenizer.json").write_text('{"vocab": {}}')
        (folder / "meta.json").write_text(json.dumps({"n_ctx": 8}))

    return weight_cache.write_folder_atomically("m", key, fill)


def test_cache_record_holds_size_and_checksum_of_every_file(tmp_path, monkeypatch):
    import xxhash

    folder = _entry(tmp_path, monkeypatch)
    meta = weight_cache.check_entry(folder)
    assert meta["n_ctx"] == 8
    weights = (folder / "weights.safetensors").read_bytes()
    assert meta["files"]["weights.safetensors"] == {
        "size": len(weights),
        "xxh3_128": xxhash.xxh3_128(weights).hexdigest(),  # computed here independently
    }
    assert sorted(meta["files"]) == ["tokenizer/tokenizer.json", "weights.safetensors"]
    weight_cache.verify_entry(folder, meta)  # an untouched entry passes


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        ("altered in place", "changed since it was written"),
        ("truncated", "truncated"),
        ("tokenizer altered", "tokenizer/tokenizer.json changed"),
        ("file added", "files added"),
        ("file removed", "files missing"),
        ("meta not json", "meta.json cannot be read"),
        ("meta without checksums", "records no checksums"),
    ],
)
def test_damaged_cache_entry_raises_cache_error_naming_the_folder(
    damage, says, tmp_path, monkeypatch
):
    from mechkit.errors import CacheError

    folder = _entry(tmp_path, monkeypatch)
    weights = folder / "weights.safetensors"
    if damage == "altered in place":  # one byte, same size, same mtime
        stat = weights.stat()
        data = bytearray(weights.read_bytes())
        data[5000] ^= 1
        weights.write_bytes(bytes(data))
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "tokenizer altered":
        (folder / "tokenizer" / "tokenizer.json").write_text('{"vocab": []}')
    elif damage == "file added":
        (folder / "tokenizer" / "added_tokens.json").write_text("{}")
    elif damage == "file removed":
        (folder / "tokenizer" / "tokenizer.json").unlink()
    elif damage == "meta not json":
        (folder / "meta.json").write_text("{not json")
    else:
        meta = json.loads((folder / "meta.json").read_text())
        del meta["files"]
        (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CacheError, match=says) as err:
        weight_cache.verify_entry(folder, weight_cache.check_entry(folder))
    assert f"rm -r '{folder}'" in str(err.value)


def test_cache_dir_that_is_a_file_raises_cache_error(tmp_path, monkeypatch):
    from mechkit.errors import CacheError

    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("a file")
    monkeypatch.setenv("MECHKIT_CACHE_DIR", str(not_a_folder))
    with pytest.raises(CacheError, match="MECHKIT_CACHE_DIR") as err:
        weight_cache.write_folder_atomically("m", "k5", lambda folder: None)
    assert str(not_a_folder) in str(err.value)


def test_read_only_cache_dir_raises_cache_error(tmp_path, monkeypatch):
    from mechkit.errors import CacheError

    read_only = tmp_path / "cache"
    (read_only / "models").mkdir(parents=True)
    monkeypatch.setenv("MECHKIT_CACHE_DIR", str(read_only))
    if os.geteuid() == 0:  # root writes through file modes: refuse the write as the OS would
        import errno
        import tempfile

        def refuse(*args, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied")

        monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    else:
        (read_only / "models").chmod(0o555)
    try:
        with pytest.raises(CacheError, match="writable cache folder") as err:
            weight_cache.write_folder_atomically("m", "k6", lambda folder: None)
    finally:
        (read_only / "models").chmod(0o755)
    assert str(read_only / "models") in str(err.value)
