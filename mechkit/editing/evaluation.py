"""How well an edit took, as CounterFact measures it (Meng et al. 2022, arXiv:2202.05262,
section 3.3), before and after:

- **efficacy**: the share of facts whose prompt now prefers the new object, ``P(new) >
  P(old)``;
- **paraphrase**: the same on the fact's paraphrases (generalisation);
- **neighbourhood** (specificity): the share of neighbour prompts (same relation, other
  subjects) that still prefer their own object over the edited fact's new one (neighbours
  whose object is several tokens are left out);
- **fluency**: the n-gram entropy of a greedy continuation of the prompt (ROME's
  ``compute_n_gram_entropy``: ``(2/3 H2 + 4/3 H3) / 2``, word bigrams and trigrams, in bits);
  repetitive text, a sign of a broken model, scores low.

Objects are compared by their (single) token's probability at the prompt's last position.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mechkit.core.progress import progress_bar
from mechkit.core.types import Model
from mechkit.editing.edits import WeightEdit, edit
from mechkit.editing.facts import Fact, last_logits
from mechkit.errors import InvalidArgumentError, InvalidTypeError, MultiTokenAnswerError
from mechkit.tokens import encode, tokenizer_of

__all__ = ["EditEvaluation", "evaluate_edits", "ngram_entropy", "METRICS"]

METRICS: tuple[str, ...] = ("efficacy", "paraphrase", "neighbourhood", "fluency")


def ngram_entropy(
    text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)
) -> float:
    """ROME's fluency score of ``text``: the entropy (bits) of its word n-gram frequencies,
    for each ``n``, weighted, averaged.

    Example:
        Bigrams ab, ba twice each (1 bit); trigrams aba twice, bab once (0.918 bits):

        >>> ngram_entropy("a b a b a")  # doctest: +ELLIPSIS
        0.9455...
        >>> ngram_entropy("the cat sat on the mat") > ngram_entropy("the the the the the the")
        True
    """
    words = re.findall(r"\w+|[^\w\s]", text.lower())
    values = []
    for n, w in zip(ns, weights, strict=True):
        grams = collections.Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        h = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        values.append(h * w)
    return sum(values) / len(values)


@dataclasses.dataclass(frozen=True, eq=False)
class EditEvaluation:
    """Each fact's scores before and after its edit.

    Attributes:
        requests: one line per fact.
        before, after: metric name -> ``(fact,)`` scores (:data:`METRICS`, plus ``new_prob``,
            the new object's probability after the prompt).
        method: the edits' method.

    Example:
        >>> ev = EditEvaluation(("a",), {m: torch.tensor([0.0]) for m in METRICS},
        ...                     {m: torch.tensor([1.0]) for m in METRICS}, "ROME")
        >>> ev.table().loc["efficacy"].tolist()
        [0.0, 100.0]
    """

    requests: tuple[str, ...]
    before: dict[str, Tensor]
    after: dict[str, Tensor]
    method: str

    def summary(self) -> dict[str, dict[str, float]]:
        """``{"before"|"after": {metric: mean}}``; the shares in percent, fluency in bits."""

        def mean(values: dict[str, Tensor], m: str) -> float:
            scale = 1.0 if m == "fluency" else 100.0
            return float(values[m].nanmean()) * scale

        return {
            side: {m: mean(values, m) for m in METRICS if m in values}
            for side, values in (("before", self.before), ("after", self.after))
        }

    def table(self) -> Any:
        """The metrics down, ``before`` and ``after`` across (pandas).

        Example:
            >>> ev = EditEvaluation(("a",), {"fluency": torch.tensor([5.0])},
            ...                     {"fluency": torch.tensor([4.0])}, "ROME")
            >>> ev.table()
                     before  after
            fluency     5.0    4.0
        """
        import pandas as pd

        s = self.summary()
        rows = [m for m in METRICS if m in self.before]
        return pd.DataFrame({side: [s[side][m] for m in rows] for side in s}, index=rows)

    def to_dataframe(self) -> Any:
        """One row per fact: the request and each metric before and after."""
        import pandas as pd

        data: dict[str, Any] = {"request": list(self.requests)}
        for side, values in (("before", self.before), ("after", self.after)):
            for m, v in values.items():
                data[f"{m}_{side}"] = v.tolist()
        return pd.DataFrame(data)

    def plot(self) -> Any:
        """Bars of each metric before and after (plotly)."""
        import plotly.graph_objects as go

        t = self.table()
        fig = go.Figure([go.Bar(name=side, x=list(t.index), y=t[side].tolist()) for side in t])
        fig.update_layout(title=f"{self.method}: {len(self.requests)} edits", barmode="group")
        return fig


def _prefers(model: Model, prompts: list[str], first: list[int], second: list[int]) -> Tensor:
    """1 where ``P(first) > P(second)`` after each prompt."""
    logits = last_logits(model, [encode(model, p) for p in prompts])
    rows = torch.arange(len(prompts))
    return (logits[rows, first] > logits[rows, second]).float()


def _one(model: Model, word: str) -> int:
    ids = tokenizer_of(model).encode(word, add_special_tokens=False)
    if len(ids) != 1:
        raise MultiTokenAnswerError(
            f"Expected objects of one token; {word!r} is {len(ids)}. Hint: known_facts keeps "
            "only facts whose objects are one token."
        )
    return int(ids[0])


@torch.no_grad()
def _scores(model: Model, facts: Sequence[Fact], fluency_tokens: int) -> dict[str, Tensor]:
    old = [_one(model, f.target) for f in facts]
    new = [_one(model, f.new_target or "") for f in facts]
    logits = last_logits(model, [encode(model, f.text) for f in facts])
    probs = logits.float().softmax(-1)
    rows = torch.arange(len(facts))
    out = {
        "efficacy": (probs[rows, new] > probs[rows, old]).float(),
        "new_prob": probs[rows, new],
    }
    para, neigh, fluency = [], [], []
    for f, o, n in zip(facts, old, new, strict=True):
        ps = list(f.paraphrases)
        para.append(
            float(_prefers(model, ps, [n] * len(ps), [o] * len(ps)).mean()) if ps else math.nan
        )
        # neighbours whose own object is several tokens cannot be compared by one token: skipped
        ids = [
            (p, tokenizer_of(model).encode(obj, add_special_tokens=False))
            for p, obj in f.neighbours
        ]
        usable = [(p, i[0]) for p, i in ids if len(i) == 1]
        if usable:
            prompts, own = [p for p, _ in usable], [i for _, i in usable]
            neigh.append(float(_prefers(model, prompts, own, [n] * len(own)).mean()))
        else:
            neigh.append(math.nan)
        if fluency_tokens:
            tokens = torch.tensor([encode(model, f.text)], device=model.cfg.device)
            text = model.generate(
                tokens, max_new_tokens=fluency_tokens, do_sample=False, verbose=False
            )
            assert isinstance(text, Tensor)
            fluency.append(ngram_entropy(tokenizer_of(model).decode(text[0].tolist())))
    out["paraphrase"] = torch.tensor(para)
    out["neighbourhood"] = torch.tensor(neigh)
    if fluency_tokens:
        out["fluency"] = torch.tensor(fluency)
    return out


def evaluate_edits(
    model: Model,
    facts: Sequence[Fact],
    edits: WeightEdit | Sequence[WeightEdit],
    *,
    fluency_tokens: int = 20,
    before: dict[str, Tensor] | None = None,
    progress: bool = True,
) -> EditEvaluation:
    """Score ``facts`` before and after their edits (module docstring).

    Args:
        model: the unedited model (it is left unedited).
        facts: :class:`~mechkit.editing.Fact` s with ``new_target``, as text.
        edits: one edit of all the facts (MEMIT), or one edit per fact, in order (ROME: each is
            applied alone and scored on its own fact).
        fluency_tokens: greedy tokens generated for fluency (0 skips it).
        before: the unedited scores of the same facts from an earlier evaluation
            (``earlier.before``), to skip computing them again.
        progress: show a progress bar.

    Example:
        >>> model = mk.load_model("smollm2-135m")
        >>> fact = mk.editing.builtin_facts(["capital"])[0]   # Paris -> Berlin
        >>> nothing = mk.WeightEdit({}, "none")
        >>> ev = evaluate_edits(model, [fact], nothing, fluency_tokens=0, progress=False)
        >>> {m: round(v) for m, v in ev.summary()["after"].items()}   # nothing edited: as before
        {'efficacy': 0, 'paraphrase': 50, 'neighbourhood': 80}
    """
    facts = list(facts)
    if not facts or not all(isinstance(f, Fact) for f in facts):
        raise InvalidTypeError(
            "Expected facts as text (Fact objects with new_target, paraphrases and neighbours); "
            f"got {[type(f).__name__ for f in facts][:3]}."
        )
    if any(f.new_target is None for f in facts):
        raise InvalidArgumentError("Expected every fact to have a new_target to evaluate.")
    if before is None:
        before = _scores(model, facts, fluency_tokens)
    if isinstance(edits, WeightEdit):
        with edit(model, edits):
            after = _scores(model, facts, fluency_tokens)
        method = edits.method
    else:
        edits = list(edits)
        if len(edits) != len(facts):
            raise InvalidArgumentError(
                f"Expected one edit for all facts or one per fact; got {len(edits)} edits for "
                f"{len(facts)} facts."
            )
        parts = []
        with progress_bar(len(facts), "evaluating edits", enabled=progress) as bar:
            for f, e in zip(facts, edits, strict=True):
                with edit(model, e):
                    parts.append(_scores(model, [f], fluency_tokens))
                bar.update()
        after = {m: torch.cat([p[m] for p in parts]) for m in parts[0]}
        method = edits[0].method if edits else ""
    requests = tuple(f"{f.text}:{f.target} ->{f.new_target}" for f in facts)
    return EditEvaluation(requests, before, after, method)
