"""One resolver of an experiment's inputs, for every method that compares runs of a model.

The vocabulary, the same in every method:

- ``direction``: ``"denoising"`` runs the **corrupt** prompts and puts clean values in (does
  this part suffice to restore the clean behaviour?); ``"noising"`` runs the **clean** prompts
  and puts the ablation's values in (is this part necessary?).
- ``ablation``: the value an ablated (noised) part takes: ``"corrupt"`` (its value on the
  corrupt prompt of the pair, the default), ``"mean"`` (its mean over the reference prompts),
  ``"zero"``, or ``"resample"`` (its value on a randomly drawn reference prompt). Denoising
  always puts clean values into the corrupt run, so it goes with ``ablation="corrupt"`` only.
  When ``direction`` is not given it is ``"denoising"`` for ``ablation="corrupt"`` and
  ``"noising"`` for the others (an ablation edits the clean run).
- ``reference``: the prompts ``"mean"`` and ``"resample"`` draw from: by default the corrupt
  prompts, or the clean ones when there are none. The mean is per position when the reference
  prompts have the patched prompts' length and no padding, else one mean over all their real
  tokens (:func:`reference_mean`).

A method calls :func:`resolve_contrast` first, before any forward pass, so bad input fails in
milliseconds with one error text whichever method was called.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

from jaxtyping import Bool, Int
from torch import Tensor

from mechkit.errors import (
    InvalidArgumentError,
    InvalidTypeError,
    PromptLengthError,
    ShapeError,
    check_choice,
)
from mechkit.metrics import LogitDiff
from mechkit.prompts import PromptPairs
from mechkit.tokens import token_batch

__all__ = [
    "ABLATIONS",
    "DIRECTIONS",
    "Ablation",
    "Direction",
    "Contrast",
    "resolve_contrast",
    "reference_mean",
]

Direction = Literal["denoising", "noising"]
Ablation = Literal["corrupt", "mean", "zero", "resample"]
DIRECTIONS: tuple[str, ...] = ("denoising", "noising")
ABLATIONS: tuple[str, ...] = ("corrupt", "mean", "zero", "resample")


@dataclasses.dataclass(frozen=True, eq=False)
class Contrast:
    """The checked inputs of an experiment, every tensor on the model's device.

    Attributes:
        clean_tokens, clean_mask: ``(batch, pos)`` ids and True at real tokens.
        corrupt_tokens, corrupt_mask: the same for the corrupt prompts, or None.
        metric: a mechkit :class:`~mechkit.metrics.Metric` or a function of the logits.
        direction: ``"denoising"`` or ``"noising"``.
        ablation: ``"corrupt"``, ``"mean"``, ``"zero"`` or ``"resample"``.
        reference_tokens, reference_mask: the reference prompts of ``"mean"`` and
            ``"resample"`` (None for the other ablations).
        pairs: the :class:`PromptPairs` given, if any.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> c = resolve_contrast(model, [[1, 2, 3], [4, 5, 6]], [[1, 2, 7], [4, 5, 8]],
        ...                      lambda logits: logits[:, -1, 0])
        >>> c.n_prompts, c.direction, c.ablation, tuple(c.clean_tokens.shape)  # (batch, pos)
        (2, 'denoising', 'corrupt', (2, 3))
        >>> c.base_tokens.tolist(), c.source_tokens.tolist()  # run corrupt, put clean in
        ([[1, 2, 7], [4, 5, 8]], [[1, 2, 3], [4, 5, 6]])
    """

    clean_tokens: Int[Tensor, "batch pos"]
    clean_mask: Bool[Tensor, "batch pos"]
    corrupt_tokens: Int[Tensor, "batch pos"] | None
    corrupt_mask: Bool[Tensor, "batch pos"] | None
    metric: Any
    direction: Direction
    ablation: Ablation
    reference_tokens: Int[Tensor, "ref ref_pos"] | None
    reference_mask: Bool[Tensor, "ref ref_pos"] | None
    pairs: PromptPairs | None = None

    @property
    def n_prompts(self) -> int:
        return int(self.clean_tokens.shape[0])

    @property
    def base_tokens(self) -> Int[Tensor, "batch pos"]:
        """The prompts that run: corrupt ones when denoising, clean ones when noising."""
        if self.direction == "denoising":
            assert self.corrupt_tokens is not None
            return self.corrupt_tokens
        return self.clean_tokens

    @property
    def source_tokens(self) -> Int[Tensor, "batch pos"] | None:
        """The prompts whose values are put in: clean ones when denoising, corrupt ones for
        ``ablation="corrupt"`` when noising; None for the other ablations."""
        if self.direction == "denoising":
            return self.clean_tokens
        return self.corrupt_tokens if self.ablation == "corrupt" else None

    @property
    def method(self) -> str:
        """One word for what is done: ``"denoising"``, ``"noising"`` (with the corrupt run's
        values), or the ablation (``"mean"``, ``"zero"``, ``"resample"``) in the clean run."""
        if self.ablation == "corrupt":
            return self.direction
        return self.ablation


def resolve_contrast(
    model: Any,
    clean: Any,
    corrupt: Any = None,
    metric: Any = None,
    *,
    direction: str | None = None,
    ablation: str | None = None,
    reference: Any = None,
    ablations: Sequence[str] = ABLATIONS,
    directions: Sequence[str] = DIRECTIONS,
    aligned: bool = True,
    needs_metric: bool = True,
) -> Contrast:
    """Tokens, metric, direction, ablation and reference set from a method's arguments, all
    checked before any run (module docstring for the vocabulary).

    Args:
        model: a HookedTransformer (its tokenizer, vocabulary, context and device are used).
        clean: a :class:`PromptPairs` (then ``corrupt`` stays None and the metric defaults to
            its logit difference), or clean prompts (strings or a ``(batch, pos)`` tensor).
        corrupt: corrupt prompts, or None.
        metric: a mechkit Metric or a function ``logits -> scalar or (batch,)``.
        direction, ablation, reference: as in the module docstring; None picks the default.
        ablations, directions: the values this method supports (others are refused).
        aligned: whether ``ablation="corrupt"`` needs each corrupt prompt to have its clean
            prompt's token length (values are exchanged position for position).
        needs_metric: whether a metric is required.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> c = resolve_contrast(model, torch.tensor([[1, 2, 3]]), torch.tensor([[1, 5, 3]]),
        ...                      lambda logits: logits[:, -1, 0].mean())
        >>> c.direction, c.ablation, c.base_tokens.tolist()
        ('denoising', 'corrupt', [[1, 5, 3]])
    """
    if ablation is not None:
        check_choice("ablation", ablation, list(ablations), also="None")
    if direction is not None:
        check_choice("direction", direction, list(directions), also="None")
    ablation = ablation or "corrupt"
    if direction is None:
        direction = (
            "denoising" if ablation == "corrupt" and "denoising" in directions else "noising"
        )
    if direction == "denoising" and ablation != "corrupt":
        raise InvalidArgumentError(
            f"Expected ablation='corrupt' (or None) with direction='denoising', which puts clean "
            f"values into the corrupt run; got ablation={ablation!r}. Hint: an ablation edits the "
            "clean run: direction='noising' (or leave direction out)."
        )

    pairs: PromptPairs | None = None
    corrupt_tokens: Tensor | None = None
    corrupt_mask: Tensor | None = None
    if isinstance(clean, PromptPairs):
        if corrupt is not None:
            raise InvalidArgumentError(
                "Expected corrupt=None when clean is a PromptPairs (it holds both runs); got "
                f"{type(corrupt).__name__}."
            )
        pairs = clean
        pairs.check_fits(model)
        if ablation == "corrupt" and aligned:
            pairs.require_aligned()
        clean_tokens, clean_mask = pairs.clean_tokens, pairs.clean_mask
        corrupt_tokens, corrupt_mask = pairs.corrupt_tokens, pairs.corrupt_mask
        if metric is None and needs_metric:
            metric = LogitDiff.from_pairs(pairs)
    else:
        clean_tokens, clean_mask = token_batch(model, clean)
        if corrupt is not None:
            corrupt_tokens, corrupt_mask = token_batch(model, corrupt)
    if needs_metric and (metric is None or not callable(metric)):
        raise InvalidTypeError(
            "Expected a metric: a mechkit Metric or a function logits -> score; got "
            f"{metric!r}. Hint: mk.LogitDiff.from_pairs(pairs), or any function of the logits."
        )
    if ablation == "corrupt":
        if corrupt_tokens is None:
            raise InvalidArgumentError(
                f"Expected corrupt prompts for {direction} with the corrupt run's values; got "
                "None. Hint: pass corrupt prompts (or PromptPairs), or ablation='zero', 'mean' "
                "or 'resample' to ablate in the clean run."
            )
        if aligned and corrupt_tokens.shape != clean_tokens.shape:
            raise PromptLengthError(
                f"Expected clean and corrupt token batches of the same shape (values are "
                f"exchanged position for position); got {tuple(clean_tokens.shape)} clean and "
                f"{tuple(corrupt_tokens.shape)} corrupt. Hint: use corruptions with as many "
                "tokens as their clean prompts, or ablation='mean' or 'zero'."
            )

    ref_tokens = ref_mask = None
    if ablation in ("mean", "resample"):
        if reference is not None:
            ref_tokens, ref_mask = token_batch(model, reference)
        elif corrupt_tokens is not None:
            ref_tokens, ref_mask = corrupt_tokens, corrupt_mask
        else:
            ref_tokens, ref_mask = clean_tokens, clean_mask
    elif reference is not None:
        raise InvalidArgumentError(
            f"Expected reference=None with ablation={ablation!r}; reference prompts are read only "
            "by ablation='mean' and 'resample'."
        )

    device = model.cfg.device

    def on(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to(device)

    return Contrast(
        clean_tokens.to(device),
        clean_mask.to(device),
        on(corrupt_tokens),
        on(corrupt_mask),
        metric,
        direction,  # type: ignore[arg-type]
        ablation,  # type: ignore[arg-type]
        on(ref_tokens),
        on(ref_mask),
        pairs,
    )


def reference_mean(values: Tensor, mask: Tensor, seq: int) -> Tensor:
    """The mean of ``values`` ``(ref, ref_pos, ...)`` over the reference prompts: per position,
    ``(1, ref_pos, ...)``, when the prompts have no padding and ``seq`` positions (the patched
    prompts' length); else one mean over every real token, ``(1, 1, ...)``.

    Example:
        >>> reference_mean(torch.arange(4.0).reshape(2, 2), torch.ones(2, 2, dtype=torch.bool), 2)
        tensor([[1., 2.]])
    """
    if values.shape[:2] != mask.shape:
        raise ShapeError(
            f"Expected one mask entry per reference prompt and position, {tuple(values.shape[:2])};"
            f" got {tuple(mask.shape)}."
        )
    mask = mask.to(values.device)
    if bool(mask.all()) and values.shape[1] == seq:
        return values.mean(0, keepdim=True)
    weights = mask.to(values.dtype).reshape(*mask.shape, *([1] * (values.ndim - 2)))
    return ((values * weights).sum((0, 1)) / weights.sum())[None, None]
