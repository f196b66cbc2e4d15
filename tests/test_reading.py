"""Files are data: no loader unpickles, and damaged files raise FileFormatError."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from mechkit.errors import FileFormatError
from mechkit.reading import read_checkpoint, read_json, read_safetensors

ROOT = Path(__file__).resolve().parents[1]

# Calls that can run code from a file, and the one place allowed to call torch.load.
UNSAFE = {
    r"weights_only\s*=\s*False": "torch.load(weights_only=False)",
    r"\bpickle\.loads?\(|\bdill\.|\bjoblib\.load|\bshelve\.|\bmarshal\.loads?": "unpickling",
    r"\bread_pickle\(": "pandas.read_pickle",
    r"allow_pickle\s*=\s*True": "np.load(allow_pickle=True)",
    r"yaml\.(unsafe_load|load_all|(Unsafe|Full)?Loader\b)": "unsafe YAML",
    r"yaml\.load\((?!.*Loader=(_StrictLoader|yaml\.SafeLoader)).*$": "yaml.load without SafeLoader",
    r"(?<![\w.])(eval|exec)\(": "eval/exec",
    r"trust_remote_code\s*=\s*True": "trust_remote_code",
}


def test_no_loader_unpickles_or_runs_code_from_a_file():
    """Every torch.load goes through mechkit.reading (weights_only=True); nothing in the package,
    circuits, benchmarks or examples unpickles, loads YAML unsafely, or evals."""
    found = []
    for folder in ("mechkit", "circuits", "benchmarks", "examples"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            rel = path.relative_to(ROOT).as_posix()
            for pattern, what in UNSAFE.items():
                found += [f"{rel}: {what}" for _ in re.finditer(pattern, text, re.M)]
            if rel != "mechkit/reading.py" and re.search(r"\btorch\.load\(", text):
                found.append(f"{rel}: torch.load outside mechkit.reading")
    assert found == []
    from mechkit.patching.sweep_config import _StrictLoader  # the one yaml.load's loader

    assert issubclass(_StrictLoader, yaml.SafeLoader)


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_read_checkpoint_refuses_a_file_whose_unpickling_runs_code(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"step": 1, "x": _Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(FileFormatError, match="evil.pt"):
        read_checkpoint(tmp_path / "evil.pt", "a checkpoint", "delete it.")
    assert not marker.exists()
    torch.save({"step": 1, "w": torch.ones(2)}, tmp_path / "good.pt")  # real ones still load
    assert read_checkpoint(tmp_path / "good.pt", "a checkpoint", "delete it.")["step"] == 1


def test_missing_file_keeps_its_own_error(tmp_path):
    """A path that does not exist is not a damaged file: FileNotFoundError, not FileFormatError."""
    for read in (read_json, read_safetensors, read_checkpoint):
        with pytest.raises(FileNotFoundError):
            read(tmp_path / "absent", "a file", "hint")
