"""Reading files that hold data: never code, and a clear error when one is damaged.

Every loader in mechkit reads its files through these functions. None of them unpickles:
JSON is parsed as JSON, safetensors as safetensors, and PyTorch checkpoints with
``torch.load(..., weights_only=True)``, which builds only tensors and plain containers and
refuses anything else before it runs. A file that is truncated, holds random bytes, is another
format, or parses but has the wrong shape raises :class:`~mechkit.errors.FileFormatError`
naming the file, what was expected, and a hint.

Example:
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "graph.json"
    >>> _ = path.write_text('{"nodes": [')                     # truncated
    >>> read_json(path, "a circuit graph", "write it with CircuitGraph.save")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    mechkit.errors.FileFormatError: ...graph.json...
"""

from __future__ import annotations

import contextlib
import json
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mechkit.errors import FileFormatError, MechkitError

__all__ = ["reading", "read_json", "read_safetensors", "read_checkpoint"]

# What parsing a damaged file, or using a parsed file of the wrong shape, raises. OSError is not
# here: a missing or unreadable file is not a format error and keeps its own message.
_PARSE_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,  # json.JSONDecodeError, UnicodeDecodeError, bad numbers
    KeyError,
    TypeError,
    AttributeError,
    IndexError,
    RuntimeError,  # torch: bad archive, size mismatch on load_state_dict
    EOFError,
    pickle.UnpicklingError,  # torch.load(weights_only=True) refusing a global
)


def _safetensor_error() -> type[BaseException]:
    from safetensors import SafetensorError

    return SafetensorError


@contextlib.contextmanager
def reading(
    path: str | Path, what: str, hint: str, error: type[FileFormatError] = FileFormatError
) -> Iterator[None]:
    """Turn any parse or shape error raised in the block into ``error`` (a
    :class:`FileFormatError`) naming ``path``, ``what`` it should hold, the error, and ``hint``.
    Mechkit's own errors, and OSError (a missing or unreadable file), pass through unchanged.

    Example:
        >>> with reading("lens.json", "a lens record", "save it again"):  # doctest: +ELLIPSIS
        ...     int("not a number")
        Traceback (most recent call last):
        ...
        mechkit.errors.FileFormatError: ...lens.json...
    """
    try:
        yield
    except MechkitError:
        raise
    except (*_PARSE_ERRORS, _safetensor_error()) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise error(
            f"Expected {what} in {str(path)!r}; the file is damaged, truncated or another format "
            f"({type(exc).__name__}: {detail[:300]}). Hint: {hint}"
        ) from exc


def read_json(
    path: str | Path,
    what: str,
    hint: str,
    error: type[FileFormatError] = FileFormatError,
    *,
    expect: type = dict,
) -> Any:
    """The parsed JSON in ``path`` (UTF-8), which must be an ``expect`` (a JSON object by
    default), or ``error``.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "meta.json"
        >>> _ = path.write_text('{"n_layers": 2}')
        >>> read_json(path, "a record", "write it again")
        {'n_layers': 2}
    """
    with reading(path, what, hint, error):
        value = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(value, expect):
            raise TypeError(f"expected a JSON {expect.__name__}, got a {type(value).__name__}")
        return value


def read_safetensors(
    path: str | Path, what: str, hint: str, error: type[FileFormatError] = FileFormatError
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors (on the CPU) and the string metadata of a safetensors file, or
    :class:`FileFormatError`. A truncated file is refused by safetensors itself, which checks
    that the data the header announces is all there.

    Example:
        >>> import tempfile
        >>> from safetensors.torch import save_file
        >>> path = str(Path(tempfile.mkdtemp()) / "w.safetensors")
        >>> save_file({"A": torch.zeros(2, 3)}, path, metadata={"note": "x"})
        >>> tensors, meta = read_safetensors(path, "weights", "save them again")
        >>> tensors["A"].shape, meta
        (torch.Size([2, 3]), {'note': 'x'})
    """
    from safetensors import safe_open

    with reading(path, what, hint, error):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not a dict)
        return tensors, metadata


def read_checkpoint(
    path: str | Path,
    what: str,
    hint: str,
    error: type[FileFormatError] = FileFormatError,
    *,
    map_location: Any = None,
) -> Any:
    """A PyTorch checkpoint loaded with ``weights_only=True`` (tensors, numbers, strings and
    containers only), or :class:`FileFormatError`. A file whose unpickling would build any other
    object, or call anything, is refused before it runs.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "state.pt"
        >>> torch.save({"step": 3, "w": torch.ones(2)}, path)
        >>> read_checkpoint(path, "a checkpoint", "delete it")["step"]
        3
    """
    with open(path, "rb") as f:  # a missing or unreadable file raises its own OSError here
        with reading(path, what, hint, error):
            try:
                return torch.load(f, map_location=map_location, weights_only=True)
            except OSError as exc:  # torch's zip reader reports a damaged archive as EINVAL
                raise ValueError(str(exc)) from exc
