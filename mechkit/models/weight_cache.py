"""The on-disk cache of converted models.

Converting a GGUF file (dequantize, map onto TransformerLens, fold the norms) takes tens of
seconds; loading the result from safetensors takes a few. Each cached model is a folder::

    $MECHKIT_CACHE_DIR/models/<name>-<key>/
        hf_config.json          the Hugging Face config the TransformerLens config is built from
        tokenizer/              the tokenizer, saved by transformers
        weights.safetensors     the processed HookedTransformer parameters (float32)
        meta.json               what was converted, from which file, how (written last),
                                and the size and checksum of every other file in the folder

The folder is written under a temporary name beside its final one and renamed into place in
one step, so a process killed mid-write leaves no folder a later load would trust.

Every load from the cache is verified against the record in ``meta.json``: the list of files
and their sizes first (a truncated entry is refused at once), then an xxHash3-128 checksum of
each file's content, computed at write time. The checksum is not a signature (whoever can
rewrite the weights can rewrite ``meta.json``); it catches files altered in place, damaged or
truncated. Hashing reads each file through a memory map on a second thread while the model is
being built (see :func:`mechkit.models.conversion.load_gguf`); a mismatch raises
:class:`~mechkit.errors.CacheError` naming the folder to delete. Entries written before the
checksums existed (format 1) have another key, so they are never read: the model is converted
again once, and the old folder can be deleted.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import xxhash
from filelock import FileLock

from mechkit.errors import CacheError

__all__ = [
    "cache_root",
    "cache_key",
    "cached_folder",
    "write_folder_atomically",
    "check_entry",
    "verify_entry",
]

CACHE_ENV_VAR = "MECHKIT_CACHE_DIR"
FORMAT_VERSION = 2  # 2: meta.json records each file's size and checksum
CHECKSUM = "xxh3_128"


def cache_root() -> Path:
    """The cache directory: ``$MECHKIT_CACHE_DIR`` if set, else ``~/.cache/mechkit``.

    Example:
        >>> cache_root().name in ("mechkit",) or cache_root().is_absolute()
        True
    """
    env = os.environ.get(CACHE_ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mechkit"


def cache_key(source: Path, processing: dict[str, bool | int | None]) -> str:
    """A short key that changes when the source file or the processing changes.

    Example:
        >>> source = Path(mk.__file__)
        >>> key = cache_key(source, {"fold_ln": True})
        >>> len(key), key == cache_key(source, {"fold_ln": False})
        (16, False)
    """
    stat = source.stat()
    ident = {
        "path": str(source.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "processing": processing,
        "format": FORMAT_VERSION,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def cached_folder(name: str, key: str) -> Path | None:
    """The complete cache folder for (name, key), or None when there is none.

    Example:
        >>> cached_folder("no-such-model", "0" * 16) is None
        True
    """
    folder = cache_root() / "models" / f"{name}-{key}"
    return folder if (folder / "meta.json").is_file() else None


def write_folder_atomically(name: str, key: str, fill: Callable[[Path], None]) -> Path:
    """Create the cache folder for (name, key) by calling ``fill(tmp_folder)``, then rename.

    If ``fill`` raises, the temporary folder is removed and nothing is left behind. Processes
    (or threads) that ask for the same folder at once take turns on a lock file beside it
    (``.NAME-KEY.lock``, left in place): the first fills it, the others wait and return its
    folder, so a model is converted once however many workers load it at the same time.

    Example:
        >>> import os, tempfile
        >>> os.environ["MECHKIT_CACHE_DIR"] = tempfile.mkdtemp()
        >>> def fill(folder):
        ...     _ = (folder / "meta.json").write_text("{}")
        ...     _ = (folder / "weights.bin").write_bytes(b"w")
        >>> folder = write_folder_atomically("demo", "0" * 16, fill)
        >>> sorted(check_entry(folder)["files"]), cached_folder("demo", "0" * 16) == folder
        (['weights.bin'], True)
        >>> del os.environ["MECHKIT_CACHE_DIR"]
    """
    parent = cache_root() / "models"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-{key}.", suffix=".partial", dir=parent))
    except OSError as exc:
        raise CacheError(
            f"Expected a writable cache folder for converted models at {str(parent)!r} (from "
            f"${CACHE_ENV_VAR}, else ~/.cache/mechkit); it cannot be created or written "
            f"({type(exc).__name__}: {exc.strerror or exc}). Hint: point ${CACHE_ENV_VAR} at a "
            "folder you can write, e.g. export MECHKIT_CACHE_DIR=~/.cache/mechkit."
        ) from None
    final = parent / f"{name}-{key}"
    with FileLock(parent / f".{name}-{key}.lock"):
        if cached_folder(name, key) is not None:  # another process filled it while we waited
            shutil.rmtree(tmp, ignore_errors=True)
            return final
        try:
            fill(tmp)
            if not (tmp / "meta.json").is_file():
                raise RuntimeError("cache writer did not write meta.json")  # a bug, not input
            meta = json.loads((tmp / "meta.json").read_text())
            meta["files"] = {rel: _record(tmp / rel) for rel in _entry_files(tmp)}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
            try:
                os.replace(tmp, final)
            except OSError:
                if not (final / "meta.json").is_file():  # not a concurrent writer: a failure
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final


def _entry_files(folder: Path) -> list[str]:
    """Every file in a cache folder but meta.json, as sorted relative POSIX paths."""
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if not p.is_dir() and p.relative_to(folder).as_posix() != "meta.json"
    )


def _digest(path: Path) -> str:
    """The xxHash3-128 of a file, hashed straight from a read-only memory map: no copy into
    Python buffers (three times faster than reading it in chunks), and xxhash releases the GIL,
    so the model can be built meanwhile."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return xxhash.xxh3_128(b"").hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return xxhash.xxh3_128(mapped).hexdigest()


def _record(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, CHECKSUM: _digest(path)}


def _damaged(folder: Path, what: str) -> CacheError:
    return CacheError(
        f"Expected the cache entry {str(folder)!r} to hold the files mechkit wrote there; "
        f"{what}. Hint: delete that folder (rm -r '{folder}') and load the model again to "
        "convert it afresh."
    )


def check_entry(folder: Path) -> dict[str, Any]:
    """The record (``meta.json``) of a cache folder, after the quick checks: it parses, it lists
    the folder's files with their checksums, and every file is there with its recorded size.

    Raises:
        CacheError: any of these fails; the message names the folder to delete.

    Example:
        >>> import os, tempfile
        >>> os.environ["MECHKIT_CACHE_DIR"] = tempfile.mkdtemp()
        >>> meta = lambda folder: (folder / "meta.json").write_text("{}")
        >>> folder = write_folder_atomically("m", "1" * 16, meta)
        >>> verify_entry(folder, check_entry(folder))        # nothing altered: no error
        >>> del os.environ["MECHKIT_CACHE_DIR"]
    """
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise _damaged(folder, f"meta.json cannot be read ({type(exc).__name__}: {exc})") from None
    files = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(files, dict) or not all(
        isinstance(r, dict) and isinstance(r.get("size"), int) and CHECKSUM in r
        for r in files.values()
    ):
        raise _damaged(folder, "meta.json records no checksums (or a damaged list of them)")
    present = _entry_files(folder)
    if sorted(files) != present:
        missing = sorted(set(files) - set(present))
        extra = sorted(set(present) - set(files))
        raise _damaged(folder, f"files missing {missing[:5]}, files added {extra[:5]}")
    for rel, record in files.items():
        size = (folder / rel).stat().st_size
        if size != record["size"]:
            raise _damaged(
                folder, f"{rel} has {size} bytes where {record['size']} were written (truncated?)"
            )
    return meta


def verify_entry(folder: Path, meta: dict[str, Any]) -> None:
    """Compare every file's checksum with the one recorded at write time.

    Raises:
        CacheError: a file changed since it was written; the message names the folder.

    Example:
        >>> import os, tempfile
        >>> os.environ["MECHKIT_CACHE_DIR"] = tempfile.mkdtemp()
        >>> def fill(folder):
        ...     _ = (folder / "meta.json").write_text("{}")
        ...     _ = (folder / "w.bin").write_bytes(b"w")
        >>> folder = write_folder_atomically("m", "2" * 16, fill)
        >>> _ = (folder / "w.bin").write_bytes(b"x")        # altered after writing
        >>> verify_entry(folder, check_entry(folder))        # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        mechkit.errors.CacheError: ...
        >>> del os.environ["MECHKIT_CACHE_DIR"]
    """
    for rel, record in meta["files"].items():
        if _digest(folder / rel) != record[CHECKSUM]:
            raise _damaged(folder, f"{rel} changed since it was written (its checksum differs)")
