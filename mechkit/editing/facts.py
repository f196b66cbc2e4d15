"""Factual prompts: a built-in set a small model can know, a CounterFact-style loader, and the
tokenized form the tracing and editing methods run on.

A fact is a subject, a relation template and an object, as in the datasets of Meng et al.
(2022, *Locating and Editing Factual Associations in GPT*, arXiv:2202.05262): ``"The capital of
{} is"`` with subject ``"France"`` and object ``"Paris"``. For editing, a fact also carries a
new object (``"Rome"``), paraphrases of its prompt (the edit should carry over) and neighbour
prompts that share the relation but not the subject (the edit should leave them alone), as
CounterFact's records do.

The built-in set (:data:`BUILTIN_FACTS`, 120 facts over six relations: capitals, languages,
continents, companies' founders, makers of products, people's professions) is written in this
file. A model knows only some of them: :func:`known_facts` keeps those whose object is one token
and is the model's top-1 next token after the prompt (or among its ``top_k``).

Objects are single tokens throughout (tracing measures the probability of one token; the
evaluation compares two tokens), written with their leading space as the model reads them
after the prompt (``" Paris"``); the loader adds the space to CounterFact's bare strings.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from mechkit.core.types import Model
from mechkit.errors import (
    DatasetFormatError,
    EmptyDatasetError,
    InvalidArgumentError,
    InvalidTypeError,
    MultiTokenAnswerError,
    check_choice,
    check_positive_int,
)
from mechkit.tokens import encode, tokenizer_of

__all__ = [
    "Fact",
    "TokenizedFact",
    "BUILTIN_FACTS",
    "builtin_facts",
    "load_facts",
    "known_facts",
    "last_logits",
    "tokenize_fact",
    "tokenize_facts",
]


@dataclasses.dataclass(frozen=True)
class Fact:
    """One factual association, and what an edit of it is checked on.

    Attributes:
        subject: the subject as it appears in the prompt (``"France"``).
        prompt: the relation template with ``{}`` where the subject goes
            (``"The capital of {} is"``).
        target: the true object, one token with its leading space (``" Paris"``).
        new_target: the object an edit should make the model say instead (``" Rome"``), or None.
        relation: a name for the relation (``"capital"``, or CounterFact's ``"P36"``).
        paraphrases: other prompts of the same fact, the subject filled in.
        neighbours: ``(prompt, object)`` pairs of other subjects under the same relation: an
            edit should not change their answers.

    Example:
        >>> f = Fact("France", "The capital of {} is", " Paris", new_target=" Rome")
        >>> f.text
        'The capital of France is'
    """

    subject: str
    prompt: str
    target: str
    new_target: str | None = None
    relation: str = ""
    paraphrases: tuple[str, ...] = ()
    neighbours: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.prompt.count("{}") != 1:
            raise InvalidArgumentError(
                f"Expected a prompt template with one '{{}}' where the subject goes; got "
                f"{self.prompt!r}. Hint: 'The capital of {{}} is'."
            )
        if not self.subject.strip():
            raise InvalidArgumentError(f"Expected a non-empty subject; got {self.subject!r}.")

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.format(self.subject)

    def with_new_target(self, new_target: str) -> Fact:
        """This fact with another ``new_target`` (an edit request).

        Example:
            >>> Fact("France", "The capital of {} is", " Paris").with_new_target(" Rome").new_target
            ' Rome'
        """
        return dataclasses.replace(self, new_target=new_target)


@dataclasses.dataclass(frozen=True, eq=False)
class TokenizedFact:
    """A fact as token ids: what tracing and editing run on (models without a tokenizer, such
    as the toy models, take these directly).

    Attributes:
        tokens: ``(pos,)`` the prompt's ids (BOS first when the model prepends one).
        subject: ``(start, stop)``, the positions of the subject's tokens.
        target: the true object's token id.
        new_target: the new object's token id, or None.
        fact: the :class:`Fact` it came from, if any.

    Example:
        >>> tf = TokenizedFact(torch.tensor([0, 5, 6, 7, 8]), (1, 3), target=9)
        >>> tf.subject_positions, tf.last_subject
        ([1, 2], 2)
    """

    tokens: Int[Tensor, " pos"]
    subject: tuple[int, int]
    target: int
    new_target: int | None = None
    fact: Fact | None = None

    def __post_init__(self) -> None:
        start, stop = self.subject
        n = int(self.tokens.shape[-1])
        if self.tokens.ndim != 1:
            raise InvalidArgumentError(
                f"Expected the tokens of one prompt, shape (pos,); got {tuple(self.tokens.shape)}."
            )
        if not 0 <= start < stop <= n:
            raise InvalidArgumentError(
                f"Expected a subject span (start, stop) inside the prompt's {n} tokens; got "
                f"{self.subject}. Hint: the subject must be in the prompt."
            )

    @property
    def subject_positions(self) -> list[int]:
        return list(range(*self.subject))

    @property
    def last_subject(self) -> int:
        """The position of the subject's last token (where ROME reads its key)."""
        return self.subject[1] - 1

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])


# ------------------------------------------------------------------------------ built-in set

# relation: (template, paraphrase templates, [(subject, object), ...]). Objects are one word.
_RELATIONS: dict[str, tuple[str, tuple[str, ...], list[tuple[str, str]]]] = {
    "capital": (
        "The capital of {} is",
        ("The capital city of {} is", "{}'s capital is the city of"),
        [
            ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
            ("Japan", "Tokyo"), ("Russia", "Moscow"), ("China", "Beijing"), ("Egypt", "Cairo"),
            ("England", "London"), ("Greece", "Athens"), ("Portugal", "Lisbon"),
            ("Austria", "Vienna"), ("Poland", "Warsaw"), ("Ireland", "Dublin"),
            ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Canada", "Ottawa"),
            ("Australia", "Canberra"), ("Kenya", "Nairobi"), ("Thailand", "Bangkok"),
            ("Turkey", "Ankara"), ("Cuba", "Havana"), ("Peru", "Lima"), ("Hungary", "Budapest"),
        ],
    ),
    "language": (
        "The official language of {} is",
        ("In {}, most people speak", "The language spoken in {} is"),
        [
            ("France", "French"), ("Germany", "German"), ("Italy", "Italian"),
            ("Spain", "Spanish"), ("Japan", "Japanese"), ("Russia", "Russian"),
            ("China", "Chinese"), ("Greece", "Greek"), ("Portugal", "Portuguese"),
            ("Brazil", "Portuguese"), ("Mexico", "Spanish"), ("Argentina", "Spanish"),
            ("Poland", "Polish"), ("Sweden", "Swedish"), ("the Netherlands", "Dutch"),
            ("Turkey", "Turkish"), ("Egypt", "Arabic"), ("Finland", "Finnish"),
            ("Austria", "German"), ("Chile", "Spanish"), ("Israel", "Hebrew"),
            ("Korea", "Korean"), ("Denmark", "Danish"), ("Norway", "Norwegian"),
        ],
    ),
    "continent": (
        "{} is a country in the continent of",
        ("{} is located in", "The continent {} belongs to is"),
        [
            ("France", "Europe"), ("Germany", "Europe"), ("Italy", "Europe"), ("Spain", "Europe"),
            ("Poland", "Europe"), ("Sweden", "Europe"), ("Kenya", "Africa"), ("Egypt", "Africa"),
            ("Nigeria", "Africa"), ("Ghana", "Africa"), ("Ethiopia", "Africa"),
            ("Morocco", "Africa"), ("Japan", "Asia"), ("China", "Asia"), ("India", "Asia"),
            ("Thailand", "Asia"), ("Vietnam", "Asia"), ("Indonesia", "Asia"),
        ],
    ),
    "founder": (
        "{} was founded by",
        ("The founder of {} is", "{} was started by"),
        [
            ("Microsoft", "Bill"), ("Apple", "Steve"), ("Amazon", "Jeff"),
            ("Facebook", "Mark"), ("SpaceX", "Elon"), ("Tesla", "Elon"), ("Google", "Larry"),
            ("Oracle", "Larry"), ("the Ford Motor Company", "Henry"), ("Disney", "Walt"),
            ("Dell", "Michael"), ("Netflix", "Reed"), ("Twitter", "Jack"),
            ("Alibaba", "Jack"), ("Wikipedia", "Jimmy"),
        ],
    ),
    "maker": (
        "{} is a product of",
        ("{} is made by", "{} was developed by"),
        [
            ("Windows", "Microsoft"), ("the iPhone", "Apple"), ("the PlayStation", "Sony"),
            ("Android", "Google"), ("the Xbox", "Microsoft"), ("the Kindle", "Amazon"),
            ("the Mustang", "Ford"), ("the Corolla", "Toyota"), ("the Civic", "Honda"),
            ("the iPad", "Apple"), ("the Galaxy S21", "Samsung"), ("the Pixel", "Google"),
            ("the Walkman", "Sony"), ("the Macintosh", "Apple"), ("Office", "Microsoft"),
            ("the Camry", "Toyota"), ("the Model S", "Tesla"), ("Gmail", "Google"),
        ],
    ),
    "profession": (
        "{} worked as a",
        ("By profession, {} was a", "{} was a famous"),
        [
            ("Wolfgang Amadeus Mozart", "composer"), ("Ludwig van Beethoven", "composer"),
            ("Johann Sebastian Bach", "composer"), ("Pablo Picasso", "painter"),
            ("Vincent van Gogh", "painter"), ("Claude Monet", "painter"),
            ("Albert Einstein", "physicist"), ("Isaac Newton", "physicist"),
            ("Ernest Hemingway", "writer"), ("Charles Dickens", "writer"),
            ("Mark Twain", "writer"), ("Leonardo da Vinci", "painter"),
            ("Frida Kahlo", "painter"), ("Marie Curie", "physicist"),
            ("Elvis Presley", "singer"), ("Frank Sinatra", "singer"),
            ("Lionel Messi", "footballer"), ("Cristiano Ronaldo", "footballer"),
            ("Michael Jordan", "basketball"), ("Sigmund Freud", "psychologist"),
            ("William Shakespeare", "playwright"),
        ],
    ),
}  # fmt: skip


def builtin_facts(relations: Iterable[str] | None = None) -> list[Fact]:
    """The built-in facts (all of them, or those of ``relations``), each with a new object (the
    next different object of its relation, for edits), paraphrases and up to five neighbours.

    Example:
        >>> facts = builtin_facts(["capital"])
        >>> facts[0].text, facts[0].target, facts[0].new_target, len(facts[0].neighbours)
        ('The capital of France is', ' Paris', ' Berlin', 5)
        >>> sorted({f.relation for f in builtin_facts()})  # doctest: +NORMALIZE_WHITESPACE
        ['capital', 'continent', 'founder', 'language', 'maker', 'profession']
    """
    names = list(_RELATIONS) if relations is None else list(relations)
    facts = []
    for name in names:
        if name not in _RELATIONS:
            check_choice("relations", name, list(_RELATIONS))
        template, paraphrases, pairs = _RELATIONS[name]
        for i, (subject, obj) in enumerate(pairs):
            later = pairs[i + 1 :] + pairs[:i]
            new = next(o for _, o in later if o != obj)
            # neighbours: same relation, other subjects; those sharing the object come first
            others = sorted(later, key=lambda pair: pair[1] != obj)
            neighbours = tuple((template.format(s), " " + o) for s, o in others[:5] if s != subject)
            facts.append(
                Fact(
                    subject=subject,
                    prompt=template,
                    target=" " + obj,
                    new_target=" " + new,
                    relation=name,
                    paraphrases=tuple(p.format(subject) for p in paraphrases),
                    neighbours=neighbours,
                )
            )
    return facts


BUILTIN_FACTS: tuple[Fact, ...] = tuple(builtin_facts())
"""Every built-in fact (see :func:`builtin_facts`)."""


# ------------------------------------------------------------------------------ loading


def _fact_from_record(record: dict[str, Any]) -> Fact:
    """A Fact from one JSON record: CounterFact's nesting, or flat fields."""

    def spaced(text: str) -> str:
        return text if text.startswith(" ") else " " + text

    if "requested_rewrite" in record:  # CounterFact
        rw = record["requested_rewrite"]
        true = spaced(rw["target_true"]["str"])
        return Fact(
            subject=rw["subject"],
            prompt=rw["prompt"],
            target=true,
            new_target=spaced(rw["target_new"]["str"]) if "target_new" in rw else None,
            relation=str(rw.get("relation_id", "")),
            paraphrases=tuple(record.get("paraphrase_prompts", ())),
            neighbours=tuple((p, true) for p in record.get("neighborhood_prompts", ())),
        )
    new = record.get("new_target")
    return Fact(
        subject=record["subject"],
        prompt=record["prompt"],
        target=spaced(record["target"]),
        new_target=spaced(new) if new else None,
        relation=str(record.get("relation", "")),
        paraphrases=tuple(record.get("paraphrases", ())),
        neighbours=tuple((p, spaced(o)) for p, o in record.get("neighbours", ())),
    )


def load_facts(path: str | Path) -> list[Fact]:
    """Facts from a JSONL file, one record a line: CounterFact's records (``requested_rewrite``
    with ``prompt``, ``subject``, ``target_true``, ``target_new``; ``paraphrase_prompts``,
    ``neighborhood_prompts``), or flat ones (``subject``, ``prompt``, ``target``, optional
    ``new_target``, ``relation``, ``paraphrases``, ``neighbours`` as ``[prompt, object]``).
    A JSON list of such records (CounterFact's ``counterfact.json``) is read too.

    Raises:
        DatasetFormatError: (a ValueError) a line is not JSON or lacks a field, naming the line.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "facts.jsonl"
        >>> _ = path.write_text(json.dumps({"requested_rewrite": {
        ...     "prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
        ...     "target_true": {"str": "French"}, "target_new": {"str": "English"},
        ...     "relation_id": "P103"}, "neighborhood_prompts": ["Michel Rocard's mother tongue is"]}))
        >>> [f] = load_facts(path)
        >>> f.text, f.target, f.new_target, f.neighbours
        ('The mother tongue of Danielle Darrieux is', ' French', ' English', (("Michel Rocard's mother tongue is", ' French'),))
    """  # noqa: E501
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    facts: list[Fact] = []
    if stripped.startswith("["):
        try:
            items = json.loads(text)
        except ValueError as exc:
            raise DatasetFormatError(f"{path}: expected a JSON list of facts; {exc}.") from None
        lines = [(i + 1, item) for i, item in enumerate(items)]
    else:
        lines = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                lines.append((number, json.loads(line)))
            except ValueError as exc:
                raise DatasetFormatError(
                    f"{path}:{number}: expected one JSON object a line; {exc}."
                ) from None
    for number, record in lines:
        try:
            facts.append(_fact_from_record(record))
        except (KeyError, TypeError) as exc:
            raise DatasetFormatError(
                f"{path}:{number}: expected a CounterFact record or the fields subject, prompt "
                f"and target; missing or wrong {exc}. Hint: {{'subject': 'France', 'prompt': "
                "'The capital of {} is', 'target': 'Paris'}."
            ) from None
        except InvalidArgumentError as exc:
            raise DatasetFormatError(f"{path}:{number}: {exc}") from None
    if not facts:
        raise EmptyDatasetError(f"Expected at least one fact in {path}; it has none.")
    return facts


# ------------------------------------------------------------------------------ tokens


def _one_token(model: Model, word: str, what: str) -> int:
    ids = tokenizer_of(model).encode(word, add_special_tokens=False)
    if len(ids) != 1:
        raise MultiTokenAnswerError(
            f"Expected the {what} to be a single token; {word!r} is {len(ids)} tokens. Hint: "
            "choose a one-token object (with its leading space), or filter with known_facts."
        )
    return int(ids[0])


def tokenize_fact(
    model: Model, fact: Fact | TokenizedFact, *, prompt: str | None = None
) -> TokenizedFact:
    """``fact`` as token ids, with its subject's token span found (``prompt``: another
    template of the same fact, e.g. a random prefix + the template).

    Raises:
        InvalidArgumentError: the subject's tokens are not a span of the prompt's tokens.
        MultiTokenAnswerError: an object that is not one token.

    Example:
        >>> model = mk.load_model("smollm2-135m")
        >>> tf = tokenize_fact(model, Fact("France", "The capital of {} is", " Paris"))
        >>> tf.subject, model.to_string(tf.tokens[slice(*tf.subject)]), tf.n_tokens
        ((3, 4), ' France', 5)
    """
    if isinstance(fact, TokenizedFact):
        return fact
    template = fact.prompt if prompt is None else prompt
    if template.count("{}") != 1:
        raise InvalidArgumentError(
            f"Expected a prompt with one '{{}}' for the subject; got {template!r}."
        )
    before = template[: template.index("{}")]
    text = template.format(fact.subject)
    # the subject's leading space belongs to its first token, as the tokenizer reads it
    head = before.rstrip(" ")
    with_subject = before + fact.subject
    ids = encode(model, text)
    start = len(encode(model, head)) if head else len(encode(model, ""))
    stop = len(encode(model, with_subject))
    if ids[:stop] != encode(model, with_subject) or start >= stop:
        raise InvalidArgumentError(
            f"Expected the subject {fact.subject!r} to be whole tokens of the prompt {text!r}; "
            "the tokenizer merges it with its neighbours. Hint: put a space before and after it."
        )
    target = _one_token(model, fact.target, "object")
    new = None if fact.new_target is None else _one_token(model, fact.new_target, "new object")
    return TokenizedFact(torch.tensor(ids), (start, stop), target, new, fact)


def tokenize_facts(
    model: Model, facts: Fact | TokenizedFact | Sequence[Fact | TokenizedFact]
) -> list[TokenizedFact]:
    """Each fact as :class:`TokenizedFact` (already tokenized ones pass through).

    Example:
        >>> tokenize_facts(mk.load_model("attn-only-2l"),
        ...                TokenizedFact(torch.tensor([0, 5, 6]), (1, 2), 7))[0].subject
        (1, 2)
    """
    if isinstance(facts, Fact | TokenizedFact):
        facts = [facts]
    if isinstance(facts, str) or not isinstance(facts, Sequence):
        raise InvalidTypeError(
            f"Expected a Fact, a TokenizedFact or a list of them; got {type(facts).__name__}. "
            "Hint: mk.editing.builtin_facts()."
        )
    if not facts:
        raise EmptyDatasetError("Expected at least one fact; got none.")
    return [tokenize_fact(model, f) for f in facts]


@torch.no_grad()
def last_logits(model: Model, prompts: Sequence[Sequence[int]]) -> Tensor:
    """The logits ``(prompt, d_vocab)`` after each prompt's last token; prompts of one length
    run as one batch.

    Example:
        >>> last_logits(mk.load_model("attn-only-2l"), [[0, 1, 2], [0, 3], [0, 4, 5]]).shape
        torch.Size([3, 500])
    """
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(i)
    out = torch.zeros(len(prompts), model.cfg.d_vocab)
    for group in groups.values():
        tokens = torch.tensor([list(prompts[i]) for i in group], device=model.cfg.device)
        out[group] = model(tokens)[:, -1].float().cpu()
    return out


@torch.no_grad()
def known_facts(
    model: Model,
    facts: Sequence[Fact] | None = None,
    *,
    top_k: int = 1,
) -> list[Fact]:
    """The facts the model knows: the object is one token and is among the model's ``top_k``
    next tokens after the prompt (``top_k=1``: the greedy completion). Facts whose object is
    several tokens are dropped, not refused.

    Example:
        >>> model = mk.load_model("smollm2-135m")
        >>> [f.target for f in known_facts(model, builtin_facts(["capital"])[:2])]
        [' Paris', ' Berlin']
    """
    top_k = check_positive_int("top_k", top_k)
    facts = list(BUILTIN_FACTS if facts is None else facts)
    usable = []
    for fact in facts:
        try:
            usable.append((fact, tokenize_fact(model, dataclasses.replace(fact, new_target=None))))
        except (MultiTokenAnswerError, InvalidArgumentError):
            continue
    logits = last_logits(model, [tf.tokens.tolist() for _, tf in usable])
    top = logits.topk(top_k).indices  # (fact, top_k)
    return [fact for (fact, tf), best in zip(usable, top, strict=True) if tf.target in best]
