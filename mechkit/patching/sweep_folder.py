"""The output folder of ``mechkit sweep``: its journal, its ``run.json``, and what a sweep may
delete or overwrite there.

A sweep deletes or overwrites only files it can show it wrote:

- ``run.json`` when it is a JSON object marked ``"kind": "mechkit sweep"``;
- ``results.jsonl`` when its first line is a sweep journal header (with that ``run.json``, the
  same fingerprint), or when it holds no complete line yet and that ``run.json`` is there;
- an output (``NAME.csv`` ``.html`` ``.png``, ``results.parquet``, ``plotly.min.js``) when
  ``run.json``'s manifest lists its plain file name with a size and SHA-256 that the file, a
  regular file and not a link, still has.

Anything else that a sweep would overwrite or delete (another program's file, a file edited
after the sweep wrote it, a link, a manifest name with ``/`` or ``..``) stops it with an
:class:`~mechkit.errors.OutputFolderError` naming the file, before any model loads. Links are
never followed. An output is first written beside its place; the manifest then accepts both its
old and new content, the file is renamed into place, and the manifest keeps the new one, so a
kill at any moment leaves a folder the next run still recognises as its own.

The journal (``results.jsonl``) holds one JSON record a line: a header, a ``plan`` per (entry,
batch) and a ``cell`` per result. Reading it checks every record's fields; a damaged one is a
:class:`~mechkit.errors.FileFormatError` naming the line (a torn last line is cut off instead).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mechkit.errors import FileFormatError, OutputFolderError

JOURNAL, RUN_FILE, PARQUET, PLOTLY_JS = (
    "results.jsonl",
    "run.json",
    "results.parquet",
    "plotly.min.js",
)
KIND = "mechkit sweep"  # run.json's "kind": the mark of a run file this tool wrote

_MOVE_IT = "Hint: move it out of the folder (or delete it yourself), or choose another --out."


def _refuse(path: Path, why: str, hint: str = _MOVE_IT) -> OutputFolderError:
    return OutputFolderError(
        f"Expected {path.parent} to hold only files that mechkit sweep wrote wherever it would "
        f"overwrite or delete one; {path.name} {why}. {hint}"
    )


# ----------------------------------------------------------------------------------- folder


def check_folder(folder: Path) -> None:
    """Make ``folder`` if needed; refuse a file, or a folder this process cannot write to.

    Example:
        >>> with tempfile.TemporaryDirectory() as d:
        ...     check_folder(Path(d) / "run")
        ...     (Path(d) / "run").is_dir()
        True
    """
    if folder.is_symlink() and not folder.exists():
        raise OutputFolderError(
            f"Expected --out to be a folder; {folder} is a link to nothing. Hint: choose "
            "another --out."
        )
    if folder.exists() and not folder.is_dir():
        raise OutputFolderError(
            f"Expected --out to be a folder; {folder} is a file. Hint: choose another --out, "
            "or move the file away."
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".mechkit-write-test.")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputFolderError(
            f"Expected an output folder that can be written to; {folder} cannot "
            f"({exc.strerror or exc}). Hint: choose another --out, or make it writable."
        ) from None


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold ``folder/.lock`` so that two runs never write one journal (released on any exit).

    Example:
        >>> with tempfile.TemporaryDirectory() as d, locked(Path(d)):
        ...     with locked(Path(d)):  # doctest: +ELLIPSIS
        ...         pass
        Traceback (most recent call last):
        ...
        mechkit.errors.OutputFolderError: Expected to be the only sweep writing to ...
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with (folder / ".lock").open("a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise OutputFolderError(
                f"Expected to be the only sweep writing to {folder}; another mechkit sweep "
                "holds it. Hint: wait for it, or choose another output folder."
            ) from None
        yield


def read_run_file(folder: Path) -> dict[str, Any] | None:
    """The previous run's ``run.json`` (None when absent); refuses one this tool did not write.

    Example:
        >>> with tempfile.TemporaryDirectory() as d:
        ...     read_run_file(Path(d)) is None
        True
    """
    path = folder / RUN_FILE
    if path.is_symlink():
        raise _refuse(path, "is a link (a sweep writes a plain file there and never follows links)")
    if not path.exists():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError):
        info = None
    if not (isinstance(info, dict) and info.get("kind") == KIND):
        raise _refuse(path, f'is not a run file of mechkit sweep (no "kind": "{KIND}")')
    if not isinstance(info.get("fingerprint"), str) or not isinstance(
        info.get("outputs", {}), dict
    ):
        raise _refuse(path, "is a damaged run file of mechkit sweep (fingerprint or outputs)")
    return info


def check_journal(folder: Path, previous: dict[str, Any] | None) -> bool:
    """Whether ``results.jsonl`` is there; refuses one that is not this sweep's journal.

    Example:
        >>> with tempfile.TemporaryDirectory() as d:
        ...     _ = (Path(d) / JOURNAL).write_text("my notes" + chr(10))
        ...     check_journal(Path(d), None)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        mechkit.errors.OutputFolderError: Expected ... results.jsonl is not a sweep journal ...
    """
    path = folder / JOURNAL
    if path.is_symlink():
        raise _refuse(path, "is a link (a sweep writes a plain file there and never follows links)")
    if not path.exists():
        return False
    if not path.is_file():
        raise _refuse(path, "is not a plain file")
    with path.open("rb") as f:
        first = f.readline()
    if not first.endswith(b"\n"):  # no complete line: a header cut short by a kill
        if previous is not None:
            return True
        raise _refuse(path, "is not a sweep journal (no header line) and no run.json names it")
    header = _json(first)
    if header is None and previous is not None and first == path.read_bytes():
        return True  # the only line, garbled by a crash of the machine: read() cuts it off
    if not _is_header(header):
        raise _refuse(path, "is not a sweep journal (its first line is not a sweep header)")
    if previous is not None and header["fingerprint"] != previous["fingerprint"]:
        raise _refuse(path, "belongs to another sweep than run.json (their fingerprints differ)")
    return True


def _json(line: bytes) -> Any:
    try:
        return json.loads(line)
    except ValueError:
        return None


def _is_header(record: Any) -> bool:
    return (
        isinstance(record, dict)
        and record.get("kind") == "header"
        and isinstance(record.get("fingerprint"), str)
        and re.fullmatch(r"[0-9a-f]{16}", record["fingerprint"]) is not None
        and isinstance(record.get("mechkit"), str)
    )


# ----------------------------------------------------------------------------------- outputs


def _digest(path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


def _is_plain_name(name: Any) -> bool:
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
        and not Path(name).is_absolute()
    )


def owned(folder: Path, name: str, manifest: dict[str, Any]) -> bool:
    """Whether ``folder/name`` exists and is, byte for byte, an output the manifest records;
    False when absent. Raises when it exists and is anything else.

    Example:
        >>> with tempfile.TemporaryDirectory() as d:
        ...     absent = owned(Path(d), "0_z.csv", {})
        ...     _ = (Path(d) / "0_z.csv").write_text("theirs")
        ...     owned(Path(d), "0_z.csv", {})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        mechkit.errors.OutputFolderError: ... 0_z.csv was not written by this sweep ...
        >>> absent
        False
    """
    path = folder / name
    if path.is_symlink():
        raise _refuse(path, "is a link (a sweep writes plain files and never follows links)")
    if not path.exists():
        return False
    versions = manifest.get(name)
    if versions is None:
        raise _refuse(path, "was not written by this sweep (run.json does not list it)")
    if not path.is_file():
        raise _refuse(path, "is not a plain file")
    if not (isinstance(versions, list) and all(isinstance(v, dict) for v in versions)):
        raise _refuse(path, "has a damaged record in run.json's outputs")
    if path.stat().st_size in [v.get("bytes") for v in versions] and _digest(path) in versions:
        return True
    raise _refuse(path, "was changed after this sweep wrote it (its content differs from run.json)")


def clear(folder: Path, previous: dict[str, Any] | None, has_journal: bool) -> None:
    """Delete a previous run's files, only those shown to be its own; checks all of them before
    deleting any, and deletes run.json last (so an interrupted clear can be run again).

    Example:
        >>> with tempfile.TemporaryDirectory() as d:
        ...     _ = (Path(d) / JOURNAL).write_text("{}" + chr(10))
        ...     clear(Path(d), None, has_journal=True)
        ...     (Path(d) / JOURNAL).exists()
        False
    """
    manifest = (previous or {}).get("outputs", {})
    for name in manifest:
        if not _is_plain_name(name):
            raise _refuse(
                folder / RUN_FILE,
                f"lists the output {name!r}, which is not a file name in the folder (a sweep "
                "only writes there), so it was edited",
                "Hint: delete run.json and results.jsonl yourself, or choose another --out.",
            )
    doomed = [folder / name for name in manifest if owned(folder, name, manifest)]
    if has_journal:
        doomed.append(folder / JOURNAL)
    if previous is not None:
        doomed.append(folder / RUN_FILE)
    for path in doomed:
        path.unlink(missing_ok=True)


def claim(folder: Path, names: list[str], manifest: dict[str, Any]) -> None:
    """Refuse unless each of ``names`` is absent or an output the manifest records.

    Example:
        >>> with tempfile.TemporaryDirectory() as d:
        ...     claim(Path(d), ["0_z.csv", "0_z.png"], {})  # absent: nothing to refuse
    """
    for name in names:
        owned(folder, name, manifest)


def write_outputs(
    folder: Path,
    writers: dict[str, Callable[[str], None]],
    manifest: dict[str, Any],
    save: Callable[[], None],
) -> dict[str, Path]:
    """Write each ``folder/name`` with ``writers[name](tmp_path)``, recording it in ``manifest``.

    Each file is written beside its place; ``save()`` then stores a manifest that accepts the old
    and the new content, the files are renamed into place, and ``save()`` stores the new content
    only. ``plotly.min.js``, which plotly writes itself when absent, is recorded when it appears.

    Example:
        >>> manifest = {}
        >>> with tempfile.TemporaryDirectory() as d:
        ...     paths = write_outputs(Path(d), {"a.csv": lambda tmp: Path(tmp).write_text("x")},
        ...                           manifest, lambda: None)
        ...     paths["a.csv"].read_text(), owned(Path(d), "a.csv", manifest)
        ('x', True)
    """
    claim(folder, list(writers), manifest)
    if (folder / PLOTLY_JS).is_symlink():  # plotly would write through it
        raise _refuse(folder / PLOTLY_JS, "is a link (a sweep never follows links)")
    had_plotly_js = (folder / PLOTLY_JS).exists()
    temporary: dict[str, str] = {}
    try:
        for name, write in writers.items():
            fd, temporary[name] = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
            os.close(fd)
            write(temporary[name])
        written = {name: _digest(Path(tmp)) for name, tmp in temporary.items()}
        if not had_plotly_js and (folder / PLOTLY_JS).is_file():
            written[PLOTLY_JS] = _digest(folder / PLOTLY_JS)
        for name, digest in written.items():
            manifest[name] = [*manifest.get(name, []), digest]
        save()
        umask = os.umask(0)
        os.umask(umask)
        for name, tmp in temporary.items():
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual mode
            os.replace(tmp, folder / name)
        for name, digest in written.items():
            manifest[name] = [digest]
        save()
    finally:
        for tmp in temporary.values():
            Path(tmp).unlink(missing_ok=True)
    return {name: folder / name for name in writers}


# ----------------------------------------------------------------------------------- journal


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _index_ok(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


_CHECKS: dict[str, dict[str, Callable[[Any], bool]]] = {
    "header": {
        "fingerprint": lambda v: isinstance(v, str),
        "mechkit": lambda v: isinstance(v, str),
    },
    "plan": {
        "entry": _index_ok,
        "batch": _index_ok,
        "rows": lambda v: isinstance(v, list) and len(v) == 2 and all(map(_index_ok, v)),
        "cells": _index_ok,
        "axes": lambda v: isinstance(v, list) and all(isinstance(a, str) for a in v),
        "labels": lambda v: isinstance(v, dict) and all(isinstance(x, list) for x in v.values()),
        "tick_labels": lambda v: isinstance(v, dict),
        "clean": lambda v: v is None or _number(v),
        "corrupt": lambda v: v is None or _number(v),
        "method": lambda v: isinstance(v, str),
        "site": lambda v: isinstance(v, str),
        "metric": lambda v: isinstance(v, str),
    },
    "cell": {
        "entry": _index_ok,
        "batch": _index_ok,
        "cell": lambda v: isinstance(v, list) and all(map(_index_ok, v)),
        "score": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "per_prompt": lambda v: (
            v is None or (isinstance(v, list) and all(isinstance(x, int | float) for x in v))
        ),
    },
}


class Journal:
    """The append-only results file: one JSON object a line, flushed and fsync'd per append.

    Example:
        >>> with tempfile.TemporaryDirectory() as d:
        ...     journal = Journal(Path(d) / JOURNAL)
        ...     journal.append([{"kind": "header", "fingerprint": "abc", "mechkit": "0"}])
        ...     journal.close()
        ...     records, torn = journal.read()
        >>> records, torn
        ([(1, {'kind': 'header', 'fingerprint': 'abc', 'mechkit': '0'})], False)
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file: Any = None

    def _damaged(self, line: int, what: str) -> FileFormatError:
        return FileFormatError(
            f"Expected {self.path} to hold sweep journal records; line {line} {what}, so the "
            "file was edited or damaged. Hint: rerun with --restart to discard these results, "
            "or choose another --out."
        )

    def read(self) -> tuple[list[tuple[int, dict[str, Any]]], bool]:
        """Every complete record with its line number; cuts a torn last line off the file (True
        when there was one). Raises :class:`FileFormatError` on any other damaged record."""
        if not self.path.exists():
            return [], False
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1  # after the last newline: a write cut short by a kill
        lines = data[:end].split(b"\n")[:-1]
        records = []
        for k, line in enumerate(lines):
            record = _json(line)
            if record is None and line.strip() != b"null":
                if k < len(lines) - 1:
                    raise self._damaged(
                        k + 1, "is not valid JSON and not the last line (only that one can be torn)"
                    )
                end -= len(line) + 1  # a garbled last line (a crash of the machine) is torn too
                continue
            self._check(k + 1, record)
            records.append((k + 1, record))
        if end < len(data):
            with self.path.open("r+b") as f:
                f.truncate(end)
        return records, end < len(data)

    def _check(self, line: int, record: Any) -> None:
        if not isinstance(record, dict):
            raise self._damaged(line, f"is {type(record).__name__}, not a JSON object")
        kind = record.get("kind")
        if kind not in _CHECKS:
            raise self._damaged(line, f"has kind {kind!r}, not 'header', 'plan' or 'cell'")
        if (kind == "header") != (line == 1):
            raise self._damaged(line, "is a header not on line 1" if line > 1 else "is no header")
        for field, ok in _CHECKS[kind].items():
            if field not in record:
                raise self._damaged(line, f"({kind}) lacks the field {field!r}")
            if not ok(record[field]):
                raise self._damaged(line, f"({kind}) has a bad {field!r}: {record[field]!r:.80}")

    def append(self, records: list[dict[str, Any]]) -> None:
        if self.file is None:
            self.file = self.path.open("ab")
        text = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
        self.file.write(text.encode("utf-8"))
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def index(
    journal: Journal, records: list[tuple[int, dict[str, Any]]], entries: int
) -> tuple[dict, dict]:
    """Plan records by (entry, batch), and cells by (entry, batch) -> {cell: (score, prompts)};
    checks that each cell belongs to a plan recorded before it and fits its grid.

    Example:
        >>> index(Journal(Path("results.jsonl")), [(1, {"kind": "header"})], entries=1)
        ({}, {})
    """
    plans: dict[tuple[int, int], dict[str, Any]] = {}
    cells: dict[tuple[int, int], dict[tuple[int, ...], tuple[float, list[float] | None]]] = {}
    for line, record in records:
        key = (record.get("entry"), record.get("batch"))
        if record["kind"] == "plan":
            if record["entry"] >= entries:
                raise journal._damaged(line, f"(plan) names entry {record['entry']} of {entries}")
            if any(axis not in record["labels"] for axis in record["axes"]):
                raise journal._damaged(line, "(plan) has an axis without labels")
            plans.setdefault(key, record)  # type: ignore[arg-type]
        elif record["kind"] == "cell":
            plan = plans.get(key)  # type: ignore[arg-type]
            if plan is None:
                raise journal._damaged(line, f"(cell) has no plan for entry and batch {key}")
            shape = [len(plan["labels"][a]) for a in plan["axes"]]
            cell = record["cell"]
            if len(cell) != len(shape) or any(c >= s for c, s in zip(cell, shape, strict=True)):
                raise journal._damaged(line, f"(cell) {cell} is outside the grid {shape}")
            size = plan["rows"][1] - plan["rows"][0]
            if record["per_prompt"] is not None and len(record["per_prompt"]) != size:
                raise journal._damaged(line, f"(cell) has not {size} per-prompt scores")
            done = cells.setdefault(key, {})  # type: ignore[arg-type]
            done.setdefault(tuple(cell), (record["score"], record["per_prompt"]))
    return plans, cells
