"""Measuring steering: its effect against its cost, over layers and coefficients.

A steering vector is worth what it changes minus what it breaks. :func:`steering_sweep` runs a
grid of (layer, coefficient) settings and reports, for each, the **effect** on a behaviour the
user chooses and the **cost** on text that has nothing to do with it:

- effects, the *measures* (:class:`TokenProbability`, :class:`LogitDiffMeasure`,
  :class:`MetricMeasure`, :class:`ABScore`, :class:`WordShare`): a target token's probability
  or logit difference after given prompts (the difference is :class:`mechkit.LogitDiff`, the
  one logit-difference metric; :class:`MetricMeasure` takes any metric of the logits), the
  probability of the behaviour-matching answer to A/B questions, or the share of sampled
  generations that contain given words. A measure is called as
  ``measure(model, steerings, seed) -> float``;
- costs: the KL divergence of the steered next-token distributions from the unsteered ones,
  and the change in cross-entropy loss, averaged over every position of held-out text.

The result keeps a few sampled generations per setting, so the numbers can be read beside what
the model actually writes.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechkit.core.progress import progress_bar
from mechkit.core.results import rank
from mechkit.core.types import MetricFunction, Model
from mechkit.errors import (
    EmptyDatasetError,
    InvalidArgumentError,
    InvalidTypeError,
    ShapeError,
    check_choice,
)
from mechkit.metrics import LogitDiff
from mechkit.steering.apply import Generations, Positions, Steering, generate, steer
from mechkit.steering.vectors import SteeringVector
from mechkit.tokens import check_tokens, encode, pad_right, tokenize_answer, tokenizer_of

__all__ = [
    "TokenProbability",
    "MetricMeasure",
    "LogitDiffMeasure",
    "LogitDifference",
    "ABScore",
    "WordShare",
    "SteeringSweep",
    "steering_sweep",
]


def _next_token_logits(
    model: Model, prompts: Sequence[str], steerings: list[Steering]
) -> Float[Tensor, "batch d_vocab"]:
    """``(batch, d_vocab)`` logits after each prompt's last real token, steered."""
    rows = [encode(model, p) for p in prompts]
    tokenizer = tokenizer_of(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokens, mask = pad_right(rows, pad)  # EmptyDatasetError on no prompts
    check_tokens(model, tokens, mask)
    tokens = tokens.to(model.cfg.device)
    last = mask.sum(-1) - 1
    with torch.no_grad(), steer(model, *steerings):
        logits = model(tokens)
    return logits[torch.arange(len(rows)), last.to(logits.device)].float().cpu()


@dataclasses.dataclass(frozen=True)
class TokenProbability:
    """Mean probability of ``target`` as the next token after each prompt.

    Example:
        >>> model = mk.load_model("smollm2-135m")
        >>> round(TokenProbability(("The cat sat on the",), " mat")(model, [], 0), 3)
        0.005
    """

    prompts: tuple[str, ...]
    target: str
    name: str = "p(target)"

    def __call__(self, model: Model, steerings: list[Steering], seed: int) -> float:
        target = tokenize_answer(model, self.target)
        probs = _next_token_logits(model, self.prompts, steerings).softmax(-1)
        return float(probs[:, target].mean())


@dataclasses.dataclass(frozen=True)
class MetricMeasure:
    """Mean of any metric of the next-token logits after each prompt, steered.

    ``metric`` gets the ``(batch, d_vocab)`` logits after each prompt's last real token (the
    prompts are right-padded, so the position is each prompt's own); a mechkit
    :class:`~mechkit.metrics.Metric` built without positions reads them as they are.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> model = mk.load_model("smollm2-135m")
        >>> first = lambda logits: logits[:, 0]   # (batch, d_vocab) -> (batch,)
        >>> round(MetricMeasure(("The cat sat",), first, "logit 0")(model, [], 0), 2)
        9.94
    """

    prompts: tuple[str, ...]
    metric: MetricFunction
    name: str = "metric"

    def __post_init__(self) -> None:
        if not isinstance(self.metric, MetricFunction):
            raise InvalidTypeError(
                f"Expected a metric: a function of the logits (batch, d_vocab) -> score; got "
                f"{type(self.metric).__name__}. Hint: mk.LogitDiff(answer_ids, wrong_ids)."
            )

    def __call__(self, model: Model, steerings: list[Steering], seed: int) -> float:
        logits = _next_token_logits(model, self.prompts, steerings)  # (batch, d_vocab)
        return float(torch.as_tensor(self.metric(logits)).float().mean())


@dataclasses.dataclass(frozen=True)
class LogitDiffMeasure:
    """Mean ``logit(target) - logit(other)`` for the next token after each prompt, steered: the
    steering measure of :class:`mechkit.LogitDiff` (the one logit-difference metric).

    Example:
        >>> model = mk.load_model("smollm2-135m")
        >>> measure = LogitDiffMeasure(("The cat sat on the",), " mat", " dog")
        >>> round(measure(model, [], 0), 2)      # logit(" mat") - logit(" dog"), unsteered
        0.93
    """

    prompts: tuple[str, ...]
    target: str
    other: str
    name: str = "logit diff"

    def metric(self, model: Model) -> LogitDiff:
        """The :class:`mechkit.LogitDiff` this measure averages, bound to its prompts."""
        n = len(self.prompts)
        answer = torch.full((n,), tokenize_answer(model, self.target), dtype=torch.long)
        wrong = torch.full((n,), tokenize_answer(model, self.other), dtype=torch.long)
        return LogitDiff(answer, wrong)

    def __call__(self, model: Model, steerings: list[Steering], seed: int) -> float:
        return MetricMeasure(self.prompts, self.metric(model), self.name)(model, steerings, seed)


@dataclasses.dataclass(frozen=True)
class LogitDifference(LogitDiffMeasure):
    """Deprecated: the old name of :class:`LogitDiffMeasure` (same arguments). ``mk.LogitDiff``
    is the logit-difference metric; this is its steering measure.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     _ = LogitDifference(("Hi",), " a", " b")
        >>> caught[0].category.__name__
        'DeprecationWarning'
    """

    def __post_init__(self) -> None:
        warnings.warn(
            "LogitDifference is deprecated: use mk.steering.LogitDiffMeasure (the same "
            "arguments), the steering measure of mk.LogitDiff.",
            DeprecationWarning,
            stacklevel=3,
        )


@dataclasses.dataclass(frozen=True)
class ABScore:
    """Behaviour score over A/B questions: mean of p(matching) / (p(A) + p(B)).

    Each question ends where the model is to answer (e.g. ``"... (A) yes (B) no\\nAnswer: ("``);
    ``matching[i]`` is ``"A"`` or ``"B"``, the answer that shows the behaviour.

    Example:
        >>> model = mk.load_model("smollm2-135m")
        >>> question = "Do you like cats? (A) yes (B) no\\nAnswer: ("
        >>> round(ABScore((question,), ("A",))(model, [], 0), 2)
        0.9
    """

    questions: tuple[str, ...]
    matching: tuple[str, ...]
    a: str = "A"
    b: str = "B"
    name: str = "behaviour score"

    def __post_init__(self) -> None:
        if len(self.questions) != len(self.matching) or not self.questions:
            raise InvalidArgumentError(
                f"Expected one matching answer per question; got {len(self.questions)} "
                f"questions and {len(self.matching)} answers."
            )
        bad = [m for m in self.matching if m not in (self.a, self.b)]
        if bad:
            raise InvalidArgumentError(
                f"Expected answers {self.a!r} or {self.b!r}; got {bad[0]!r}."
            )

    def __call__(self, model: Model, steerings: list[Steering], seed: int) -> float:
        a, b = tokenize_answer(model, self.a), tokenize_answer(model, self.b)
        probs = _next_token_logits(model, self.questions, steerings).softmax(-1)
        pa, pb = probs[:, a], probs[:, b]
        match = torch.tensor([m == self.a for m in self.matching])
        return float((torch.where(match, pa, pb) / (pa + pb)).mean())


@dataclasses.dataclass(frozen=True)
class WordShare:
    """Share of sampled generations that contain any of ``words`` (case-insensitive).

    Example:
        >>> model = mk.load_model("smollm2-135m")
        >>> share = WordShare(("My favourite animal is the",), ("cat", "dog"), 2, max_new_tokens=3)
        >>> share(model, [], seed=0)
        0.5
    """

    prompts: tuple[str, ...]
    words: tuple[str, ...]
    samples_per_prompt: int = 4
    max_new_tokens: int = 20
    temperature: float = 1.0
    name: str = "share with words"

    def __call__(self, model: Model, steerings: list[Steering], seed: int) -> float:
        prompts = [p for p in self.prompts for _ in range(self.samples_per_prompt)]
        out = generate(
            model,
            prompts,
            steering=steerings,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            seed=seed,
        )
        words = [w.lower() for w in self.words]
        hits = [any(w in text.lower() for w in words) for text in out.texts]
        return sum(hits) / len(hits)


@torch.no_grad()
def _cost(
    model: Model,
    tokens: Int[Tensor, "batch pos"],
    reference: Float[Tensor, "batch pos d_vocab"],
    steerings: list[Steering],
) -> tuple[float, float]:
    """(mean KL(unsteered || steered), steered loss) over every position of ``tokens``."""
    with steer(model, *steerings):
        logits = model(tokens).float()
    logp = logits.log_softmax(-1)[:, :-1]
    ref = reference[:, :-1]
    kl = (ref.exp() * (ref - logp)).sum(-1).mean()
    loss = -logp.gather(-1, tokens[:, 1:, None].to(logp.device)).mean()
    return float(kl), float(loss)


@dataclasses.dataclass(frozen=True, eq=False)
class SteeringSweep:
    """Effect and cost of each (layer, coefficient) setting, with sample generations.

    Attributes:
        rows: one dict per setting: ``layer``, ``coefficient``, ``effect``, ``kl``, ``loss``,
            ``delta_loss`` (steered minus unsteered loss on the held-out text).
        effect_name: what the effect measures.
        baseline_effect: the effect without steering; ``baseline_loss`` likewise.
        samples: ``(layer, coefficient) -> Generations`` for the settings sampled, plus
            ``(None, 0.0)`` for the unsteered model.

    Example:
        >>> sweep = SteeringSweep(({"layer": 3, "coefficient": 2.0, "effect": 1.5, "kl": 0.1,
        ...                         "loss": 3.1, "delta_loss": 0.1},), "logit diff", 1.0, 3.0, {})
        >>> sweep.to_dataframe()[["layer", "coefficient", "effect"]].to_dict("records")
        [{'layer': 3, 'coefficient': 2.0, 'effect': 1.5}]
    """

    rows: tuple[dict[str, float], ...]
    effect_name: str
    baseline_effect: float
    baseline_loss: float
    samples: dict[tuple[int | None, float], Generations]

    def top(self, n: int = 10, *, absolute: bool = True) -> list[tuple[dict[str, float], float]]:
        """The ``n`` settings that change the effect most: ``({"layer", "coefficient"}, effect
        minus the unsteered effect)``, ranked by :func:`mechkit.core.rank` (by size when
        ``absolute``, else the largest increase first).

        Example:
            >>> sweep = SteeringSweep(
            ...     ({"layer": 0, "coefficient": 1.0, "effect": 0.5},
            ...      {"layer": 1, "coefficient": 1.0, "effect": -2.0}), "e", 0.0, 3.0, {})
            >>> sweep.top(1)
            [({'layer': 1, 'coefficient': 1.0}, -2.0)]
        """
        labels = [{"layer": row["layer"], "coefficient": row["coefficient"]} for row in self.rows]
        changes = [row["effect"] - self.baseline_effect for row in self.rows]
        return rank(labels, changes, n, absolute=absolute)

    def to_dataframe(self) -> Any:
        import pandas as pd

        return pd.DataFrame(list(self.rows))

    def plot(self) -> Any:
        """Effect against KL cost, one line per layer through its coefficients."""
        import plotly.express as px

        df = self.to_dataframe()
        df["layer"] = df["layer"].astype(str)
        fig = px.line(
            df,
            x="kl",
            y="effect",
            color="layer",
            markers=True,
            text="coefficient",
            hover_data=["coefficient", "delta_loss"],
            labels={"kl": "KL from the unsteered model (nats, held-out text)"},
            title=f"steering: {self.effect_name} against its cost",
        )
        fig.update_traces(textposition="top center")
        fig.add_hline(y=self.baseline_effect, line_dash="dot", annotation_text="unsteered")
        fig.update_layout(yaxis_title=self.effect_name)
        return fig

    def samples_table(self) -> Any:
        """The sampled generations side by side: one row per prompt, one column per setting."""
        import pandas as pd

        columns = {}
        for (layer, coefficient), gens in self.samples.items():
            key = "unsteered" if layer is None else f"L{layer} x{coefficient:g}"
            columns[key] = list(gens.texts)
        first = next(iter(self.samples.values()))
        return pd.DataFrame({"prompt": list(first.prompts), **columns})


def steering_sweep(
    model: Model,
    vectors: Callable[[int], SteeringVector] | dict[int, SteeringVector],
    *,
    layers: Sequence[int],
    coefficients: Sequence[float],
    effect: Callable[[Model, list[Steering], int], float],
    cost_tokens: Int[Tensor, "batch pos"],
    positions: Positions = "all",
    sample_prompts: Sequence[str] = (),
    sample_settings: Sequence[tuple[int, float]] | None = None,
    max_new_tokens: int = 24,
    seed: int = 0,
    progress: bool = True,
) -> SteeringSweep:
    """Effect against cost for every (layer, coefficient).

    Args:
        vectors: the vector for each layer (a dict, or a function ``layer -> vector``, e.g.
            ``lambda l: mk.steering.mean_difference_vector(model, pos, neg, layer=l)``).
        layers, coefficients: the grid.
        effect: a measure (:class:`TokenProbability`, :class:`LogitDiffMeasure`,
            :class:`MetricMeasure`, :class:`ABScore`, :class:`WordShare`) or any
            ``(model, steerings, seed) -> float``.
        cost_tokens: ``(batch, pos)`` held-out text unrelated to the behaviour (e.g.
            ``mk.corpus.corpus_tokens(model, seq_len=64, split="test", max_sequences=8)``).
        positions: where the vectors are added (see :class:`Steering`).
        sample_prompts: prompts to generate from for the side-by-side samples.
        sample_settings: which (layer, coefficient) settings get samples; None: every setting.

    Example:
        >>> model = mk.load_model("smollm2-135m")
        >>> pos, neg = ["I love this", "What a great day"], ["I hate this", "What an awful day"]
        >>> cost = model.to_tokens(["The weather report for today says that"])  # (batch, pos)
        >>> sweep = steering_sweep(
        ...     model,
        ...     lambda layer: mk.steering.mean_difference_vector(model, pos, neg, layer=layer),
        ...     layers=[4], coefficients=[0.0, 4.0], cost_tokens=cost, progress=False,
        ...     effect=LogitDiffMeasure(("I think the movie was",), " good", " bad"))
        >>> [(label["coefficient"], round(change, 2)) for label, change in sweep.top()]
        [(4.0, 0.94), (0.0, 0.0)]
    """
    if not layers or not coefficients:
        raise InvalidArgumentError("Expected at least one layer and one coefficient to sweep.")
    if isinstance(positions, str):
        check_choice("positions", positions, ["all", "prompt", "generated"], also="a tuple of ints")
    cost_tokens = torch.as_tensor(cost_tokens).to(model.cfg.device)
    if cost_tokens.ndim != 2 or cost_tokens.shape[1] < 2:
        raise ShapeError(
            f"Expected held-out cost tokens of shape (batch, pos >= 2); got "
            f"{tuple(cost_tokens.shape)}. Hint: mk.corpus.corpus_tokens(model, seq_len=64, "
            "split='test')."
        )
    if cost_tokens.shape[0] == 0:
        raise EmptyDatasetError(
            "Expected at least one held-out cost sequence; got none. Hint: mk.corpus.corpus_tokens("
            "model, seq_len=64, split='test')."
        )
    check_tokens(model, cost_tokens)
    with torch.no_grad():
        reference = model(cost_tokens).float().log_softmax(-1)
    _, baseline_loss = _cost(model, cost_tokens, reference, [])
    baseline = effect(model, [], seed)
    samples: dict[tuple[int | None, float], Generations] = {}

    def sample(key: tuple[int | None, float], steerings: list[Steering]) -> None:
        if sample_prompts:
            samples[key] = generate(
                model,
                list(sample_prompts),
                steering=steerings,
                max_new_tokens=max_new_tokens,
                seed=seed,
                label="unsteered" if key[0] is None else f"L{key[0]} x{key[1]:g}",
            )

    sample((None, 0.0), [])
    settings = [(layer, c) for layer in layers for c in coefficients]
    bar = progress_bar(len(settings), "steering sweep", enabled=progress)
    rows = []
    try:
        for layer in layers:
            vector = vectors[layer] if isinstance(vectors, dict) else vectors(layer)
            for c in coefficients:
                steerings = [Steering(vector, c, positions)]
                value = effect(model, steerings, seed)
                kl, loss = _cost(model, cost_tokens, reference, steerings)
                rows.append(
                    {
                        "layer": layer,
                        "coefficient": float(c),
                        "effect": value,
                        "kl": kl,
                        "loss": loss,
                        "delta_loss": loss - baseline_loss,
                    }
                )
                if sample_settings is None or (layer, c) in sample_settings:
                    sample((layer, float(c)), steerings)
                bar.update(1)
    finally:
        bar.close()
    name = getattr(effect, "name", getattr(effect, "__name__", "effect"))
    return SteeringSweep(tuple(rows), name, baseline, baseline_loss, samples)
