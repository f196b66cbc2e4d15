"""``mechkit sweep CONFIG.yaml``: resumable activation-patching sweeps described by a YAML file.

A sweep config names a model, prompt pairs, a metric and a list of sweeps, each one grid of
:func:`~mechkit.patching.activation_patch` (a site, its positions, layers, heads or neurons).
:func:`run_sweep` splits the prompt pairs into batches, prepares each (entry, batch) with
:func:`~mechkit.patching.activation.plan_patch`, and appends every finished cell to a journal,
``results.jsonl``, flushed and fsync'd after each chunk of patches. Started again after a kill
at any moment, it reads the journal back, drops a torn last line and runs only the cells the
journal lacks (``PatchPlan.run(skip=...)``): nothing is lost and no cell is computed twice. The
journal starts with a fingerprint of the config; a different config is refused rather than
mixed in (``restart=True`` / ``--restart`` discards the old results).

A cell's score is the mean over all prompt pairs: each batch's mean weighted by its size, which
is the metric of one run over every pair for the mean-of-prompts metrics offered here; the
per-prompt scores are kept. Batches keep the whole dataset's padded width, so positions mean
the same in every batch; mean and resample ablations draw from the corrupt prompts of the whole
dataset (resample with ``seed + batch index``). When every cell of an entry is in, its table
(CSV) and heatmap (HTML, PNG) are written beside the journal.

    >>> config = load_config("examples/sweep_ioi.yaml")
    >>> run = run_sweep(config, out="runs/ioi")
    >>> run.results["0_resid_pre"].scores.shape     # (layer, pos)

The output folder::

    run.json             the config, mechkit's version, the config's fingerprint, the status
    results.jsonl        the journal: a header, one "plan" line per (entry, batch), one line a cell
    results.parquet      (format: parquet) every cell as a table, written when the run completes
    NAME.csv .html .png  per sweep entry; the HTML files load plotly.min.js from the folder
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import random
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from mechkit.atomic_io import write_atomically, write_text_atomically
from mechkit.devices import resolve_device, resolve_dtype
from mechkit.errors import MechkitError, did_you_mean
from mechkit.metrics import CrossEntropy, LogitDiff, ProbDiff
from mechkit.models import load_model
from mechkit.patching import engine
from mechkit.patching.activation import _HEADS, _NEURONS, PATCHABLE, _plan_cells, plan_patch
from mechkit.patching.result import PatchResult
from mechkit.prompts import PromptPairs

__all__ = [
    "CONFIG_KEYS",
    "PromptSource",
    "SweepConfig",
    "SweepConfigError",
    "SweepEntry",
    "SweepRun",
    "config_help",
    "load_config",
    "run_sweep",
]

METRICS = {"logit_diff": LogitDiff, "prob_diff": ProbDiff, "cross_entropy": CrossEntropy}
GENERATORS = ("ioi", "repeated_tokens")
JOURNAL, RUN_FILE, PARQUET = "results.jsonl", "run.json", "results.parquet"

CONFIG_KEYS: tuple[tuple[str, str], ...] = (
    (
        "model",
        "required. A built-in name (smollm2-135m, attn-only-2l...), a TransformerLens "
        "name, a Hugging Face model folder or a .gguf file.",
    ),
    ("prompts", "required; exactly one of file, tokens or generator:"),
    (
        "prompts.file",
        "JSONL of text pairs, one {clean, corrupt, answer, wrong} object a line "
        "(answers are single tokens; needs a tokenizer). Relative to the config file.",
    ),
    (
        "prompts.tokens",
        "JSONL of token-id pairs, one {clean: [ids], corrupt: [ids], answer: id, "
        "wrong: id} a line (for models without a tokenizer). Relative to the config file.",
    ),
    (
        "prompts.generator",
        "ioi: IOI prompts 'When A and B went to the PLACE, B gave a THING to' (A and B in "
        "either order) against 'When C and D went to the PLACE, E gave a THING to' (needs a "
        "tokenizer; answer A, wrong B). repeated_tokens: BOS, a random "
        "segment, then the segment again without its last token; the corrupt copy changes the "
        "first copy's last token (answer: that token; wrong: the replacement). Any model; BOS is "
        "the tokenizer's, or token 0 without one.",
    ),
    ("prompts.n", "generator only: how many pairs (default 8)."),
    ("prompts.length", "repeated_tokens only: segment length, at least 2 (default 6)."),
    (
        "metric",
        "logit_diff (default) | prob_diff | cross_entropy, read at each prompt's last token.",
    ),
    ("sweeps", "required, a non-empty list; one result grid (CSV, HTML, PNG) per entry:"),
    ("sweeps[].site", "required: " + " | ".join(PATCHABLE) + "."),
    (
        "sweeps[].positions",
        "each | all | a list of positions (one patch each); null: each for "
        "residual sites (resid_*, attn_out, mlp_out), all otherwise.",
    ),
    ("sweeps[].layers", "null (all) or a list of layers."),
    ("sweeps[].heads", "head sites only (" + ", ".join(_HEADS) + "): null (all) or a list."),
    ("sweeps[].neurons", "mlp_pre and mlp_post only: null (all) or a list."),
    (
        "sweeps[].name",
        "file name of the entry's outputs (letters, digits, _ . -); default "
        "INDEX_SITE, e.g. 0_resid_pre.",
    ),
    (
        "direction",
        "null or denoising (clean values into the corrupt run) | noising (corrupt "
        "values into the clean run).",
    ),
    (
        "ablation",
        "null | zero | mean | resample: instead of a direction, replace values in the "
        "clean run (mean and resample draw from the corrupt prompts of the whole dataset).",
    ),
    (
        "device",
        "auto or null (cuda when present, else cpu) | cpu | cuda | cuda:N. May change "
        "between runs of one sweep.",
    ),
    ("dtype", "null (float32) | bfloat16 | float16 | float32."),
    (
        "batch_size",
        "prompt pairs per patched run; null: all at once. A cell's score is the mean "
        "over all pairs (batches weighted by size); per-prompt scores are kept.",
    ),
    (
        "memory_budget",
        "e.g. 2GB or 512MB per chunk of patches; null: 2 GiB on CPU, 60% of free "
        "memory on CUDA. May change between runs.",
    ),
    (
        "format",
        "jsonl (default: results.jsonl is the results file) | parquet (also "
        "results.parquet, written atomically from the journal when the run completes; needs "
        "pyarrow). May change between runs.",
    ),
    (
        "out",
        "output folder, relative to the working directory (default runs/CONFIG_NAME); "
        "--out overrides. May change between runs.",
    ),
    ("seed", "seed of the generators and of resample ablation (default 0)."),
)


class SweepConfigError(MechkitError, ValueError):
    """A sweep config key or value that is not valid; the message gives its path in the file.

    Example: ``sweep.yaml: sweeps[1].positions: expected 'each', 'all' or a list of integers;
    got 'evry'``.
    """

    def __init__(self, path: str, detail: str, source: str | None = None) -> None:
        self.path, self.detail, self.source = path, detail, source
        where = ": ".join(p for p in (source, path) if p)
        super().__init__(f"{where}: {detail}" if where else detail)

    def within(self, prefix: str) -> SweepConfigError:
        """The same error, its path below ``prefix`` (``sweeps[1]`` + ``positions``)."""
        sep = "" if not self.path or self.path.startswith("[") else "."
        return SweepConfigError(prefix + sep + self.path, self.detail, self.source)


# ----------------------------------------------------------------------------------- config


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_list(path: str, value: Any, what: str) -> tuple[int, ...] | None:
    """None, or a non-empty list of integers as a tuple."""
    if value is None:
        return None
    if isinstance(value, list | tuple) and value and all(_is_int(v) for v in value):
        return tuple(value)
    raise SweepConfigError(path, f"expected null (all {what}) or a list of integers; got {value!r}")


def _choice(path: str, value: Any, allowed: tuple[str, ...], *, null: bool = False) -> None:
    if (value is None and null) or value in allowed:
        return
    hint = did_you_mean(value, allowed) if isinstance(value, str) else ""
    quoted = [repr(v) for v in allowed] + (["null"] if null else [])
    expected = ", ".join(quoted[:-1]) + " or " + quoted[-1] if len(quoted) > 1 else quoted[0]
    raise SweepConfigError(path, f"expected {expected}; got {value!r}.{hint}".rstrip("."))


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptSource:
    """Where the prompt pairs come from: exactly one of ``file``, ``tokens``, ``generator``."""

    file: str | None = None  # JSONL of text pairs
    tokens: str | None = None  # JSONL of token-id pairs (models without a tokenizer)
    generator: Literal["ioi", "repeated_tokens"] | None = None
    n: int | None = None  # generator: pairs to make; None means 8
    length: int | None = None  # repeated_tokens: segment length; None means 6

    def __post_init__(self) -> None:
        given = [k for k in ("file", "tokens", "generator") if getattr(self, k) is not None]
        if len(given) != 1:
            raise SweepConfigError(
                "", f"expected exactly one of 'file', 'tokens' or 'generator'; got {given or None}"
            )
        for key in ("file", "tokens"):
            value = getattr(self, key)
            if value is None:
                continue
            if not isinstance(value, str) or not value:
                raise SweepConfigError(key, f"expected the path of a JSONL file; got {value!r}")
            if not Path(value).is_file():
                raise SweepConfigError(key, f"expected an existing JSONL file; got {value!r}")
        if self.generator is not None:
            _choice("generator", self.generator, GENERATORS)
        if self.n is not None:
            if self.generator is None:
                raise SweepConfigError("n", "applies only with a generator; remove it")
            if not _is_int(self.n) or self.n < 1:
                raise SweepConfigError("n", f"expected a positive integer; got {self.n!r}")
        if self.length is not None:
            if self.generator != "repeated_tokens":
                raise SweepConfigError("length", "applies only to generator: repeated_tokens")
            if not _is_int(self.length) or self.length < 2:
                raise SweepConfigError("length", f"expected an integer >= 2; got {self.length!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SweepEntry:
    """One grid of patches: the arguments of ``activation_patch`` that choose the cells."""

    site: str
    positions: Literal["each", "all"] | tuple[int, ...] | None = None  # None: the site's usual
    layers: tuple[int, ...] | None = None  # None means all
    heads: tuple[int, ...] | None = None
    neurons: tuple[int, ...] | None = None
    name: str | None = None  # None: INDEX_SITE

    def __post_init__(self) -> None:
        _choice("site", self.site, PATCHABLE)
        positions = self.positions
        if not (positions is None or positions in ("each", "all")):
            if isinstance(positions, list | tuple) and positions and all(map(_is_int, positions)):
                object.__setattr__(self, "positions", tuple(positions))
            else:
                raise SweepConfigError(
                    "positions", f"expected 'each', 'all' or a list of integers; got {positions!r}"
                )
        for key, what in (("layers", "layers"), ("heads", "heads"), ("neurons", "neurons")):
            object.__setattr__(self, key, _int_list(key, getattr(self, key), what))
        if self.heads is not None and self.site not in _HEADS:
            raise SweepConfigError(
                "heads", f"applies to the head sites {', '.join(_HEADS)}; the site is {self.site!r}"
            )
        if self.neurons is not None and self.site not in _NEURONS:
            raise SweepConfigError(
                "neurons", f"applies to mlp_pre and mlp_post; the site is {self.site!r}"
            )
        if self.name is not None and not (
            isinstance(self.name, str) and re.fullmatch(r"[A-Za-z0-9_.-]+", self.name)
        ):
            raise SweepConfigError(
                "name", f"expected a file name of letters, digits, _ . or -; got {self.name!r}"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class SweepConfig:
    """A whole sweep: model, prompts, metric, the grids, and how to run them.

    Every key is described in :data:`CONFIG_KEYS` (``mechkit sweep --help``). ``to_dict()``
    round-trips through :func:`config_from_dict`.
    """

    model: str
    prompts: PromptSource
    sweeps: tuple[SweepEntry, ...]
    metric: Literal["logit_diff", "prob_diff", "cross_entropy"] = "logit_diff"
    direction: Literal["denoising", "noising"] | None = None  # None: denoising (no ablation)
    ablation: Literal["zero", "mean", "resample"] | None = None
    device: str | None = None  # None (or "auto"): CUDA when present
    dtype: str | None = None  # None: float32
    batch_size: int | None = None  # None: every pair in one batch
    memory_budget: str | int | None = None  # None: engine default for the device
    format: Literal["jsonl", "parquet"] = "jsonl"
    out: str | None = None  # None: runs/<config name>
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise SweepConfigError("model", f"expected a model name or path; got {self.model!r}")
        if not isinstance(self.prompts, PromptSource):
            raise SweepConfigError("prompts", "expected a PromptSource")
        if not isinstance(self.sweeps, list | tuple) or not self.sweeps:
            raise SweepConfigError("sweeps", f"expected a non-empty list; got {self.sweeps!r}")
        object.__setattr__(self, "sweeps", tuple(self.sweeps))
        if not all(isinstance(e, SweepEntry) for e in self.sweeps):
            raise SweepConfigError("sweeps", "expected a list of SweepEntry")
        _choice("metric", self.metric, tuple(METRICS))
        _choice("direction", self.direction, ("denoising", "noising"), null=True)
        _choice("ablation", self.ablation, ("zero", "mean", "resample"), null=True)
        if self.direction is not None and self.ablation is not None:
            raise SweepConfigError(
                "ablation",
                f"expected either a direction or an ablation; got direction "
                f"{self.direction!r} and ablation {self.ablation!r} (an ablation edits the clean "
                "run). Hint: set one of them to null",
            )
        if self.device == "auto":
            object.__setattr__(self, "device", None)
        for key, check in (("device", resolve_device), ("dtype", resolve_dtype)):
            if getattr(self, key) is not None:
                try:
                    check(getattr(self, key))
                except MechkitError as exc:
                    raise SweepConfigError(key, _lower_first(str(exc))) from None
        if self.batch_size is not None and (not _is_int(self.batch_size) or self.batch_size < 1):
            raise SweepConfigError(
                "batch_size", f"expected a positive integer or null; got {self.batch_size!r}"
            )
        if self.memory_budget is not None:
            try:
                engine.parse_budget(self.memory_budget, torch.device("cpu"))
            except MechkitError as exc:
                raise SweepConfigError("memory_budget", _lower_first(str(exc))) from None
        _choice("format", self.format, ("jsonl", "parquet"))
        if self.format == "parquet" and importlib.util.find_spec("pyarrow") is None:
            raise SweepConfigError("format", "parquet needs pyarrow. Hint: pip install pyarrow")
        if self.out is not None and (not isinstance(self.out, str) or not self.out):
            raise SweepConfigError("out", f"expected a folder path; got {self.out!r}")
        if not _is_int(self.seed):
            raise SweepConfigError("seed", f"expected an integer; got {self.seed!r}")
        seen: dict[str, int] = {}
        for i, name in enumerate(self.entry_names):
            if name in seen:
                raise SweepConfigError(
                    f"sweeps[{i}].name",
                    f"expected a name of its own; sweeps[{seen[name]}] is also named {name!r}",
                )
            seen[name] = i

    @property
    def entry_names(self) -> list[str]:
        """Each entry's output name: its ``name``, or ``INDEX_SITE``."""
        return [e.name or f"{i}_{e.site}" for i, e in enumerate(self.sweeps)]

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _check_keys(data: Any, path: str, cls: type, required: tuple[str, ...] = ()) -> None:
    """``data`` is a mapping whose keys are fields of ``cls``, with the ``required`` ones."""
    allowed = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(data, Mapping):
        raise SweepConfigError(
            path, f"expected a mapping with keys {', '.join(allowed)}; got {data!r}"
        )
    for key in data:
        if key not in allowed:
            where = f"{path}.{key}" if path else str(key)
            hint = did_you_mean(str(key), allowed)
            raise SweepConfigError(
                where, f"unknown key; expected one of {', '.join(allowed)}.{hint}".rstrip(".")
            )
    for key in required:
        if key not in data:
            raise SweepConfigError(path, f"missing the required key {key!r}")


def config_from_dict(
    data: Any, *, source: str | None = None, base_dir: str | Path | None = None
) -> SweepConfig:
    """A :class:`SweepConfig` from parsed YAML; errors give the path of the bad key.

    Args:
        data: the mapping.
        source: the file name to put in front of error paths.
        base_dir: the folder that relative prompt files are read from (the config's folder).
    """
    try:
        _check_keys(data, "", SweepConfig, ("model", "prompts", "sweeps"))
        prompts = data["prompts"]
        _check_keys(prompts, "prompts", PromptSource)
        prompts = dict(prompts)
        for key in ("file", "tokens"):
            if isinstance(prompts.get(key), str) and base_dir is not None:
                prompts[key] = str(Path(base_dir) / prompts[key])
        try:
            source_ = PromptSource(**prompts)
        except SweepConfigError as exc:
            raise exc.within("prompts") from None
        sweeps = data["sweeps"]
        if not isinstance(sweeps, list) or not sweeps:
            raise SweepConfigError("sweeps", f"expected a non-empty list of sweeps; got {sweeps!r}")
        entries = []
        for i, raw in enumerate(sweeps):
            _check_keys(raw, f"sweeps[{i}]", SweepEntry, ("site",))
            try:
                entries.append(SweepEntry(**raw))
            except SweepConfigError as exc:
                raise exc.within(f"sweeps[{i}]") from None
        rest = {k: v for k, v in data.items() if k not in ("prompts", "sweeps")}
        return SweepConfig(prompts=source_, sweeps=tuple(entries), **rest)
    except SweepConfigError as exc:
        raise SweepConfigError(exc.path, exc.detail, source) from None


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error."""


def _mapping_without_duplicates(loader: _StrictLoader, node: Any, deep: bool = False) -> Any:
    loader.flatten_mapping(node)
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise SweepConfigError(
                f"line {line}", f"the key {key!r} is given twice (first on line {seen[key]})"
            )
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates
)


def load_config(path: str | Path) -> SweepConfig:
    """Read and check a sweep config file; nothing is loaded or run.

    Raises:
        SweepConfigError: naming the file and the key's path, e.g. ``sweeps[1].positions``.
    """
    source = str(path)
    path = Path(path)
    if not path.is_file():
        raise SweepConfigError("", "expected a YAML sweep config; the file does not exist", source)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader)
    except SweepConfigError as exc:
        raise SweepConfigError(exc.path, exc.detail, source) from None
    except yaml.YAMLError as exc:
        raise SweepConfigError("", f"not valid YAML: {exc}", source) from None
    return config_from_dict(data, source=source, base_dir=path.parent)


def config_help() -> str:
    """Every config key with what it accepts, for ``mechkit sweep --help``."""
    width = max(len(k) for k, _ in CONFIG_KEYS) + 2
    lines = ["config keys (YAML):"]
    for key, text in CONFIG_KEYS:
        words, line = text.split(), ""
        first = True
        for word in words:
            if line and len(line) + len(word) + 1 > 96 - width:
                lines.append(f"  {key if first else '':<{width}}{line}")
                line, first = word, False
            else:
                line = f"{line} {word}" if line else word
        lines.append(f"  {key if first else '':<{width}}{line}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- prompts

_NAMES = (  # noqa: SIM905 (a list of words reads best as words)
    "Mary John Tom James Sarah Emma David Paul Alice Bob Mike Dan Lucy Kate Anna Peter Mark "
    "Alex Carl Jack Rose Sam Ben Tim Max Amy Lisa Ryan Adam Eric Jane Chris Kevin Laura Helen"
).split()
_PLACES = ("store", "park", "house", "school", "office", "beach", "station", "garden", "market")
_OBJECTS = ("drink", "ball", "book", "cup", "gift", "letter", "bag", "key", "pen", "ring")
_IOI = "When {} and {} went to the {}, {} gave a {} to"


def _ioi_pairs(model: Any, n: int, seed: int) -> PromptPairs:
    """IOI prompts with ABC corruptions (Wang et al. 2022), one template so positions align."""
    rng = random.Random(seed)
    clean, corrupt, answers, wrongs = [], [], [], []
    for _ in range(n):
        io, s, c, d, e = rng.sample(_NAMES, 5)
        place, obj = rng.choice(_PLACES), rng.choice(_OBJECTS)
        first, second = (io, s) if rng.random() < 0.5 else (s, io)
        clean.append(_IOI.format(first, second, place, s, obj))
        corrupt.append(_IOI.format(c, d, place, e, obj))
        answers.append(" " + io)
        wrongs.append(" " + s)
    return PromptPairs.from_lists(model, clean, corrupt, answers, wrongs, aligned=False)


def _repeated_token_pairs(model: Any, n: int, length: int, seed: int) -> PromptPairs:
    """``BOS r r[:-1]`` (answer ``r[-1]``, by induction) vs the same with ``r[-1]`` replaced."""
    tokenizer = getattr(model, "tokenizer", None)
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else 0
    generator = torch.Generator().manual_seed(seed)
    vocab = model.cfg.d_vocab
    clean, corrupt, answers, wrongs = [], [], [], []
    for _ in range(n):
        draw = (torch.randperm(vocab - 1, generator=generator)[: length + 1] + 1).tolist()
        segment, wrong = draw[:length], draw[length]  # distinct tokens, never token 0
        prefix = [] if bos is None else [bos]
        clean.append(prefix + segment + segment[:-1])
        corrupt.append(prefix + segment[:-1] + [wrong] + segment[:-1])
        answers.append(segment[-1])
        wrongs.append(wrong)
    return PromptPairs.from_tokens(clean, corrupt, answers, wrongs)


def _token_file_pairs(path: str, vocab: int) -> PromptPairs:
    rows: dict[str, list[Any]] = {"clean": [], "corrupt": [], "answer": [], "wrong": []}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise MechkitError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            ok = isinstance(record, dict) and set(record) >= set(rows)
            ok = ok and all(_is_int(record[k]) for k in ("answer", "wrong"))
            ok = ok and all(
                isinstance(record[k], list) and record[k] and all(map(_is_int, record[k]))
                for k in ("clean", "corrupt")
            )
            if not ok:
                raise MechkitError(
                    f'{path}:{lineno}: expected {{"clean": [ids], "corrupt": [ids], '
                    f'"answer": id, "wrong": id}}; got {line.strip()[:120]}'
                )
            ids = [*record["clean"], *record["corrupt"], record["answer"], record["wrong"]]
            bad = [i for i in ids if not 0 <= i < vocab]
            if bad:
                raise MechkitError(
                    f"{path}:{lineno}: token id {bad[0]} is outside the model's vocabulary "
                    f"(0..{vocab - 1})"
                )
            for key in rows:
                rows[key].append(record[key])
    if not rows["clean"]:
        raise MechkitError(f"{path}: expected at least one pair; the file has none")
    return PromptPairs.from_tokens(
        rows["clean"], rows["corrupt"], rows["answer"], rows["wrong"], aligned=False
    )


def build_pairs(model: Any, config: SweepConfig) -> PromptPairs:
    """The config's prompt pairs for ``model``; errors name the ``prompts`` key."""
    source = config.prompts
    key = "file" if source.file else "tokens" if source.tokens else "generator"
    try:
        if source.file is not None:
            pairs = PromptPairs.from_jsonl(model, source.file, aligned=False)
        elif source.tokens is not None:
            pairs = _token_file_pairs(source.tokens, model.cfg.d_vocab)
        elif source.generator == "ioi":
            pairs = _ioi_pairs(model, source.n or 8, config.seed)
        else:
            pairs = _repeated_token_pairs(model, source.n or 8, source.length or 6, config.seed)
        if config.ablation != "zero":  # positions are patched one for one
            pairs.require_aligned()
        return pairs
    except MechkitError as exc:
        raise SweepConfigError(f"prompts.{key}", _lower_first(str(exc))) from None


def _batches(n: int, size: int | None) -> list[slice]:
    size = size or n
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _batch(pairs: PromptPairs, rows: slice) -> PromptPairs:
    """Rows of ``pairs`` at the full padded width, so a position means the same in each batch."""
    if rows == slice(0, len(pairs)):
        return pairs
    changes = {}
    for field in dataclasses.fields(pairs):
        value = getattr(pairs, field.name)
        if isinstance(value, torch.Tensor | tuple):
            changes[field.name] = value[rows]
    return dataclasses.replace(pairs, **changes)


# ----------------------------------------------------------------------------------- journal


class _Journal:
    """The append-only results file: one JSON object a line, flushed and fsync'd per append."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file: Any = None

    def read(self) -> tuple[list[dict[str, Any]], bool]:
        """Every complete record; cuts a torn last line off the file (True when there was one)."""
        if not self.path.exists():
            return [], False
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1  # after the last newline: a write cut short by a kill
        lines = data[:end].split(b"\n")[:-1]
        records = []
        for k, line in enumerate(lines):
            try:
                records.append(json.loads(line))
            except ValueError:
                if k < len(lines) - 1:
                    raise MechkitError(
                        f"{self.path}: line {k + 1} is not valid JSON, and it is not the last "
                        "line (only the last line can be torn by a kill). Hint: rerun with "
                        "--restart to discard these results."
                    ) from None
                end -= len(line) + 1  # a garbled last line (a crash of the machine) is torn too
        if end < len(data):
            with self.path.open("r+b") as f:
                f.truncate(end)
        return records, end < len(data)

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


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold ``folder/.lock`` so that two runs never write one journal (released on any exit)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with (folder / ".lock").open("a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise MechkitError(
                f"Expected to be the only sweep writing to {folder}; another mechkit sweep "
                "holds it. Hint: wait for it, or choose another output folder."
            ) from None
        yield


def _identity(config: SweepConfig) -> dict[str, Any]:
    """What the results depend on: the config less how and where it runs, files by content."""
    import mechkit

    data = config.to_dict()
    for key in ("device", "memory_budget", "format", "out"):
        data.pop(key)
    for key in ("file", "tokens"):
        path = data["prompts"][key]
        if path is not None:
            data["prompts"][key] = "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()
    data["mechkit"] = mechkit.__version__
    return data


def _fingerprint(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _flatten(value: Any, path: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{path}.{k}" if path else k))
        return out
    if isinstance(value, list) and value and isinstance(value[0], dict):
        out = {}
        for i, v in enumerate(value):
            out.update(_flatten(v, f"{path}[{i}]"))
        return out
    return {path: value}


def _changed(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    a, b = _flatten(old), _flatten(new)
    return sorted(k for k in a.keys() | b.keys() if a.get(k, "<absent>") != b.get(k, "<absent>"))


def _read_run_file(out: Path) -> dict[str, Any] | None:
    path = out / RUN_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise MechkitError(
            f"{path} is not valid JSON. Hint: rerun with --restart to discard the results there."
        ) from None


def _check_same_sweep(out: Path, previous: dict[str, Any] | None, identity: dict, fp: str) -> None:
    if previous is None:
        if (out / JOURNAL).exists():
            raise MechkitError(
                f"{out} holds {JOURNAL} but no {RUN_FILE}, so its config is unknown and its "
                "results cannot be resumed safely. Hint: rerun with --restart to discard them, "
                "or choose another --out."
            )
        return
    if previous.get("fingerprint") != fp:
        changed = _changed(previous.get("identity", {}), identity) or ["(unknown)"]
        raise MechkitError(
            f"Expected {out} to hold results of this config; it holds a sweep whose config "
            f"differs in {', '.join(changed)}, and mixing their results would be wrong. Hint: "
            "rerun with --restart to discard the old results, or choose another --out."
        )


def _clear(out: Path, previous: dict[str, Any] | None) -> None:
    """Remove a previous run's files (only the ones a sweep writes)."""
    names = {JOURNAL, RUN_FILE, PARQUET}
    for name in (previous or {}).get("outputs", []):
        if isinstance(name, str) and "/" not in name and "\\" not in name and name != "..":
            names.add(name)
    for name in names:
        (out / name).unlink(missing_ok=True)


def _write_run_file(out: Path, info: dict[str, Any], **changes: Any) -> None:
    info.update(changes, updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    write_text_atomically(out / RUN_FILE, json.dumps(info, indent=2) + "\n")


# ----------------------------------------------------------------------------------- running


@dataclasses.dataclass(frozen=True)
class SweepRun:
    """What :func:`run_sweep` did.

    Attributes:
        out: the output folder.
        results: each entry's :class:`PatchResult` over all prompt pairs, by entry name.
        files: each entry's written files (``csv``, ``html``, ``png``), by entry name.
        cells_total: cells of the whole sweep (entries x batches x grid cells).
        cells_computed: cells this call ran; the rest came from the journal.
        seconds: wall time of this call.
    """

    out: Path
    results: dict[str, PatchResult]
    files: dict[str, dict[str, Path]]
    cells_total: int
    cells_computed: int
    seconds: float


def run_sweep(
    config: SweepConfig | str | Path,
    *,
    out: str | Path | None = None,
    restart: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> SweepRun:
    """Run (or resume) a sweep, writing results incrementally, then tables and heatmaps.

    Args:
        config: a :class:`SweepConfig` or the path of a YAML config.
        out: the output folder; None means ``config.out``, else ``runs/sweep``.
        restart: discard results already in ``out`` (else a different config is an error).
        progress: show a progress bar (stderr).
        log: called with one-line status messages (None: silent).

    Example:
        >>> run = run_sweep("sweep.yaml", out="runs/ioi")   # killed? run it again
        >>> run.results["0_resid_pre"].normalized().plot()
    """
    source = None
    if not isinstance(config, SweepConfig):
        source, config = str(config), load_config(config)
    try:
        return _run(config, Path(out or config.out or "runs/sweep"), restart, progress, log)
    except SweepConfigError as exc:  # checked on the model: name the file too
        if exc.source is not None or source is None:
            raise
        raise SweepConfigError(exc.path, exc.detail, source) from None


def _run(
    config: SweepConfig,
    folder: Path,
    restart: bool,
    progress: bool,
    log: Callable[[str], None] | None,
) -> SweepRun:
    import mechkit

    start = time.perf_counter()
    say = log or (lambda _msg: None)
    identity = _identity(config)
    fp = _fingerprint(identity)
    folder.mkdir(parents=True, exist_ok=True)
    journal = _Journal(folder / JOURNAL)
    with _locked(folder):
        previous = _read_run_file(folder)
        if restart or not _has_cells(journal.path):  # nothing computed: nothing to mix up
            _clear(folder, previous)
            previous = None
        _check_same_sweep(folder, previous, identity, fp)
        records, torn = journal.read()
        if torn:
            say(f"dropped a torn last line from {journal.path} (the run was killed mid-write)")
        if records and (records[0].get("kind") != "header" or records[0].get("fingerprint") != fp):
            raise MechkitError(
                f"Expected {journal.path} to be this config's journal (fingerprint {fp}); its "
                "header disagrees. Hint: rerun with --restart, or choose another --out."
            )
        plans, cells = _index(records)
        complete = previous is not None and previous.get("status") == "complete"
        complete = complete and {i for i, _ in plans} == set(range(len(config.sweeps)))
        setup = None if complete else _prepare(config, say)  # checks the config on the model
        info = dict(previous or {})
        info.update(mechkit=mechkit.__version__, fingerprint=fp, config=config.to_dict())
        info.update(identity=identity, out=str(folder))
        info.setdefault("started", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        _write_run_file(folder, info, status="running")
        if not records:
            journal.append([{"kind": "header", "fingerprint": fp, "mechkit": info["mechkit"]}])
        results: dict[str, PatchResult] = {}
        files: dict[str, dict[str, Path]] = {}

        def finish(name: str, result: PatchResult) -> None:
            results[name] = result
            files[name] = _export(folder, name, result)
            done = [p.name for entry in files.values() for p in entry.values()]
            _write_run_file(folder, info, outputs=sorted({*info.get("outputs", []), *done}))

        try:
            if setup is None:
                say(f"{folder}: already complete; rewriting its tables and figures")
                for i, name in enumerate(config.entry_names):
                    finish(name, _assemble(i, plans, cells))
                total, computed = sum(len(c) for c in cells.values()), 0
            else:
                total, computed = _compute(
                    config, setup, journal, plans, cells, finish, progress, say
                )
            outputs = [p.name for entry in files.values() for p in entry.values()]
            if config.format == "parquet":
                _write_parquet(folder / PARQUET, config, cells)
                outputs.append(PARQUET)
        finally:
            journal.close()
        _write_run_file(folder, info, status="complete", outputs=outputs, cells=total)
    return SweepRun(folder, results, files, total, computed, time.perf_counter() - start)


def _has_cells(path: Path) -> bool:
    """Whether the journal holds any computed cell."""
    if not path.exists():
        return False
    with path.open("rb") as f:
        return any(b'"kind":"cell"' in line for line in f)


def _index(records: list[dict[str, Any]]) -> tuple[dict, dict]:
    """Plan records by (entry, batch), and cells by (entry, batch) -> {cell: (score, prompts)}."""
    plans: dict[tuple[int, int], dict[str, Any]] = {}
    cells: dict[tuple[int, int], dict[tuple[int, ...], tuple[float, list[float] | None]]] = {}
    for record in records:
        key = (record.get("entry"), record.get("batch"))
        if record.get("kind") == "plan":
            plans.setdefault(key, record)  # type: ignore[arg-type]
        elif record.get("kind") == "cell":
            done = cells.setdefault(key, {})  # type: ignore[arg-type]
            done.setdefault(tuple(record["cell"]), (record["score"], record["per_prompt"]))
    return plans, cells


@dataclasses.dataclass
class _Setup:
    model: Any
    pairs: PromptPairs
    batches: list[slice]
    total: int  # cells of the whole sweep


def _prepare(config: SweepConfig, say: Callable[[str], None]) -> _Setup:
    """Load the model and the pairs, and check every entry on them before anything runs."""
    say(f"loading {config.model} ...")
    try:
        model = load_model(config.model, device=config.device, dtype=config.dtype)
    except MechkitError as exc:
        raise SweepConfigError("model", str(exc)) from None
    pairs = build_pairs(model, config)
    batches = _batches(len(pairs), config.batch_size)
    seq = pairs.clean_tokens.shape[1]
    counts = [_count_cells(model, entry, i, seq) for i, entry in enumerate(config.sweeps)]
    return _Setup(model, pairs, batches, sum(counts) * len(batches))


def _compute(
    config: SweepConfig,
    setup: _Setup,
    journal: _Journal,
    plans: dict,
    cells: dict,
    finish: Callable[[str, PatchResult], None],
    progress: bool,
    say: Callable[[str], None],
) -> tuple[int, int]:
    """Run every cell the journal lacks; ``finish(name, result)`` as each entry completes."""
    model, pairs, batches, total = setup.model, setup.pairs, setup.batches, setup.total
    already = sum(len(c) for c in cells.values())
    say(
        f"{len(pairs)} prompt pairs in {len(batches)} batch(es), {total} cells; "
        + (f"resuming with {already} already done" if already else "starting")
    )
    bar = _bar(total, already, progress)
    reference = None
    if config.ablation in ("mean", "resample"):
        reference = (pairs.corrupt_tokens, pairs.corrupt_mask)  # the whole dataset's
    computed = 0
    try:
        for i, (entry, name) in enumerate(zip(config.sweeps, config.entry_names, strict=True)):
            for b, rows in enumerate(batches):
                key = (i, b)
                done = cells.setdefault(key, {})
                if key in plans and len(done) == plans[key]["cells"]:
                    continue
                if bar is not None:
                    bar.set_description(f"{name} batch {b + 1}/{len(batches)}")
                part = _batch(pairs, rows)
                plan = plan_patch(
                    model,
                    part,
                    None,
                    METRICS[config.metric].from_pairs(part),
                    site=entry.site,
                    positions=_positions(entry.positions),
                    layers=entry.layers,
                    heads=entry.heads,
                    neurons=entry.neurons,
                    direction=config.direction,
                    ablation=config.ablation,
                    reference=reference,
                    seed=config.seed + b,
                )
                record = _plan_record(plan, i, b, rows)
                if key not in plans:
                    journal.append([record])
                    plans[key] = record
                elif {k: plans[key][k] for k in ("cells", "axes", "labels")} != {
                    k: record[k] for k in ("cells", "axes", "labels")
                }:
                    raise MechkitError(
                        f"Expected the journal's plan of {name}, batch {b}, to match this run's; "
                        "they differ (the model or prompt files changed?). Hint: rerun with "
                        "--restart, or choose another --out."
                    )
                for chunk in plan.run(
                    skip=set(done), memory_budget=config.memory_budget, progress=False
                ):
                    journal.append(
                        [
                            {
                                "kind": "cell",
                                "entry": i,
                                "batch": b,
                                "cell": list(cell),
                                "score": score,
                                "per_prompt": prompts,
                            }
                            for cell, (score, prompts) in chunk.items()
                        ]
                    )
                    done.update(chunk)
                    computed += len(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
            finish(name, _assemble(i, plans, cells))
    finally:
        if bar is not None:
            bar.close()
    return total, computed


def _positions(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _count_cells(model: Any, entry: SweepEntry, index: int, seq: int) -> int:
    """The entry's number of cells; checks its layers, heads, neurons, positions on ``model``."""
    cfg = model.cfg
    heads = (cfg.n_key_value_heads or cfg.n_heads) if entry.site in ("k", "v") else cfg.n_heads
    sizes = {"layers": cfg.n_layers, "heads": heads, "neurons": cfg.d_mlp or 0}
    if isinstance(entry.positions, tuple):
        sizes["positions"] = seq
    for key, size in sizes.items():
        values = getattr(entry, key)
        bad = [v for v in values or () if not -size <= v < size]
        if bad:
            raise SweepConfigError(
                f"sweeps[{index}].{key}",
                f"expected values in [0, {size}) (negative counts from the end); got {bad} "
                f"({_model_name(model)} has {size} {key}"
                + (" in the longest prompt" if key == "positions" else "")
                + ")",
            )
    try:
        _, _, planned = _plan_cells(
            model,
            entry.site,
            _positions(entry.positions),
            entry.layers,
            entry.heads,
            entry.neurons,
            seq,
        )
    except MechkitError as exc:
        raise SweepConfigError(f"sweeps[{index}].site", _lower_first(str(exc))) from None
    return len(planned)


def _model_name(model: Any) -> str:
    info = getattr(model, "mechkit_info", None)
    return getattr(info, "name", None) or model.cfg.model_name


def _plan_record(plan: Any, entry: int, batch: int, rows: slice) -> dict[str, Any]:
    result = plan.result({c: (0.0, None) for c in plan.cells})  # labels and baselines only
    return {
        "kind": "plan",
        "entry": entry,
        "batch": batch,
        "rows": [rows.start, rows.stop],
        "cells": len(plan.cells),
        "axes": list(result.axes),
        "labels": result.labels,
        "tick_labels": result.tick_labels,
        "clean": result.clean_score,
        "corrupt": result.corrupt_score,
        "method": result.method,
        "site": result.site,
        "metric": result.metric_name,
    }


def _assemble(entry: int, plans: dict, cells: dict) -> PatchResult:
    """One entry's result over every batch: size-weighted mean scores, per-prompt scores joined."""
    keys = sorted(k for k in plans if k[0] == entry)
    first = plans[keys[0]]
    axes = tuple(first["axes"])
    shape = tuple(len(first["labels"][a]) for a in axes)
    sizes = [plans[k]["rows"][1] - plans[k]["rows"][0] for k in keys]
    total = sum(sizes)
    scores = torch.zeros(shape, dtype=torch.float64)
    per_prompt: torch.Tensor | None = torch.full((*shape, total), float("nan"))
    offset = 0
    for key, size in zip(keys, sizes, strict=True):
        done = cells.get(key, {})
        if len(done) != plans[key]["cells"]:
            raise MechkitError(
                f"Expected every cell of sweep entry {entry}, batch {key[1]}, in the journal; "
                f"{plans[key]['cells'] - len(done)} are missing. Hint: rerun to compute them."
            )
        for cell, (score, prompts) in done.items():
            scores[cell] += score * size
            if prompts is None:
                per_prompt = None
            elif per_prompt is not None:
                per_prompt[cell][offset : offset + size] = torch.tensor(prompts)
        offset += size

    def mean(field: str) -> float | None:
        values = [plans[k][field] for k in keys]
        if any(v is None for v in values):
            return None
        return sum(v * s for v, s in zip(values, sizes, strict=True)) / total

    return PatchResult(
        scores=(scores / total).float(),
        per_prompt=per_prompt,
        axes=axes,
        labels=first["labels"],
        tick_labels=first["tick_labels"],
        clean_score=mean("clean"),
        corrupt_score=mean("corrupt"),
        method=first["method"],
        site=first["site"],
        metric_name=first["metric"],
    )


def _bar(total: int, initial: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="cell", dynamic_ncols=True, file=sys.stderr)


# ----------------------------------------------------------------------------------- export


def _export(folder: Path, name: str, result: PatchResult) -> dict[str, Path]:
    """``NAME.csv`` (a row per cell, with ``normalized`` when defined), ``.html`` and ``.png``."""
    df = result.to_dataframe()
    with contextlib.suppress(ValueError):  # no corrupt run, or clean == corrupt
        df.insert(
            df.columns.get_loc("score") + 1,
            "normalized",
            result.normalized().scores.flatten().tolist(),
        )
    title = f"{name}: {result.method} {result.site}, {result.metric_name}"
    files = {
        "csv": write_atomically(folder / f"{name}.csv", lambda tmp: df.to_csv(tmp, index=False)),
        "html": write_atomically(
            folder / f"{name}.html",
            lambda tmp: result.plot(title=title).write_html(tmp, include_plotlyjs="directory"),
        ),
        "png": write_atomically(folder / f"{name}.png", lambda tmp: _write_png(result, title, tmp)),
    }
    return files


def _write_png(result: PatchResult, title: str, path: str) -> None:
    """A static heatmap with matplotlib (no browser needed): rows = first axis, columns = last,
    one panel per value of the axes between (e.g. one layer x head panel per position)."""
    import itertools

    from matplotlib.figure import Figure

    z = result.scores.float().numpy()
    centre = result.base_score if result.base_score is not None else 0.0
    span = float(max(abs(z.max() - centre), abs(z.min() - centre))) or 1.0
    ticks = result.tick_labels
    if z.ndim == 1:
        axis = result.axes[0]
        fig = Figure(figsize=(min(2 + 0.25 * len(z), 20), 4), layout="constrained")
        ax = fig.subplots()
        ax.bar(range(len(z)), z, color="tab:blue")
        _set_ticks(ax.set_xticks, ticks[axis], rotation=90)
        ax.axhline(centre, color="grey", linestyle=":", label="unpatched")
        ax.set(xlabel=axis, ylabel=result.metric_name, title=title)
        fig.savefig(path, format="png", dpi=100)
        return
    rows, cols, middle = result.axes[0], result.axes[-1], result.axes[1:-1]
    grids = z.reshape(z.shape[0], -1, z.shape[-1]).transpose(1, 0, 2)  # (panels, rows, cols)
    names = [" ".join(c) for c in itertools.product(*[ticks[a] for a in middle])] or [""]
    shown = min(len(grids), 64)
    n_cols = math.ceil(math.sqrt(shown))
    n_rows = math.ceil(shown / n_cols)
    cell_w = min(max(0.25 * z.shape[-1], 3.5), 12)
    cell_h = min(max(0.22 * z.shape[0], 2.0), 10)
    fig = Figure(
        figsize=(min(n_cols * cell_w + 1.5, 40), min(n_rows * cell_h + 1, 40)), layout="constrained"
    )
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    image = None
    for k, ax in enumerate(axes.flat):
        if k >= shown:
            ax.set_visible(False)
            continue
        image = ax.imshow(
            grids[k],
            cmap="RdBu",
            vmin=centre - span,
            vmax=centre + span,
            aspect="auto",
            interpolation="nearest",
        )
        _set_ticks(ax.set_xticks, ticks[cols], rotation=90 if cols == "pos" else 0)
        _set_ticks(ax.set_yticks, ticks[rows])
        ax.set(xlabel=cols, ylabel=rows, title=f"{' x '.join(middle)} {names[k]}" if middle else "")
    more = f" (first {shown} of {len(grids)} panels; all in the HTML)" if shown < len(grids) else ""
    fig.suptitle(title + more)
    fig.colorbar(image, ax=axes, label=result.metric_name, shrink=0.8)
    fig.savefig(path, format="png", dpi=100)


def _set_ticks(setter: Callable[..., Any], labels: list[str], rotation: int = 0) -> None:
    step = max(1, math.ceil(len(labels) / 40))  # at most ~40 labelled ticks
    where = list(range(0, len(labels), step))
    setter(where, [labels[i] for i in where], rotation=rotation, fontsize=7)


def _write_parquet(path: Path, config: SweepConfig, cells: dict) -> None:
    import pandas as pd

    names = config.entry_names
    rows = [
        {
            "entry": names[entry],
            "site": config.sweeps[entry].site,
            "batch": batch,
            "cell": list(cell),
            "score": score,
            "per_prompt": prompts,
        }
        for (entry, batch), done in sorted(cells.items())
        for cell, (score, prompts) in sorted(done.items())
    ]
    frame = pd.DataFrame(rows, columns=["entry", "site", "batch", "cell", "score", "per_prompt"])
    write_atomically(path, lambda tmp: frame.to_parquet(tmp, index=False))
