"""The on-disk cache of converted models.

Converting a GGUF file (dequantize, map onto TransformerLens, fold the norms) takes tens of
seconds; loading the result from safetensors takes a few. Each cached model is a folder::

    $MECHKIT_CACHE_DIR/models/<name>-<key>/
        hf_config.json          the Hugging Face config the TransformerLens config is built from
        tokenizer/              the tokenizer, saved by transformers
        weights.safetensors     the processed HookedTransformer parameters (float32)
        meta.json               what was converted, from which file, how (written last)

The folder is written under a temporary name beside its final one and renamed into place in
one step, so a process killed mid-write leaves no folder a later load would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["cache_root", "cache_key", "cached_folder", "write_folder_atomically"]

CACHE_ENV_VAR = "MECHKIT_CACHE_DIR"
FORMAT_VERSION = 1


def cache_root() -> Path:
    """The cache directory: ``$MECHKIT_CACHE_DIR`` if set, else ``~/.cache/mechkit``."""
    env = os.environ.get(CACHE_ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mechkit"


def cache_key(source: Path, processing: dict[str, bool]) -> str:
    """A short key that changes when the source file or the processing changes."""
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
    """The complete cache folder for (name, key), or None when there is none."""
    folder = cache_root() / "models" / f"{name}-{key}"
    return folder if (folder / "meta.json").is_file() else None


def write_folder_atomically(name: str, key: str, fill: Callable[[Path], None]) -> Path:
    """Create the cache folder for (name, key) by calling ``fill(tmp_folder)``, then rename.

    If ``fill`` raises, the temporary folder is removed and nothing is left behind. If another
    process finished the same folder first, its copy is kept and ours discarded.
    """
    parent = cache_root() / "models"
    parent.mkdir(parents=True, exist_ok=True)
    final = parent / f"{name}-{key}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-{key}.", suffix=".partial", dir=parent))
    try:
        fill(tmp)
        if not (tmp / "meta.json").is_file():
            raise RuntimeError("cache writer did not write meta.json")  # a bug, not user input
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / "meta.json").is_file():  # not a concurrent writer: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
