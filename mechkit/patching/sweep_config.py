"""The ``mechkit sweep`` config: its dataclasses, YAML loading, key documentation, fingerprint.

A config names a model, prompt pairs, a metric and a list of sweeps (see :data:`CONFIG_KEYS`,
shown by ``mechkit sweep --help``). :func:`load_config` reads a YAML file and checks every key
before any model loads; each error is a :class:`SweepConfigError` whose message names the file
and the key's path (``sweep.yaml: sweeps[1].positions: ...``), and a key given twice is an error.
:func:`build_pairs` makes the ``prompts`` section into prompt pairs for a loaded model, its errors
naming that key. :func:`_identity` and :func:`_fingerprint` say what results depend on, so that a
resumed sweep (:mod:`mechkit.patching.sweep`) refuses a journal written under another config.

    >>> config = load_config("examples/sweep_ioi.yaml")
    >>> config.entry_names
    ['0_resid_pre', '1_attn_out', '2_mlp_out', '3_z']
    >>> config_from_dict(config.to_dict()) == config
    True
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from mechkit.core.batching import parse_budget
from mechkit.core.names import parse_node
from mechkit.core.types import Model
from mechkit.devices import resolve_device, resolve_dtype
from mechkit.errors import (
    DatasetFormatError,
    EmptyDatasetError,
    InvalidTokenError,
    MechkitError,
    PromptsTooLongError,
    SweepConfigError,
    did_you_mean,
)
from mechkit.metrics import CrossEntropy, LogitDiff, ProbDiff
from mechkit.patching.activation import HEAD_SITES, NEURON_SITES, PATCHABLE
from mechkit.prompts import PromptPairs
from mechkit.version import __version__

__all__ = [
    "CONFIG_KEYS",
    "PromptSource",
    "SweepConfig",
    "PromptsTooLongError",
    "SweepConfigError",
    "SweepEntry",
    "build_pairs",
    "config_from_dict",
    "config_help",
    "load_config",
]

METRICS: dict[str, type[LogitDiff] | type[ProbDiff] | type[CrossEntropy]] = {
    "logit_diff": LogitDiff,
    "prob_diff": ProbDiff,
    "cross_entropy": CrossEntropy,
}
GENERATORS = ("ioi", "repeated_tokens")

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
    (
        "sweeps[].heads",
        "head sites only ("
        + ", ".join(HEAD_SITES)
        + "): null (all) or a list of head numbers, or of head names (L9H6; the older a9.h6 "
        "and 9.6 are read too), which also choose the layers: the grid is every listed layer "
        "by every listed head.",
    ),
    ("sweeps[].neurons", "mlp_pre and mlp_post only: null (all) or a list."),
    (
        "sweeps[].name",
        "file name of the entry's outputs (letters, digits, _ . -); default "
        "INDEX_SITE, e.g. 0_resid_pre.",
    ),
    (
        "direction",
        "null | denoising (clean values into the corrupt run) | noising (the ablation's "
        "values into the clean run). null: denoising with ablation corrupt (or null), noising "
        "with the other ablations.",
    ),
    (
        "ablation",
        "null or corrupt (the corrupt run's values) | zero | mean | resample: the value "
        "noising puts in (mean and resample draw from the corrupt prompts of the whole "
        "dataset). zero, mean and resample go with direction noising (or null).",
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
    (
        "executor",
        "local (default: this process) | ray (tasks on a Ray cluster's actors, each loading the "
        "model once; needs pip install 'mechkit[ray]'; --ray overrides). May change between runs.",
    ),
    (
        "ray_address",
        "executor ray only: null (start a local cluster) or a running cluster's address "
        "(auto, head:6379, ray://head:10001). May change between runs.",
    ),
    (
        "actors",
        "executor ray only: null (one per GPU of the cluster, else one per CPU) or how many "
        "model copies. May change between runs.",
    ),
)


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
    """Where the prompt pairs come from: exactly one of ``file``, ``tokens``, ``generator``.

    Example:
        >>> PromptSource(generator="ioi", n=4).generator
        'ioi'
        >>> PromptSource(generator="ioi", length=3)
        Traceback (most recent call last):
        ...
        mechkit.errors.SweepConfigError: length: applies only to generator: repeated_tokens
    """

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
    """One grid of patches: the arguments of ``activation_patch`` that choose the cells.
    ``heads`` takes head numbers or head names (``L9H6``; the older ``a9.h6`` and ``9.6`` too),
    which also choose the layers.

    Example:
        >>> entry = SweepEntry(site="z", heads=["L1H2", "L0H3"])
        >>> entry.layers, entry.heads
        ((0, 1), (2, 3))
    """

    site: str
    positions: Literal["each", "all"] | tuple[int, ...] | None = None  # None: the site's usual
    layers: tuple[int, ...] | None = None  # None means all
    heads: tuple[int, ...] | None = None
    neurons: tuple[int, ...] | None = None
    name: str | None = None  # None: INDEX_SITE

    def _read_head_names(self) -> None:
        """``heads`` given as names (``L9H6``, ``a9.h6``, ``9.6``): head numbers, and the layers
        they name (which must be among ``layers`` when those are given too)."""
        heads = self.heads
        if not isinstance(heads, list | tuple) or not any(isinstance(h, str) for h in heads):
            return
        named: list[tuple[int, int]] = []
        for value in heads:
            try:
                node = parse_node(value) if isinstance(value, str) else None
            except MechkitError:
                node = None
            if node is None or node.kind != "head" or node.port is not None:
                raise SweepConfigError(
                    "heads",
                    f"expected head numbers or head names such as 'L9H6' (not both); got {value!r}",
                )
            assert node.layer is not None and node.index is not None
            named.append((node.layer, node.index))
        layers = sorted({layer for layer, _ in named})
        if self.layers is not None:
            given = _int_list("layers", self.layers, "layers") or ()
            missing = [layer for layer in layers if layer not in given]
            if missing:
                raise SweepConfigError(
                    "heads",
                    f"expected heads of the listed layers {list(given)}; the names give layers "
                    f"{missing} too. Hint: drop layers (the names choose them)",
                )
            layers = list(given)
        object.__setattr__(self, "layers", tuple(layers))
        object.__setattr__(self, "heads", tuple(sorted({head for _, head in named})))

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
        self._read_head_names()
        for key, what in (("layers", "layers"), ("heads", "heads"), ("neurons", "neurons")):
            object.__setattr__(self, key, _int_list(key, getattr(self, key), what))
        if self.heads is not None and self.site not in HEAD_SITES:
            raise SweepConfigError(
                "heads",
                f"applies to the head sites {', '.join(HEAD_SITES)}; the site is {self.site!r}",
            )
        if self.neurons is not None and self.site not in NEURON_SITES:
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

    Example:
        >>> config = SweepConfig(model="attn-only-2l", prompts=PromptSource(generator="ioi"),
        ...                      sweeps=[SweepEntry(site="z")], ablation="mean")
        >>> config.entry_names, config.direction
        (['0_z'], None)
    """

    model: str
    prompts: PromptSource
    sweeps: tuple[SweepEntry, ...]
    metric: Literal["logit_diff", "prob_diff", "cross_entropy"] = "logit_diff"
    direction: Literal["denoising", "noising"] | None = None  # None: the ablation's default
    ablation: Literal["corrupt", "zero", "mean", "resample"] | None = None  # None: corrupt
    device: str | None = None  # None (or "auto"): CUDA when present
    dtype: str | None = None  # None: float32
    batch_size: int | None = None  # None: every pair in one batch
    memory_budget: str | int | None = None  # None: engine default for the device
    format: Literal["jsonl", "parquet"] = "jsonl"
    out: str | None = None  # None: runs/<config name>
    seed: int = 0
    executor: Literal["local", "ray"] = "local"
    ray_address: str | None = None  # None: a local Ray cluster
    actors: int | None = None  # None: one per GPU, else one per CPU

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
        _choice("ablation", self.ablation, ("corrupt", "zero", "mean", "resample"), null=True)
        if self.direction == "denoising" and self.ablation not in (None, "corrupt"):
            raise SweepConfigError(
                "ablation",
                f"expected corrupt or null with direction denoising (which puts clean values "
                f"into the corrupt run); got {self.ablation!r}. Hint: an ablation edits the "
                "clean run: direction noising, or null",
            )
        if self.device == "auto":
            object.__setattr__(self, "device", None)
        for key, check in (("device", resolve_device), ("dtype", resolve_dtype)):
            if getattr(self, key) is not None:
                try:
                    check(getattr(self, key))
                except MechkitError as exc:
                    raise SweepConfigError(key, lower_first(str(exc))) from None
        if self.batch_size is not None and (not _is_int(self.batch_size) or self.batch_size < 1):
            raise SweepConfigError(
                "batch_size", f"expected a positive integer or null; got {self.batch_size!r}"
            )
        if self.memory_budget is not None:
            try:
                parse_budget(self.memory_budget)
            except MechkitError as exc:
                raise SweepConfigError("memory_budget", lower_first(str(exc))) from None
        _choice("format", self.format, ("jsonl", "parquet"))
        if self.format == "parquet" and importlib.util.find_spec("pyarrow") is None:
            raise SweepConfigError("format", "parquet needs pyarrow. Hint: pip install pyarrow")
        if self.out is not None and (not isinstance(self.out, str) or not self.out):
            raise SweepConfigError("out", f"expected a folder path; got {self.out!r}")
        if not _is_int(self.seed):
            raise SweepConfigError("seed", f"expected an integer; got {self.seed!r}")
        _choice("executor", self.executor, ("local", "ray"))
        if self.ray_address is not None and (
            not isinstance(self.ray_address, str) or not self.ray_address
        ):
            raise SweepConfigError(
                "ray_address", f"expected null or a Ray cluster address; got {self.ray_address!r}"
            )
        if self.actors is not None and (not _is_int(self.actors) or self.actors < 1):
            raise SweepConfigError(
                "actors", f"expected a positive integer or null; got {self.actors!r}"
            )
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


def lower_first(text: str) -> str:
    """An error text to follow a key's path (``prompts.file: expected ...``).

    Example:
        >>> lower_first("Expected a file")
        'expected a file'
    """
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

    Example:
        >>> config_from_dict({"model": "attn-only-2l", "prompts": {"generator": "ioi"},
        ...                   "sweeps": [{"site": "z", "postions": "all"}]},
        ...                  source="s.yaml")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        mechkit.errors.SweepConfigError: s.yaml: sweeps[0].postions: unknown key; ... 'positions'?
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

    Example:
        >>> load_config("examples/sweep_ioi.yaml").model
        'smollm2-135m'
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
    """Every config key with what it accepts, for ``mechkit sweep --help``.

    Example:
        >>> print(config_help().splitlines()[0])
        config keys (YAML):
    """
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


def _ioi_pairs(model: Model, n: int, seed: int) -> PromptPairs:
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


def _repeated_token_pairs(model: Model, n: int, length: int, seed: int) -> PromptPairs:
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
                raise DatasetFormatError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            ok = isinstance(record, dict) and set(record) >= set(rows)
            ok = ok and all(_is_int(record[k]) for k in ("answer", "wrong"))
            ok = ok and all(
                isinstance(record[k], list) and record[k] and all(map(_is_int, record[k]))
                for k in ("clean", "corrupt")
            )
            if not ok:
                raise DatasetFormatError(
                    f'{path}:{lineno}: expected {{"clean": [ids], "corrupt": [ids], '
                    f'"answer": id, "wrong": id}}; got {line.strip()[:120]}'
                )
            ids = [*record["clean"], *record["corrupt"], record["answer"], record["wrong"]]
            bad = [i for i in ids if not 0 <= i < vocab]
            if bad:
                raise InvalidTokenError(
                    f"{path}:{lineno}: token id {bad[0]} is outside the model's vocabulary "
                    f"(0..{vocab - 1})"
                )
            for key in rows:
                rows[key].append(record[key])
    if not rows["clean"]:
        raise EmptyDatasetError(f"{path}: expected at least one pair; the file has none")
    return PromptPairs.from_tokens(
        rows["clean"], rows["corrupt"], rows["answer"], rows["wrong"], aligned=False
    )


def build_pairs(model: Model, config: SweepConfig) -> PromptPairs:
    """The config's prompt pairs for ``model``; errors name the ``prompts`` key.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> config = config_from_dict({"model": "attn-only-2l",
        ...     "prompts": {"generator": "repeated_tokens", "n": 3, "length": 4},
        ...     "sweeps": [{"site": "z"}]})
        >>> pairs = build_pairs(model, config)
        >>> len(pairs), tuple(pairs.clean_tokens.shape)
        (3, (3, 8))
    """
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
        if config.ablation != "zero":  # positions are patched (or resampled) one for one
            pairs.require_aligned()
    except MechkitError as exc:
        raise SweepConfigError(f"prompts.{key}", lower_first(str(exc))) from None
    _check_context(model, pairs, f"prompts.{key}")
    return pairs


def _check_context(model: Model, pairs: PromptPairs, key: str) -> None:
    """Refuse prompts longer than ``model.cfg.n_ctx`` before any forward pass."""
    n_ctx = model.cfg.n_ctx
    lengths = torch.maximum(pairs.clean_mask.sum(1), pairs.corrupt_mask.sum(1))  # (batch,)
    longest = int(lengths.argmax())
    if int(lengths[longest]) > n_ctx:
        too_long = int((lengths > n_ctx).sum())
        raise PromptsTooLongError(
            key,
            f"expected prompts of at most {n_ctx} tokens (the model's context, n_ctx); "
            f"{too_long} pair(s) are longer, the longest pair {longest + 1} with "
            f"{int(lengths[longest])} tokens. Hint: shorten or drop those prompts, or use a "
            "model with a longer context",
        )


# ------------------------------------------------------------------------------- fingerprint


def config_identity(config: SweepConfig) -> dict[str, Any]:
    """What the results depend on: the config less how and where it runs, files by content.

    Example:
        >>> config = config_from_dict({"model": "attn-only-2l",
        ...     "prompts": {"generator": "repeated_tokens"}, "sweeps": [{"site": "z"}]})
        >>> sorted(config_identity(config))  # doctest: +NORMALIZE_WHITESPACE
        ['ablation', 'batch_size', 'direction', 'dtype', 'mechkit', 'metric', 'model', 'prompts',
         'seed', 'sweeps']
    """
    data = config.to_dict()
    for key in ("device", "memory_budget", "format", "out", "executor", "ray_address", "actors"):
        data.pop(key)
    for key in ("file", "tokens"):
        path = data["prompts"][key]
        if path is not None:
            data["prompts"][key] = "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()
    data["mechkit"] = __version__
    return data


def fingerprint(identity: dict[str, Any]) -> str:
    """A short hash of :func:`config_identity`'s result: equal for configs whose results agree.

    Example:
        >>> fingerprint({"model": "attn-only-2l"}) == fingerprint({"model": "attn-only-2l"})
        True
    """
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


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The key paths whose values differ between two identities (``sweeps[0].site``).

    Example:
        >>> changed_keys({"seed": 0, "sweeps": [{"site": "z"}]},
        ...              {"seed": 0, "sweeps": [{"site": "q"}]})
        ['sweeps[0].site']
    """
    a, b = _flatten(old), _flatten(new)
    return sorted(k for k in a.keys() | b.keys() if a.get(k, "<absent>") != b.get(k, "<absent>"))
