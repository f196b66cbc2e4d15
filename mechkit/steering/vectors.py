"""Steering vectors: directions in the residual stream, built from contrasting prompts.

A steering vector is a residual-stream direction at one layer and site that, added during a
forward pass (see :mod:`mechkit.steering.apply`), pushes the model towards a behaviour. This
module builds them; it never changes the model. Four builders, one per paper:

- :func:`actadd_vector`, **ActAdd** (Turner et al. 2023, "Activation Addition: Steering Language
  Models Without Optimization"): one prompt pair, the per-position difference
  ``h_l(p+) - h_l(p-)`` of shape ``(pos, d_model)``. The shorter prompt is padded, as the paper
  does, by appending the tokenizer's space token ``" "`` until the lengths match. It is added
  at the first positions of the steered prompt, times a coefficient chosen when steering.
- :func:`mean_difference_vector`, **CAA** (Rimsky et al. 2024, "Steering Llama 2 via Contrastive
  Activation Addition"): the mean over many pairs of ``h(pos_i) - h(neg_i)`` at one token of
  each prompt (the answer token in the paper), a single ``(d_model,)`` direction.
- :func:`pca_vector`, **RepE** (Zou et al. 2023, "Representation Engineering: A Top-Down
  Approach to AI Transparency"): the first principal component of the centred paired
  differences, unit norm, signed to agree with the mean difference.
- :func:`probe_vector`: the weight direction of a logistic-regression probe that tells the
  positives' activations from the negatives' (the "linear probe" reading of a concept).

All four read activations through :func:`activations_at`, which right-pads prompts of different
lengths and picks each prompt's own token position from its own length.

Example:
    >>> model = mk.load_model("smollm2-135m")
    >>> vec = mean_difference_vector(model, ["I love it"], ["I hate it"], layer=6)
    >>> vec  # doctest: +ELLIPSIS
    SteeringVector(method='mean_difference', layer=6, site='resid_pre', shape=(576,), norm=...)
    >>> vec.hook_name
    'blocks.6.hook_resid_pre'
"""

from __future__ import annotations

import dataclasses
import json
import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from mechkit.atomic_io import write_atomically
from mechkit.core.batching import each_batch
from mechkit.core.labels import model_name
from mechkit.core.types import Model
from mechkit.errors import (
    EmptyDatasetError,
    FileFormatError,
    InvalidArgumentError,
    InvalidSiteError,
    InvalidTypeError,
    PromptLengthError,
    ShapeError,
    UnknownKindError,
    did_you_mean,
)
from mechkit.interventions import capture
from mechkit.reading import read_safetensors, reading
from mechkit.sites import Site, as_site
from mechkit.tokens import encode, token_batch, tokenizer_of

__all__ = [
    "SteeringVector",
    "STEERING_SITES",
    "actadd_vector",
    "mean_difference_vector",
    "pca_vector",
    "probe_vector",
    "activations_at",
]

STEERING_SITES: tuple[str, ...] = ("resid_pre", "resid_mid", "resid_post")

Position = int | Literal["mean"]


@dataclasses.dataclass(frozen=True, eq=False)
class SteeringVector:
    """A direction (or per-position block of directions) in the residual stream at one site.

    Args:
        vector: ``(d_model,)`` for a direction, or ``(pos, d_model)`` for a per-position vector
            (ActAdd). Stored detached as float32; builders return it on the CPU.
        layer: the block index (non-negative).
        site: ``"resid_pre"``, ``"resid_mid"`` or ``"resid_post"`` of that block.
        method: how it was made (``"actadd"``, ``"mean_difference"``, ``"pca"``, ``"probe"``,
            ``"custom"``, ``"sum"``...).
        metadata: JSON-serialisable facts about its making (model, prompts, position...).

    Example:
        >>> v = SteeringVector(torch.randn(576), layer=6)   # (d_model,)
        >>> (2 * v - v.unit()).hook_name, v.per_position
        ('blocks.6.hook_resid_pre', False)
    """

    vector: Float[Tensor, " d_model"] | Float[Tensor, "pos d_model"]
    layer: int
    site: str = "resid_pre"
    method: str = "custom"
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.site not in STEERING_SITES:
            raise InvalidSiteError(
                f"Expected a steering site among {', '.join(STEERING_SITES)}; got {self.site!r}. "
                "Hint: steering vectors live in the residual stream; 'resid_pre' of layer l is "
                "the usual choice."
            )
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise InvalidSiteError(
                f"Expected a non-negative int layer (a block index); got {self.layer!r}. Hint: "
                "builders accept negative layers and store them counted from the front."
            )
        if not isinstance(self.vector, Tensor):
            raise ShapeError(
                f"Expected vector to be a torch.Tensor of shape (d_model,) or (pos, d_model); got "
                f"{type(self.vector).__name__}. Hint: torch.as_tensor(values)."
            )
        if self.vector.ndim not in (1, 2) or self.vector.shape[-1] == 0:
            raise ShapeError(
                f"Expected vector of shape (d_model,) or (pos, d_model); got "
                f"{tuple(self.vector.shape)}. Hint: a batch of directions is several vectors."
            )
        object.__setattr__(self, "vector", self.vector.detach().to(torch.float32))
        object.__setattr__(self, "metadata", dict(self.metadata))

    @property
    def hook_name(self) -> str:
        """The TransformerLens hook it is added at, e.g. ``blocks.6.hook_resid_pre``."""
        return Site(self.site, layer=self.layer).hook_name  # type: ignore[arg-type]

    @property
    def per_position(self) -> bool:
        """Whether it holds one row per position (ActAdd), shape ``(pos, d_model)``."""
        return self.vector.ndim == 2

    @property
    def norm(self) -> float:
        """The L2 norm (Frobenius over all positions for a per-position vector)."""
        return float(self.vector.norm())

    def _like(self, vector: Tensor, **changes: Any) -> SteeringVector:
        return dataclasses.replace(self, vector=vector, **changes)

    def unit(self) -> SteeringVector:
        """The same vector scaled to norm 1 (over all positions for a per-position vector)."""
        norm = self.norm
        if norm == 0.0:
            raise InvalidArgumentError(
                f"Expected a non-zero vector to normalise; {self!r} is zero. Hint: check that "
                "the positive and negative prompts differ at the chosen layer and position."
            )
        return self._like(self.vector / norm)

    def _check_compatible(self, other: SteeringVector, op: str) -> None:
        if (other.layer, other.site) != (self.layer, self.site):
            raise InvalidSiteError(
                f"Expected steering vectors at the same layer and site to {op}; got "
                f"{self.site} of layer {self.layer} and {other.site} of layer {other.layer}. "
                "Hint: vectors at different layers act on different residual streams; apply "
                "them side by side instead of combining them."
            )
        if other.vector.shape[-1] != self.vector.shape[-1]:
            raise ShapeError(
                f"Expected vectors of the same d_model to {op}; got shapes "
                f"{tuple(self.vector.shape)} and {tuple(other.vector.shape)}. Hint: build both "
                "on the same model."
            )

    def _combine(self, other: Any, sign: float, op: str) -> SteeringVector:
        if not isinstance(other, SteeringVector):
            return NotImplemented
        self._check_compatible(other, op)
        a, b = self.vector, other.vector.to(self.vector.device)
        if a.ndim == 2 and b.ndim == 2 and a.shape[0] != b.shape[0]:
            width = max(a.shape[0], b.shape[0])  # pad the shorter per-position vector with zeros
            a = torch.nn.functional.pad(a, (0, 0, 0, width - a.shape[0]))
            b = torch.nn.functional.pad(b, (0, 0, 0, width - b.shape[0]))
        method = "sum" if sign > 0 else "difference"
        meta = {"operands": [self.method, other.method]}
        return self._like(a + sign * b, method=method, metadata=meta)

    def __add__(self, other: Any) -> SteeringVector:
        return self._combine(other, 1.0, "add")

    def __sub__(self, other: Any) -> SteeringVector:
        return self._combine(other, -1.0, "subtract")

    def __mul__(self, factor: Any) -> SteeringVector:
        if isinstance(factor, bool) or not isinstance(factor, numbers.Real):
            return NotImplemented
        meta = {**self.metadata, "scale": float(self.metadata.get("scale", 1.0)) * float(factor)}
        return self._like(self.vector * float(factor), metadata=meta)

    __rmul__ = __mul__

    def __truediv__(self, divisor: Any) -> SteeringVector:
        if isinstance(divisor, bool) or not isinstance(divisor, numbers.Real):
            return NotImplemented
        if divisor == 0:
            raise InvalidArgumentError(
                f"Expected a non-zero divisor for {self!r}; got 0. Hint: use .unit() to normalise."
            )
        return self * (1.0 / float(divisor))

    def __neg__(self) -> SteeringVector:
        return self * -1.0

    def project_out(self, direction: Tensor | SteeringVector) -> SteeringVector:
        """This vector minus its component along ``direction`` (at every position).

        Args:
            direction: ``(d_model,)``, or ``(pos, d_model)`` of this vector's shape to remove one
                direction per position (rows that are zero remove nothing). A SteeringVector's
                ``vector`` is used as is; its layer is not checked.

        Example:
            >>> v = SteeringVector(torch.tensor([3.0, 4.0]), layer=0)
            >>> v.project_out(torch.tensor([1.0, 0.0])).vector
            tensor([0., 4.])
        """
        label = direction.method if isinstance(direction, SteeringVector) else "tensor"
        d = (
            direction.vector
            if isinstance(direction, SteeringVector)
            else torch.as_tensor(direction)
        )
        d = d.detach().to(self.vector.device, torch.float32)
        if d.shape[-1:] != self.vector.shape[-1:] or not (
            d.ndim == 1 or (d.ndim == 2 and d.shape == self.vector.shape)
        ):
            raise ShapeError(
                f"Expected a direction of shape ({self.vector.shape[-1]},) or "
                f"{tuple(self.vector.shape)} to project out of {self!r}; got {tuple(d.shape)}."
            )
        norms = d.norm(dim=-1, keepdim=True)  # (1,) or (pos, 1)
        if d.ndim == 1 and float(norms) == 0.0:
            raise InvalidArgumentError(
                "Expected a non-zero direction to project out; got the zero vector. Hint: check "
                "how the direction was built."
            )
        unit = d / norms.clamp_min(torch.finfo(torch.float32).tiny)  # zero rows stay zero
        coeff = (self.vector * unit).sum(-1, keepdim=True)  # (1,) | (pos, 1)
        meta = {**self.metadata, "projected_out": [*self.metadata.get("projected_out", []), label]}
        return self._like(self.vector - coeff * unit, metadata=meta)

    def to(self, device: str | torch.device) -> SteeringVector:
        """The same vector on ``device``."""
        return self._like(self.vector.to(device))

    def save(self, path: str | Path) -> None:
        """Write a safetensors file (tensor ``vector``; layer, site, method, metadata as strings).

        The file is written beside its target and renamed into place, so a reader never sees
        half of one.
        """
        from safetensors.torch import save_file

        try:
            meta_json = json.dumps(self.metadata)
        except (TypeError, ValueError) as exc:
            raise InvalidTypeError(
                f"Expected JSON-serialisable metadata to save {self!r}; {exc}. Hint: store "
                "strings, numbers, lists and dicts in metadata."
            ) from None
        header = {
            "format": "mechkit.SteeringVector",
            "layer": str(self.layer),
            "site": self.site,
            "method": self.method,
            "metadata": meta_json,
        }
        tensors = {"vector": self.vector.detach().cpu().contiguous()}
        write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=header))

    @classmethod
    def load(cls, path: str | Path) -> SteeringVector:
        """Read a vector written by :meth:`save` (onto the CPU).

        Raises:
            FileFormatError: the file is damaged, truncated, another format, or not a steering
                vector (the message names the file).
        """
        what = "a steering vector (safetensors written by SteeringVector.save)"
        hint = "write it with SteeringVector.save; a damaged copy must be saved again."
        tensors, header = read_safetensors(path, what, hint)
        missing = [k for k in ("layer", "site", "method", "metadata") if k not in header]
        missing += [] if "vector" in tensors else ["tensor 'vector'"]
        if missing:
            raise FileFormatError(
                f"Expected a steering-vector file with tensor 'vector' and metadata layer, "
                f"site, method, metadata; {str(path)!r} lacks {missing}. Hint: {hint}"
            )
        try:
            with reading(path, what, hint):
                return cls(
                    tensors["vector"],
                    layer=int(header["layer"]),
                    site=header["site"],
                    method=header["method"],
                    metadata=json.loads(header["metadata"]),
                )
        except (InvalidSiteError, ShapeError) as exc:  # fields that parse but do not fit
            raise FileFormatError(f"{exc} (in {str(path)!r})") from exc

    def __repr__(self) -> str:
        return (
            f"SteeringVector(method={self.method!r}, layer={self.layer}, site={self.site!r}, "
            f"shape={tuple(self.vector.shape)}, norm={self.norm:.4g})"
        )


# ---------------------------------------------------------------------------------------------
# Checking inputs


def _resolve_site(model: Model, site: str | Site, layer: int | Site | None) -> Site:
    """The residual site of the ``layer`` and ``site`` arguments (a Site is taken for either),
    checked against ``model``; negative layers count from the end."""
    if not isinstance(site, Site) and not isinstance(layer, Site) and layer is None:
        raise InvalidSiteError(
            "Expected a layer (an int) or a Site; got layer=None. Hint: layer=6, or "
            "site=mk.Site('resid_pre', layer=6)."
        )
    if isinstance(layer, int) and not isinstance(layer, bool):
        n_layers = model.cfg.n_layers
        if not -n_layers <= layer < n_layers:
            raise InvalidSiteError(
                f"Expected a layer in [0, {n_layers}) (the model has {n_layers} layers); got "
                f"{layer}. Hint: negative layers count from the end (-1 is layer "
                f"{n_layers - 1})."
            )
    if isinstance(site, str) and site not in STEERING_SITES:
        raise InvalidSiteError(
            f"Expected a steering site among {', '.join(STEERING_SITES)}; got {site!r}. Hint: "
            "steering vectors live in the residual stream; 'resid_pre' is the usual choice."
        )
    resolved = as_site(site, layer)
    if resolved.component not in STEERING_SITES or resolved.layer is None:
        raise InvalidSiteError(
            f"Expected a residual-stream Site ({', '.join(STEERING_SITES)}) at one layer; got "
            f"{resolved!r}. Hint: steering vectors live in the residual stream."
        )
    if resolved.head is not None or resolved.position is not None or resolved.neuron is not None:
        raise InvalidSiteError(
            f"Expected a Site without head, position or neuron (a steering vector spans the "
            f"whole residual stream; the position is its own argument); got {resolved!r}."
        )
    return resolved.resolve(model)


def _block(site: Site) -> int:
    """The block of a resolved residual site (:func:`_resolve_site` refuses one without)."""
    assert site.layer is not None
    return site.layer


def _check_prompts(prompts: Any, name: str) -> list[str]:
    if isinstance(prompts, str):
        raise ShapeError(
            f"Expected {name} to be a sequence of prompt strings; got a single string "
            f"{prompts!r}. Hint: wrap it in a list: [{prompts!r}]."
        )
    prompts = list(prompts)
    if not prompts:
        raise EmptyDatasetError(
            f"Expected at least one prompt in {name}; got none. Hint: pass a non-empty list."
        )
    bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
    if bad:
        raise ShapeError(f"Expected {name} to hold strings; got items of type {sorted(set(bad))}.")
    return prompts


def _check_pairs(positives: Any, negatives: Any) -> tuple[list[str], list[str]]:
    pos, neg = _check_prompts(positives, "positives"), _check_prompts(negatives, "negatives")
    if len(pos) != len(neg):
        raise ShapeError(
            f"Expected as many negatives as positives (they are compared pair by pair); got "
            f"{len(pos)} positives and {len(neg)} negatives. Hint: pair each positive prompt "
            "with the negative prompt it contrasts with."
        )
    return pos, neg


def _check_position(position: Any) -> None:
    if position == "mean" and isinstance(position, str):
        return
    if isinstance(position, bool) or not isinstance(position, int):
        raise UnknownKindError(
            f"Expected position to be an int (an index into each prompt's real tokens; -1 is "
            f"the last) or 'mean'; got {position!r}."
            + (did_you_mean(position, ["mean"]) if isinstance(position, str) else "")
        )


# ---------------------------------------------------------------------------------------------
# Reading activations


def _forward_at(model: Model, site: Site, tokens: Tensor) -> Tensor:
    """``(batch, pos, d_model)`` activation at ``site``, running only the blocks it needs."""
    with torch.no_grad(), capture(model, site) as acts:
        model(tokens.to(model.cfg.device), stop_at_layer=_block(site) + 1)
    return acts[site]


def activations_at(
    model: Model,
    prompts: Sequence[str],
    *,
    layer: int | Site | None = None,
    site: str | Site = "resid_pre",
    position: Position = -1,
    batch_size: int | None = 16,
) -> Float[Tensor, "batch d_model"]:
    """The residual activation of each prompt at one token, as a float32 CPU tensor.

    Prompts are tokenized with the model's default BOS handling and right-padded in batches;
    each prompt's position is read from its own length, so padding never changes the result.
    Only the blocks up to ``layer`` run, without gradients, and no hook is left on the model.

    Args:
        model: the HookedTransformer.
        prompts: the texts.
        layer: the block index (negative counts from the end), or a :class:`~mechkit.Site`.
        site: ``"resid_pre"``, ``"resid_mid"`` or ``"resid_post"``, or a
            :class:`~mechkit.Site` such as ``Site("resid_pre", layer=6)`` (then no ``layer``).
        position: an index into each prompt's real tokens (``-1``, the default, is its last
            token; ``0`` its first), or ``"mean"`` for the mean over its real tokens.
        batch_size: prompts per forward pass (None: all in one; a pass that runs out of
            memory is split in halves).

    Returns:
        ``(batch, d_model)``, one row per prompt.

    Example:
        >>> model = mk.load_model("smollm2-135m")
        >>> activations_at(model, ["I love it", "It is awful"], layer=6).shape
        torch.Size([2, 576])
        >>> site = mk.Site("resid_post", layer=5)          # or a Site for layer and site
        >>> activations_at(model, ["I love it"], site=site).shape
        torch.Size([1, 576])
    """
    prompts = _check_prompts(prompts, "prompts")
    resolved = _resolve_site(model, site, layer)
    _check_position(position)
    rows: list[Tensor] = []

    def read(chunk_rows: slice) -> None:
        chunk = prompts[chunk_rows]
        tokens, mask = token_batch(model, chunk)  # (batch, pos) each, right-padded
        acts = _forward_at(model, resolved, tokens).float().cpu()  # (batch, pos, d_model)
        lengths = mask.sum(-1).tolist()
        out = []
        for i, (prompt, n) in enumerate(zip(chunk, lengths, strict=True)):
            if position == "mean":
                out.append(acts[i, :n].mean(0))
                continue
            index = n + position if position < 0 else position
            if not 0 <= index < n:
                raise PromptLengthError(
                    f"Expected position {position} to fall inside every prompt; {prompt!r} has "
                    f"{n} tokens. Hint: use a position in [{-n}, {n}), or 'mean'."
                )
            out.append(acts[i, index])
        rows.extend(out)  # only once the whole chunk fitted (each_batch retries in halves)

    each_batch(len(prompts), batch_size, read)
    return torch.stack(rows)  # (batch, d_model)


def _paired_differences(
    model: Model,
    positives: Sequence[str],
    negatives: Sequence[str],
    *,
    site: Site,
    position: Position,
    batch_size: int | None,
) -> Float[Tensor, "batch d_model"]:
    pos = activations_at(model, positives, site=site, position=position, batch_size=batch_size)
    neg = activations_at(model, negatives, site=site, position=position, batch_size=batch_size)
    return pos - neg  # (batch, d_model)


def _pair_metadata(model: Model, positives: list[str], negatives: list[str], position: Any) -> dict:
    return {
        "model": model_name(model),
        "positives": positives,
        "negatives": negatives,
        "position": position,
        "n_pairs": len(positives),
    }


# ---------------------------------------------------------------------------------------------
# The builders


def actadd_vector(
    model: Model,
    positive: str,
    negative: str,
    *,
    layer: int | Site | None = None,
    site: str | Site = "resid_pre",
    prepend_bos: bool | None = None,
) -> SteeringVector:
    """ActAdd (Turner et al. 2023): the per-position difference ``h(positive) - h(negative)``.

    Both prompts are tokenized (with BOS when ``prepend_bos``; None follows the model's
    default). As in the paper, the shorter one is then padded by **appending the tokenizer's
    space token** (the token of ``" "``) at its end until both have the same length; the two
    are run as one batch and their activations subtracted position by position. The
    coefficient is applied when steering, not here.

    Args:
        model: the HookedTransformer.
        positive: the prompt to steer towards, e.g. ``"Love"``.
        negative: the prompt to steer away from, e.g. ``"Hate"``.
        layer: the block index (negative counts from the end), or a :class:`~mechkit.Site`.
        site: ``"resid_pre"`` (the paper's choice), ``"resid_mid"`` or ``"resid_post"``, or a
            :class:`~mechkit.Site` such as ``Site("resid_pre", layer=6)`` (then no ``layer``).
        prepend_bos: whether to put BOS in front; None uses the model's default.

    Returns:
        A vector of shape ``(pos, d_model)`` with ``pos`` the longer prompt's token length;
        ``metadata`` holds both prompts and their padded token lists.

    Example:
        >>> model = mk.load_model("smollm2-135m")
        >>> v = actadd_vector(model, "Love", "Hate", layer=6)
        >>> v.vector.shape, v.per_position
        (torch.Size([2, 576]), True)
    """
    for name, text in (("positive", positive), ("negative", negative)):
        if not isinstance(text, str):
            raise ShapeError(
                f"Expected {name} to be one prompt string; got {type(text).__name__}. Hint: "
                "ActAdd uses one pair; mean_difference_vector averages over many."
            )
    resolved = _resolve_site(model, site, layer)
    if prepend_bos is None:
        prepend_bos = bool(model.cfg.default_prepend_bos)
    space = tokenizer_of(model).encode(" ", add_special_tokens=False)
    if len(space) != 1:
        raise ShapeError(
            f"Expected the tokenizer to have a single token for ' ' (ActAdd pads with it); got "
            f"{len(space)} tokens {space}. Hint: pad the prompts by hand to equal length."
        )
    rows = [encode(model, positive, prepend_bos), encode(model, negative, prepend_bos)]
    if not all(rows):
        raise ShapeError(
            "Expected both prompts to have at least one token; got an empty one. Hint: pass "
            "non-empty text or prepend_bos=True."
        )
    width = max(len(r) for r in rows)
    rows = [r + space * (width - len(r)) for r in rows]  # append spaces at the end
    tokens = torch.tensor(rows, dtype=torch.long)  # (2, pos)
    acts = _forward_at(model, resolved, tokens).float().cpu()  # (2, pos, d_model)
    metadata = {
        "model": model_name(model),
        "positive": positive,
        "negative": negative,
        "positive_tokens": rows[0],
        "negative_tokens": rows[1],
        "pad_token_id": space[0],
        "prepend_bos": prepend_bos,
    }
    return SteeringVector(
        acts[0] - acts[1],  # (pos, d_model)
        layer=_block(resolved),
        site=resolved.component,
        method="actadd",
        metadata=metadata,
    )


def mean_difference_vector(
    model: Model,
    positives: Sequence[str],
    negatives: Sequence[str],
    *,
    layer: int | Site | None = None,
    site: str | Site = "resid_pre",
    position: Position = -1,
    batch_size: int | None = 16,
) -> SteeringVector:
    """CAA (Rimsky et al. 2024): the mean over pairs of ``h(positive_i) - h(negative_i)``.

    Each prompt's activation is read at its own ``position`` (see :func:`activations_at`), so
    the two prompts of a pair may have different lengths. Rimsky et al. end each prompt with the
    A/B answer letter and read the last token; do the same with ``position=-1``.

    Args:
        model: the HookedTransformer.
        positives: prompts showing the behaviour.
        negatives: the matching prompts without it, one per positive.
        layer: the block index (negative counts from the end), or a :class:`~mechkit.Site`.
        site: ``"resid_pre"``, ``"resid_mid"`` or ``"resid_post"``, or a
            :class:`~mechkit.Site` such as ``Site("resid_pre", layer=6)`` (then no ``layer``).
        position: an index into each prompt's real tokens (-1: the last) or ``"mean"``.
        batch_size: prompts per forward pass (None: all in one; a pass that runs out of
            memory is split in halves).

    Returns:
        A ``(d_model,)`` vector, not normalised (its norm is the size of the mean difference).

    Example:
        >>> model = mk.load_model("smollm2-135m")
        >>> v = mean_difference_vector(model, ["Answer: (A"], ["Answer: (B"], layer=13)
        >>> v.vector.shape
        torch.Size([576])
    """
    pos, neg = _check_pairs(positives, negatives)
    resolved = _resolve_site(model, site, layer)
    diffs = _paired_differences(
        model, pos, neg, site=resolved, position=position, batch_size=batch_size
    )  # (batch, d_model)
    return SteeringVector(
        diffs.mean(0),
        layer=_block(resolved),
        site=resolved.component,
        method="mean_difference",
        metadata=_pair_metadata(model, pos, neg, position),
    )


def pca_vector(
    model: Model,
    positives: Sequence[str],
    negatives: Sequence[str],
    *,
    layer: int | Site | None = None,
    site: str | Site = "resid_pre",
    position: Position = -1,
    batch_size: int | None = 16,
) -> SteeringVector:
    """RepE (Zou et al. 2023): the first principal component of the paired differences.

    The differences ``h(positive_i) - h(negative_i)`` are centred (their mean subtracted) and the
    top right-singular vector of the result is taken: the direction along which the pairs'
    differences vary most. Its sign is chosen so that it points along the mean difference.

    Args:
        model: the HookedTransformer.
        positives: prompts showing the behaviour.
        negatives: the matching prompts without it, one per positive (at least two pairs).
        layer: the block index (negative counts from the end), or a :class:`~mechkit.Site`.
        site: ``"resid_pre"``, ``"resid_mid"`` or ``"resid_post"``, or a
            :class:`~mechkit.Site` such as ``Site("resid_pre", layer=6)`` (then no ``layer``).
        position: an index into each prompt's real tokens (-1: the last) or ``"mean"``.
        batch_size: prompts per forward pass (None: all in one; a pass that runs out of
            memory is split in halves).

    Returns:
        A unit-norm ``(d_model,)`` vector; ``metadata["explained_variance_ratio"]`` is the share
        of the centred differences' variance along it.

    Example:
        >>> model = mk.load_model("smollm2-135m")
        >>> happy = ["I am so happy", "What a lovely day", "This is wonderful"]
        >>> sad = ["I am so sad", "What an awful day", "This is terrible"]
        >>> v = pca_vector(model, happy, sad, layer=10)
        >>> round(v.norm, 4), round(v.metadata["explained_variance_ratio"], 2)
        (1.0, 0.65)
    """
    pos, neg = _check_pairs(positives, negatives)
    if len(pos) < 2:
        raise EmptyDatasetError(
            f"Expected at least 2 pairs for PCA (one centred difference is zero); got "
            f"{len(pos)}. Hint: add pairs, or use mean_difference_vector."
        )
    resolved = _resolve_site(model, site, layer)
    diffs = _paired_differences(
        model, pos, neg, site=resolved, position=position, batch_size=batch_size
    ).double()  # (batch, d_model)
    mean = diffs.mean(0)
    centred = diffs - mean
    _, singular, vh = torch.linalg.svd(centred, full_matrices=False)  # vh: (k, d_model)
    total = float(singular.pow(2).sum())
    if total == 0.0:
        raise InvalidArgumentError(
            "Expected the paired differences to vary; all are identical, so they have no "
            "principal component. Hint: use mean_difference_vector."
        )
    direction = vh[0]
    if float(direction @ mean) < 0:
        direction = -direction
    metadata = _pair_metadata(model, pos, neg, position)
    metadata["explained_variance_ratio"] = float(singular[0] ** 2) / total
    return SteeringVector(
        direction.float(),
        layer=_block(resolved),
        site=resolved.component,
        method="pca",
        metadata=metadata,
    )


def probe_vector(
    model: Model,
    positives: Sequence[str],
    negatives: Sequence[str],
    *,
    layer: int | Site | None = None,
    site: str | Site = "resid_pre",
    position: Position = -1,
    l2: float = 1e-3,
    steps: int = 500,
    seed: int = 0,
    batch_size: int | None = 16,
) -> SteeringVector:
    """The weight direction of a logistic-regression probe, positives (1) against negatives (0).

    The probe is fitted on **standardized** features (each residual coordinate shifted by its
    mean and divided by its standard deviation over all prompts; residual coordinates differ in
    scale by orders of magnitude, which would let a few dominate). It minimises the mean binary
    cross-entropy plus ``l2 * ||w||^2`` with full-batch L-BFGS in float64, from a small random
    start drawn with ``seed``, so the result is deterministic. The weight is mapped back to the
    residual basis (``w / std``, the gradient of the logit with respect to the activation) and
    scaled to unit norm; it points towards the positives, which the probe scores higher.

    Positives and negatives need not be paired, so their counts may differ.

    Args:
        model: the HookedTransformer.
        positives: prompts of the class to steer towards (label 1).
        negatives: prompts of the other class (label 0).
        layer: the block index (negative counts from the end), or a :class:`~mechkit.Site`.
        site: ``"resid_pre"``, ``"resid_mid"`` or ``"resid_post"``, or a
            :class:`~mechkit.Site` such as ``Site("resid_pre", layer=6)`` (then no ``layer``).
        position: an index into each prompt's real tokens (-1: the last) or ``"mean"``.
        l2: the weight of the L2 penalty on the standardized weights.
        steps: the most L-BFGS iterations.
        seed: seeds the initial weights.
        batch_size: prompts per forward pass (None: all in one; a pass that runs out of
            memory is split in halves).

    Returns:
        A unit-norm ``(d_model,)`` vector; ``metadata["train_accuracy"]`` is the probe's
        accuracy on the prompts it was fitted on.

    Example:
        >>> model = mk.load_model("smollm2-135m")
        >>> happy = ["I am so happy", "What a lovely day", "This is wonderful"]
        >>> sad = ["I am so sad", "What an awful day", "This is terrible"]
        >>> v = probe_vector(model, happy, sad, layer=10, steps=50)
        >>> v.metadata["train_accuracy"], round(v.norm, 4)
        (1.0, 1.0)
    """
    pos = _check_prompts(positives, "positives")
    neg = _check_prompts(negatives, "negatives")
    resolved = _resolve_site(model, site, layer)
    if not (isinstance(steps, int) and steps >= 1) or not l2 >= 0:
        raise ShapeError(f"Expected steps >= 1 and l2 >= 0; got steps={steps!r}, l2={l2!r}.")
    x = torch.cat(
        [
            activations_at(model, pos, site=resolved, position=position, batch_size=batch_size),
            activations_at(model, neg, site=resolved, position=position, batch_size=batch_size),
        ]
    ).double()  # (batch, d_model)
    y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).double()  # (batch,)
    mu = x.mean(0)
    sigma = x.std(0, unbiased=False)
    sigma = torch.where(sigma > 0, sigma, torch.ones_like(sigma))  # constant coordinates
    z = (x - mu) / sigma  # (batch, d_model)

    generator = torch.Generator().manual_seed(seed)
    w = (0.01 * torch.randn(z.shape[1], generator=generator, dtype=torch.float64)).requires_grad_()
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=steps, tolerance_grad=1e-10, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        logits = z @ w + b
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
        loss = loss + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    w, b = w.detach(), b.detach()
    accuracy = float(((z @ w + b > 0).double() == y).double().mean())
    direction = w / sigma  # the logit's gradient in the residual basis
    if float(direction.norm()) == 0.0:
        raise InvalidArgumentError(
            "Expected the probe to learn a non-zero weight; got zero. Hint: lower l2, or check "
            "that the positives and negatives differ at this layer and position."
        )
    metadata = {
        "model": model_name(model),
        "positives": pos,
        "negatives": neg,
        "position": position,
        "train_accuracy": accuracy,
        "l2": float(l2),
        "steps": steps,
        "seed": seed,
        "standardized": True,
    }
    return SteeringVector(
        (direction / direction.norm()).float(),
        layer=_block(resolved),
        site=resolved.component,
        method="probe",
        metadata=metadata,
    )
