"""Applying steering vectors: scoped hooks for forward passes and for generation.

Activation addition (Turner et al. 2023) adds ``coefficient * vector`` to the residual stream at
one layer. Where it is added matters as much as what is added, so each :class:`Steering` names
its positions: every position, only the prompt's, only the generated tokens', or given positions
counted from each prompt's first real token. A per-position vector (ActAdd) is added at the
prompt's first positions, one row of the vector per token.

Prompts of different lengths are **left-padded** for generation, so that every prompt ends at
the same column and generated tokens share columns; the hooks shift each row's positions by its
padding, and the attention mask keeps padding out of attention and out of rotary positions.
Everything runs inside :func:`mechkit.hook_scope.hook_scope`: leaving the block, also by an
exception or a Ctrl-C, removes every hook.

Directional ablation (Arditi et al. 2024) projects a direction out of the residual stream at
every layer and position: :func:`ablate_direction`.

Example:
    >>> model = mk.load_model("smollm2-135m")
    >>> vec = mk.steering.mean_difference_vector(model, ["I love it"], ["I hate it"], layer=6)
    >>> out = mk.generate(model, ["I think the movie was"], steering=mk.steering.Steering(vec, 6.0),
    ...                   max_new_tokens=4, temperature=0)
    >>> out.tokens.shape        # (batch, new tokens); out.texts holds the decoded text
    torch.Size([1, 4])
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

from mechkit.errors import (
    ContextLengthError,
    EmptyDatasetError,
    InvalidArgumentError,
    InvalidSiteError,
    InvalidTypeError,
    NonFiniteError,
    ShapeError,
    check_choice,
    check_positive_int,
)
from mechkit.hook_scope import hook_scope
from mechkit.lens.logit_lens import decode_residual
from mechkit.sites import Site
from mechkit.steering.vectors import STEERING_SITES, SteeringVector
from mechkit.tokens import encode, tokenizer_of

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = ["Steering", "steer", "ablate_direction", "generate", "Generations"]

Positions = Literal["all", "prompt", "generated"] | tuple[int, ...]


@dataclasses.dataclass(frozen=True, eq=False)
class Steering:
    """A vector, its coefficient, and where it is added.

    Args:
        vector: the :class:`SteeringVector` (its layer and site say where in the model).
        coefficient: the multiplier (ActAdd's ``c``).
        positions: ``"all"``; ``"prompt"`` (the prompt's tokens only); ``"generated"`` (only
            tokens produced by :func:`generate`); or a tuple of positions counted from each
            prompt's first real token. A per-position vector is always added at the prompt's
            first ``len(vector)`` positions.

    Example:
        >>> vec = mk.SteeringVector(torch.ones(64), layer=1)
        >>> mk.steering.Steering(vec, 4.0, positions="prompt").positions
        'prompt'
    """

    vector: SteeringVector
    coefficient: float = 1.0
    positions: Positions = "all"

    def __post_init__(self) -> None:
        if not isinstance(self.vector, SteeringVector):
            raise InvalidTypeError(
                f"Expected a SteeringVector; got {type(self.vector).__name__}. Hint: build one "
                "with mk.steering.actadd_vector, mean_difference_vector, pca_vector or "
                "probe_vector."
            )
        if isinstance(self.positions, list):
            object.__setattr__(self, "positions", tuple(self.positions))
        if isinstance(self.positions, str):
            check_choice(
                "positions", self.positions, ["all", "prompt", "generated"], also="a tuple of ints"
            )
        if self.vector.per_position and self.positions not in ("all", "prompt"):
            raise InvalidArgumentError(
                "Expected positions='prompt' for a per-position (ActAdd) vector: its rows go to "
                f"the prompt's first tokens; got {self.positions!r}."
            )


@dataclasses.dataclass
class _Layout:
    """Where each row's prompt starts (left padding) and where generated tokens begin."""

    prompt_start: Tensor | None = None  # (batch,) first real column of each row
    generated_from: int | None = None  # first generated column (None: no generated tokens)
    offset: int = 0  # the column of the first position in this forward pass (key/value cache)


def _at_site(item: Any, site: Site) -> Any:
    """A plain tensor as a SteeringVector at ``site`` (other items as they are)."""
    if not isinstance(item, Tensor):
        return item
    if site.component not in STEERING_SITES or site.layer is None:
        raise InvalidSiteError(
            f"Expected a residual-stream Site ({', '.join(STEERING_SITES)}) at one layer to "
            f"steer at; got {site!r}."
        )
    return SteeringVector(item, layer=site.layer, site=site.component, method="custom")


def _as_steerings(items: Sequence[Any], coefficient: float, positions: Positions) -> list[Steering]:
    out = []
    for item in items:
        if isinstance(item, Steering):
            out.append(item)
        elif isinstance(item, SteeringVector):
            out.append(Steering(item, coefficient, positions))
        else:
            raise InvalidTypeError(
                f"Expected SteeringVector or Steering objects; got {type(item).__name__}."
            )
    return out


def _mask(steering: Steering, layout: _Layout, batch: int, seq: int, device: Any) -> Tensor:
    """``(batch, seq)`` where the (non-per-position) vector is added."""
    columns = layout.offset + torch.arange(seq, device=device)[None, :].expand(batch, seq)
    start = (
        torch.zeros(batch, dtype=torch.long, device=device)
        if layout.prompt_start is None
        else layout.prompt_start.to(device)
    )[:, None]
    end = layout.offset + seq if layout.generated_from is None else layout.generated_from
    real = columns >= start
    if steering.positions == "all":
        return real
    if steering.positions == "prompt":
        return real & (columns < end)
    if steering.positions == "generated":
        return columns >= end
    relative = columns - start
    wanted = torch.zeros_like(real)
    for p in steering.positions:
        wanted |= relative == p
    return wanted & real


def _hook(steering: Steering, layout: _Layout) -> Any:
    vec = steering.vector

    def add(act: Tensor, hook: Any) -> Tensor:
        batch, seq = act.shape[:2]
        v = vec.vector.to(act.device, act.dtype)
        if v.shape[-1] != act.shape[-1]:
            raise ShapeError(
                f"Steering vector of width {v.shape[-1]} at {hook.name}, whose activations have "
                f"width {act.shape[-1]}. Hint: build the vector on this model."
            )
        if vec.per_position:
            # row k of the vector goes to each prompt's k-th real token
            start = (
                torch.zeros(batch, dtype=torch.long, device=act.device)
                if layout.prompt_start is None
                else layout.prompt_start.to(act.device)
            )
            k = v.shape[0]
            # (batch, k) columns of this pass holding each prompt's first k tokens
            cols = start[:, None] + torch.arange(k, device=act.device)[None, :] - layout.offset
            keep = (cols >= 0) & (cols < seq)
            cols = cols.clamp(0, seq - 1)
            rows = torch.arange(batch, device=act.device)[:, None].expand_as(cols)
            out = act.clone()
            out[rows[keep], cols[keep]] += steering.coefficient * v.expand(batch, k, -1)[keep]
            return out
        where = _mask(steering, layout, batch, seq, act.device)
        return act + steering.coefficient * where[..., None].to(act.dtype) * v

    return add


@contextlib.contextmanager
def _steered(
    model: HookedTransformer, steerings: list[Steering], layout: _Layout
) -> Iterator[None]:
    for s in steerings:
        if not 0 <= s.vector.layer < model.cfg.n_layers:
            raise InvalidSiteError(
                f"Expected a steering layer in [0, {model.cfg.n_layers}); got {s.vector.layer}."
            )
        if s.vector.hook_name not in model.hook_dict:
            raise InvalidSiteError(
                f"Expected a residual site the model has; {s.vector.hook_name!r} is missing."
            )
        if s.vector.vector.shape[-1] != model.cfg.d_model:
            raise ShapeError(
                f"Expected a steering vector of width d_model={model.cfg.d_model}; got "
                f"{tuple(s.vector.vector.shape)}. Hint: build the vector on this model."
            )
    hooks = [(s.vector.hook_name, _hook(s, layout)) for s in steerings]
    with hook_scope(model, fwd_hooks=hooks):
        yield


@contextlib.contextmanager
def steer(
    model: HookedTransformer,
    *vectors: SteeringVector | Steering | Float[Tensor, " d_model"],
    coefficient: float = 1.0,
    positions: Positions = "all",
    site: Site | None = None,
) -> Iterator[Any]:
    """Add steering vectors in every forward pass inside the ``with`` block.

    Bare vectors get ``coefficient`` and ``positions``; :class:`Steering` objects carry their
    own. A plain ``(d_model,)`` tensor is added at ``site``, a residual :class:`Site`
    (``Site("resid_pre", layer=6)``). In plain forward passes every position is a prompt
    position (``"generated"`` adds nothing); use :func:`generate` for generation.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> vec = mk.SteeringVector(torch.ones(model.cfg.d_model), layer=1)
        >>> tokens = torch.tensor([[1, 2, 3]])
        >>> with mk.steer(model, vec, coefficient=4.0):
        ...     steered = model(tokens)   # (batch, pos, d_vocab)
        >>> bool((steered != model(tokens)).any())   # and no hook is left afterwards
        True
        >>> site = mk.Site("resid_pre", layer=1)
        >>> with mk.steer(model, torch.ones(128), coefficient=4.0, site=site):
        ...     same = model(tokens)                   # a plain tensor placed by a Site
        >>> torch.equal(same, steered)
        True
    """
    if site is not None:
        resolved = site.resolve(model)  # negative layers counted from the end
        vectors = tuple(_at_site(v, resolved) for v in vectors)
    steerings = _as_steerings(vectors, coefficient, positions)
    with _steered(model, steerings, _Layout()):
        yield model


@contextlib.contextmanager
def ablate_direction(
    model: HookedTransformer,
    direction: Tensor | SteeringVector,
    *,
    layers: int | Site | Sequence[int | Site] | None = None,
) -> Iterator[Any]:
    """Project ``direction`` out of the residual stream at every layer and position.

    At each layer given as an int (all layers when None; negative ones count from the end) the
    direction's component is removed from ``resid_pre``, ``resid_mid`` and ``resid_post`` (so
    neither attention nor the MLP can write it back before the next read), as in
    refusal-direction work (Arditi et al. 2024). A :class:`~mechkit.Site` such as
    ``mk.Site("resid_post", layer=1)`` names one residual site instead, as the other steering
    functions take one; ints and Sites mix.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> d = torch.zeros(model.cfg.d_model); d[0] = 1.0
        >>> _, cache = model.run_with_cache(torch.tensor([[1, 2, 3]]))
        >>> with mk.steering.ablate_direction(model, d):
        ...     _, ablated = model.run_with_cache(torch.tensor([[1, 2, 3]]))
        >>> float(ablated["blocks.1.hook_resid_pre"][..., 0].abs().max())
        0.0
        >>> with mk.steering.ablate_direction(model, d, layers=[mk.Site("resid_post", layer=1)]):
        ...     _, only_last = model.run_with_cache(torch.tensor([[1, 2, 3]]))
        >>> [float(only_last[f"blocks.1.hook_resid_{s}"][..., 0].abs().max()) > 0
        ...  for s in ("pre", "post")]
        [True, False]
    """
    d = direction.vector if isinstance(direction, SteeringVector) else torch.as_tensor(direction)
    if d.ndim != 1 or d.shape[0] != model.cfg.d_model:
        raise ShapeError(
            f"Expected a direction of shape ({model.cfg.d_model},); got {tuple(d.shape)}."
        )
    if float(d.norm()) == 0:
        raise InvalidArgumentError("Expected a non-zero direction to ablate; got the zero vector.")
    unit = d.float() / d.float().norm()
    names = _residual_hooks(model, layers)

    def project(act: Tensor, hook: Any) -> Tensor:
        u = unit.to(act.device, act.dtype)
        return act - (act @ u)[..., None] * u

    with hook_scope(model, fwd_hooks=[(n, project) for n in names]):
        yield model


def _residual_hooks(model: HookedTransformer, layers: Any) -> list[str]:
    """The residual hook names that ``layers`` of :func:`ablate_direction` names, checked: an
    int is every residual site of that layer the model has, a Site is that one site."""
    n_layers = model.cfg.n_layers
    if layers is None:
        layers = range(n_layers)
    elif isinstance(layers, int | Site):
        layers = [layers]
    names: list[str] = []
    for item in layers:
        if isinstance(item, Site):
            if (
                item.component not in STEERING_SITES
                or item.layer is None
                or any(v is not None for v in (item.head, item.position, item.neuron))
            ):
                raise InvalidSiteError(
                    f"Expected a residual-stream Site ({', '.join(STEERING_SITES)}) at one layer, "
                    f"without head, position or neuron; got {item!r}. Hint: a direction is "
                    "ablated at every position of the whole residual stream."
                )
            names.append(item.resolve(model).hook_name)
        elif isinstance(item, int) and not isinstance(item, bool):
            layer = Site("resid_pre", layer=item).resolve(model).layer  # checks the range
            names += [f"blocks.{layer}.hook_{c}" for c in STEERING_SITES]
            names = [n for n in names if n in model.hook_dict]  # attention-only: no resid_mid
        else:
            raise InvalidTypeError(
                f"Expected layers as ints or mechkit Sites (or None for all); got {item!r}."
            )
    return list(dict.fromkeys(names))


# ----------------------------------------------------------------------------------- generation


@dataclasses.dataclass(frozen=True)
class Generations:
    """Texts generated from prompts: ``texts[i]`` continues ``prompts[i]``.

    Example:
        >>> out = Generations(("Hi",), (" there",), torch.tensor([[1, 2]]))
        >>> out.to_dataframe().to_dict("records")
        [{'prompt': 'Hi', 'completion': ' there'}]
    """

    prompts: tuple[str, ...]
    texts: tuple[str, ...]
    tokens: Int[Tensor, "batch new"]
    label: str = ""

    def to_dataframe(self) -> Any:
        import pandas as pd

        return pd.DataFrame({"prompt": self.prompts, "completion": self.texts})


@torch.no_grad()
def generate(
    model: HookedTransformer,
    prompts: str | Sequence[str],
    *,
    steering: Steering | SteeringVector | Sequence[Steering | SteeringVector] = (),
    max_new_tokens: int = 20,
    temperature: float = 1.0,
    top_k: int | None = 50,
    seed: int = 0,
    prepend_bos: bool | None = None,
    label: str = "",
) -> Generations:
    """Sample continuations of ``prompts``, steered, in one left-padded batch.

    Args:
        steering: vectors (coefficient 1, all positions) or :class:`Steering` objects.
        temperature: 0 means greedy decoding.
        top_k: sample among the ``top_k`` most likely tokens (None: all).
        seed: the sampling generator's seed: the same seed gives the same texts.

    Steps after the first feed one token each, with TransformerLens's key/value cache; the
    hooks know each pass's first column, so positions stay exact.

    Raises:
        InvalidArgumentError: ``max_new_tokens`` not a positive integer, ``temperature``
            negative or not finite, ``top_k`` not a positive integer (or None).
        ContextLengthError: the longest prompt plus ``max_new_tokens`` exceeds ``n_ctx``.
        NonFiniteError: the (steered) logits stop being finite, usually a steering
            coefficient far too large; no token is chosen from them.

    Example:
        >>> model = mk.load_model("smollm2-135m")
        >>> out = mk.generate(model, ["The capital of France is", "One, two,"], max_new_tokens=4,
        ...                   temperature=0)  # greedy; the module docstring steers
        >>> out.texts
        (' Paris.\\n\\n', ' or three-digit')
        >>> out.tokens.shape  # (batch, new token)
        torch.Size([2, 4])
    """
    prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompt_list:
        raise EmptyDatasetError("Expected at least one prompt to generate from; got none.")
    check_positive_int("max_new_tokens", max_new_tokens)
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, int | float)
        or not 0 <= temperature < float("inf")
    ):
        raise InvalidArgumentError(
            f"Expected temperature to be a finite number >= 0 (0: greedy decoding); got "
            f"{temperature!r}."
        )
    if top_k is not None:
        check_positive_int("top_k", top_k)
    items = [steering] if isinstance(steering, Steering | SteeringVector) else list(steering)
    steerings = _as_steerings(items, 1.0, "all")
    tokenizer = tokenizer_of(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = [encode(model, p, prepend_bos) for p in prompt_list]
    if any(len(r) == 0 for r in rows):
        raise InvalidArgumentError("Expected non-empty prompts; one encodes to no tokens.")
    width = max(len(r) for r in rows)
    n_ctx = int(model.cfg.n_ctx)
    if width + max_new_tokens > n_ctx:
        raise ContextLengthError(
            f"Expected the longest prompt plus max_new_tokens to fit the model's context "
            f"n_ctx={n_ctx}; got {width} + {max_new_tokens} = {width + max_new_tokens} tokens. "
            f"Hint: generate fewer new tokens (max_new_tokens <= {max(0, n_ctx - width)}) or "
            "shorten the prompt."
        )
    device = model.cfg.device
    tokens = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    tokens, mask = tokens.to(device), mask.to(device)
    layout = _Layout(prompt_start=(width - mask.sum(-1)), generated_from=width)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    cache = TransformerLensKeyValueCache.init_cache(model.cfg, device, len(rows))
    step_input, step_mask = tokens, mask
    with _steered(model, steerings, layout):
        for step in range(max_new_tokens):
            resid = model(
                step_input,
                attention_mask=step_mask,
                past_kv_cache=cache,
                stop_at_layer=model.cfg.n_layers,  # all blocks; the head below, last column only
            )
            logits = decode_residual(model, resid[:, -1]).float().cpu()
            if not bool(torch.isfinite(logits).all()):
                rows_bad = (~torch.isfinite(logits).all(-1)).nonzero()[:, 0].tolist()
                raise NonFiniteError(
                    f"Expected finite logits at every generation step; at step {step} (new token "
                    f"{step + 1} of {max_new_tokens}) the logits of prompt(s) {rows_bad} hold inf "
                    "or NaN, so no token can be chosen. Hint: the steering coefficient is far "
                    "too large (try one of the order of the residual norm, e.g. 1 to 20)."
                )
            layout.offset += step_input.shape[1]
            if temperature == 0:
                next_token = logits.argmax(-1)
            else:
                scaled = logits / temperature
                if top_k is not None:
                    kth = scaled.topk(min(top_k, scaled.shape[-1]), dim=-1).values[:, -1:]
                    scaled = scaled.masked_fill(scaled < kth, float("-inf"))
                next_token = torch.multinomial(scaled.softmax(-1), 1, generator=generator)[:, 0]
            step_input = next_token[:, None].to(device)
            step_mask = torch.ones_like(step_input)
            tokens = torch.cat([tokens, step_input], dim=1)
    new = tokens[:, width:].cpu()
    texts = tuple(tokenizer.decode(row.tolist(), skip_special_tokens=True) for row in new)
    return Generations(tuple(prompt_list), texts, new, label)
