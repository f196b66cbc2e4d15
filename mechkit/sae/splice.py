"""Splicing sparse dictionaries into a model, with the reconstruction error as its own term.

Inside :func:`splice`, the activation an SAE (or transcoder) reads is replaced by

    x_hat(f) + error,        f = encode(x),  error = x - x_hat(f)   (transcoder: y - x_hat(f))

so the model computes exactly what it computed before (up to float rounding), while the latents
``f`` and the error term are separate, addressable pieces (Marks et al. 2024, "Sparse feature
circuits", keep the error as a node of the graph for the same reason). The error is always
computed from the **un-intervened** reconstruction: editing latents changes the activation by
exactly ``decode(f_edited) - decode(f)``, and editing the error changes it by the error's edit.
With ``keep_error=False`` the error term is dropped and the model runs on the reconstruction
itself (what "CE loss recovered" measures).

A transcoder reads its input at ``cfg.hook_name`` (e.g. ``blocks.5.ln2.hook_normalized``) and
replaces the activation at ``cfg.out_hook_name`` (``blocks.5.hook_mlp_out``); its error is
``y - x_hat`` there.

    >>> from mechkit.sae import SAEConfig, SparseDictionary
    >>> model = mk.load_model("attn-only-2l")
    >>> sae = SparseDictionary.from_config(SAEConfig(
    ...     architecture="relu", d_in=128, d_sae=64, hook_name="blocks.0.hook_resid_post"))
    >>> tokens = torch.randint(1, 500, (8, 16), generator=torch.Generator().manual_seed(0))
    >>> with mk.splice(model, sae) as spliced:              # logits unchanged (to ~1e-5)
    ...     logits = model(tokens)
    ...     spliced.latents[sae.cfg.hook_name].shape       # (batch, pos, d_sae)
    torch.Size([8, 16, 64])
    >>> bool((logits - model(tokens)).abs().max() < 1e-4)
    True
    >>> with mk.splice(model, sae) as spliced:
    ...     spliced.zero([12], positions=[-1])             # ablate latent 12 at the last token
    ...     ablated = model(tokens)

:func:`patch_latents` is activation patching over latents: each latent's corrupt activation is
replaced by its clean one, many latents per batched forward (mechkit's patching engine), and
the metric is scored per latent.

Any object with ``cfg.hook_name``, ``cfg.d_in``, ``cfg.d_sae`` (and for transcoders
``cfg.out_hook_name``, ``cfg.d_out``), ``W_dec``, ``encode``, ``decode`` and ``forward`` works:
mechkit's :class:`~mechkit.sae.base.SparseDictionary` or a duck-typed stand-in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from mechkit.core.batching import check_budget, each_batch, parse_budget, prompts_per_pass
from mechkit.core.deprecation import renamed_arguments
from mechkit.core.inputs import reference_mean, resolve_contrast
from mechkit.core.labels import metric_name
from mechkit.core.metrics import batch_metric
from mechkit.core.progress import progress_bar
from mechkit.core.types import Model, SparseDictionaryLike
from mechkit.errors import (
    InvalidArgumentError,
    InvalidSiteError,
    InvalidTypeError,
    ShapeError,
    SiteNotFoundError,
    check_choice,
    did_you_mean,
)
from mechkit.hook_scope import hook_scope
from mechkit.patching import engine
from mechkit.patching.result import PatchResult

__all__ = ["splice", "SpliceHandle", "patch_latents", "sae_sites"]

LatentIndex = int | Sequence[int] | Tensor | None
Positions = int | Sequence[int] | None


# ----------------------------------------------------------------------------------------------
# Reading an SAE's sites and applying it to an activation
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SAESites:
    """Where an SAE or transcoder sits: the hook it reads and the hook whose activation it
    reconstructs (the same hook for an SAE), and its widths."""

    in_hook: str
    out_hook: str
    d_in: int
    d_out: int
    d_sae: int

    @property
    def is_transcoder(self) -> bool:
        return self.in_hook != self.out_hook


def sae_sites(sae: SparseDictionaryLike) -> SAESites:
    """The hooks and widths of an SAE or transcoder, read from its ``cfg``.

    Example:
        >>> from mechkit.sae import SAEConfig, SparseDictionary
        >>> tc = SparseDictionary.from_config(SAEConfig(architecture="relu", d_in=128, d_sae=64,
        ...     hook_name="blocks.0.ln1.hook_normalized", d_out=128,
        ...     out_hook_name="blocks.0.hook_attn_out"))
        >>> sites = sae_sites(tc)
        >>> sites.in_hook, sites.out_hook, sites.is_transcoder
        ('blocks.0.ln1.hook_normalized', 'blocks.0.hook_attn_out', True)
    """
    cfg = getattr(sae, "cfg", None)
    missing = [
        name
        for name in ("hook_name", "d_in", "d_sae")
        if cfg is None or getattr(cfg, name, None) is None
    ]
    if cfg is None or missing or not isinstance(sae, SparseDictionaryLike):
        raise InvalidTypeError(
            f"Expected an SAE or transcoder (cfg.hook_name, cfg.d_in, cfg.d_sae, W_dec, encode, "
            f"decode); got {type(sae).__name__} lacking {missing or 'encode/decode/W_dec'}. Hint: "
            "load one with mk.load_sae(path)."
        )
    d_out = getattr(cfg, "d_out", None)
    out_hook = getattr(cfg, "out_hook_name", None)
    if d_out is not None and out_hook is None:
        raise InvalidSiteError(
            f"Expected a transcoder (d_out={d_out}) to name the hook it predicts; got "
            f"out_hook_name=None (reading {cfg.hook_name!r}). Hint: set it, e.g. "
            "sae.cfg = sae.cfg.replace(out_hook_name='blocks.5.hook_mlp_out')."
        )
    return SAESites(
        cfg.hook_name,
        out_hook or cfg.hook_name,
        int(cfg.d_in),
        int(d_out or cfg.d_in),
        int(cfg.d_sae),
    )


def hook_layer(name: str) -> int | None:
    """The block a hook sits in (``blocks.3.ln2.hook_normalized`` -> 3), None outside blocks."""
    match = re.match(r"blocks\.(\d+)\.", name)
    return None if match is None else int(match.group(1))


def check_hooks(model: Model, sites: SAESites) -> None:
    """The SAE's hooks exist in the model, and a transcoder reads before it writes."""
    for name in (sites.in_hook, sites.out_hook):
        if name not in model.hook_dict:
            raise SiteNotFoundError(
                f"Expected the SAE's hook to be a hook of this model; got {name!r}."
                f"{did_you_mean(name, model.hook_dict) or ' Hint: was it trained on this model?'}"
            )
    if sites.is_transcoder:
        a, b = hook_layer(sites.in_hook), hook_layer(sites.out_hook)
        if a is None or b is None or a > b:
            raise InvalidSiteError(
                f"Expected a transcoder that reads a block's activation at or before the block "
                f"it writes to; got input {sites.in_hook!r} and output {sites.out_hook!r}."
            )


def as_rows(act: Tensor, width: int, hook: str) -> Tensor:
    """``(batch, pos, width)``: the activation, with head axes (``hook_z``) flattened."""
    if act.shape[-1] == width and act.ndim == 3:
        return act
    if act.ndim >= 3 and act.shape[2:].numel() == width:
        return act.reshape(*act.shape[:2], width)
    raise ShapeError(
        f"Expected the activation at {hook!r} to have width {width} (the SAE's), as "
        f"(batch, pos, {width}) or with heads flattening to it; got {tuple(act.shape)}. Hint: is "
        "the SAE trained on this model and hook?"
    )


def reconstruct(
    sae: SparseDictionaryLike, x: Float[Tensor, "batch pos d_in"]
) -> tuple[Float[Tensor, "batch pos d_sae"], Float[Tensor, "batch pos d_out"]]:
    """``(f, x_hat)``: latents and reconstruction, in the SAE's dtype and on its device.

    ``x_hat`` is ``decode(f)``, plus the skip term for skip transcoders (``sae.skip_term(x)``;
    ``sae(x)`` for objects without that method).
    """
    x = x.to(sae.W_dec.device, sae.W_dec.dtype)
    f = sae.encode(x)
    x_hat = sae.decode(f)
    skip = skip_term(sae, x)
    return f, x_hat if skip is None else x_hat + skip


def skip_term(
    sae: SparseDictionaryLike, x: Float[Tensor, "batch pos d_in"]
) -> Float[Tensor, "batch pos d_out"] | None:
    """A skip transcoder's linear term ``x @ W_skip`` (``sae.skip_term(x)``, or
    ``sae(x) - decode(encode(x))`` for objects without that method); None for other
    dictionaries (``cfg.skip`` unset).

    Example:
        >>> from mechkit.sae import SAEConfig, SparseDictionary
        >>> sae = SparseDictionary.from_config(SAEConfig(architecture="relu", d_in=4, d_sae=8,
        ...                                    hook_name="blocks.0.hook_resid_post"))
        >>> skip_term(sae, torch.zeros(1, 2, 4)) is None
        True
    """
    if not getattr(getattr(sae, "cfg", None), "skip", False):
        return None
    own = getattr(sae, "skip_term", None)  # optional member: not part of SparseDictionaryLike
    if own is not None:
        return own(x)
    return sae(x) - sae.decode(sae.encode(x))  # type: ignore[operator]


# ----------------------------------------------------------------------------------------------
# Edits of latents and of the error term
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class _Edit:
    """One edit of a ``(batch, pos, width)`` tensor: ``kind`` on ``index`` at ``positions``."""

    kind: Literal["set", "scale", "add", "transform"]
    index: Tensor | None  # (n,) latent (or error component) indices; None: all
    positions: tuple[int, ...] | None  # None: all positions
    value: Any  # float or tensor broadcastable to (batch, n_pos, n); fn for "transform"

    def apply(self, t: Tensor) -> Tensor:
        if self.kind == "transform":
            out = self.value(t)
            if not isinstance(out, Tensor) or out.shape != t.shape:
                raise ShapeError(
                    f"Expected the transform to return a tensor of shape {tuple(t.shape)}; got "
                    f"{getattr(out, 'shape', type(out).__name__)}."
                )
            return out
        batch, seq, width = t.shape
        pos = _resolve_positions(self.positions, seq, t.device)
        idx = (
            torch.arange(width, device=t.device) if self.index is None else self.index.to(t.device)
        )
        rows = torch.arange(batch, device=t.device)[:, None, None]
        where = (rows, pos[None, :, None], idx[None, None, :])
        current = t[where]  # (batch, n_pos, n)
        value = torch.as_tensor(self.value, dtype=t.dtype, device=t.device)
        if self.kind == "set":
            new = value
        elif self.kind == "scale":
            new = current * value
        else:
            new = current + value
        try:
            new = torch.broadcast_to(new, current.shape)
        except RuntimeError:
            raise ShapeError(
                f"Expected a value broadcastable to (batch, positions, indices) = "
                f"{tuple(current.shape)}; got shape {tuple(value.shape)}."
            ) from None
        out = t.clone()
        out[where] = new
        return out


def _resolve_positions(positions: tuple[int, ...] | None, seq: int, device: Any) -> Tensor:
    if positions is None:
        return torch.arange(seq, device=device)
    bad = [p for p in positions if not -seq <= p < seq]
    if bad:
        raise InvalidSiteError(
            f"Expected positions in [-{seq}, {seq}) for a forward pass of {seq} tokens; got "
            f"{bad}. Hint: positions index the tokens of each forward pass."
        )
    return torch.tensor([p % seq for p in positions], dtype=torch.long, device=device)


def _as_positions(positions: Positions) -> tuple[int, ...] | None:
    if positions is None:
        return None
    if isinstance(positions, int):
        return (positions,)
    if isinstance(positions, Tensor):
        positions = positions.flatten().tolist()
    return tuple(int(p) for p in positions)


def check_latents(latents: LatentIndex, d_sae: int, what: str = "latent") -> Tensor | None:
    """Latent indices as a ``(n,)`` long tensor (None: all), each checked to be in range."""
    if latents is None:
        return None
    index = torch.as_tensor(latents, dtype=torch.long).flatten().cpu()
    if index.numel() == 0:
        raise InvalidSiteError(f"Expected at least one {what} index; got none.")
    bad = index[(index < 0) | (index >= d_sae)]
    if bad.numel():
        raise InvalidSiteError(
            f"Expected {what} indices in [0, {d_sae}) (the dictionary has {d_sae}); got "
            f"{bad.tolist()[:10]}. Hint: latents are numbered 0..d_sae-1."
        )
    return index


# ----------------------------------------------------------------------------------------------
# The splice context
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class _Spliced:
    name: str
    sae: SparseDictionaryLike
    sites: SAESites
    latent_edits: list[_Edit] = dataclasses.field(default_factory=list)
    error_edits: list[_Edit] = dataclasses.field(default_factory=list)
    pending: tuple[Tensor, Tensor] | None = None  # transcoders: (f, x_hat) from the input hook


class SpliceHandle:
    """What :func:`splice` yields: the latents and error terms of the last forward pass, and
    methods that edit latents or error terms in every later forward inside the block.

    Attributes:
        names: the names of the spliced dictionaries (by default their output hook names).
        latents: ``name -> (batch, pos, d_sae)`` latent activations of the last forward, as
            encoded (before edits); filled when ``record=True``.
        errors: ``name -> (batch, pos, d_out)`` the reconstruction error ``x - x_hat`` of the
            last forward (before error edits).
        reconstructions: ``name -> (batch, pos, d_out)`` the un-edited ``x_hat``.

    Edits (``zero``, ``set``, ``scale``, ``add``, ``transform``; ``zero_error``,
    ``patch_error``, ``scale_error``) apply in the order given to every forward pass until
    :meth:`clear` or the end of the ``with`` block. ``positions`` index the tokens of each
    forward pass (negative from the end); None means all. ``sae`` names the dictionary and may
    be left out when only one is spliced.

    Example:
        >>> from mechkit.sae import SAEConfig, SparseDictionary
        >>> model = mk.load_model("attn-only-2l")
        >>> sae = SparseDictionary.from_config(SAEConfig(architecture="relu", d_in=128, d_sae=64,
        ...                                    hook_name="blocks.0.hook_resid_post"))
        >>> with mk.splice(model, sae) as handle:
        ...     handle.zero_error()                  # the model runs on the reconstruction alone
        ...     _ = model(torch.tensor([[1, 2, 3]]))
        ...     handle.names, handle.errors["blocks.0.hook_resid_post"].shape
        (('blocks.0.hook_resid_post',), torch.Size([1, 3, 128]))
    """

    def __init__(self, entries: list[_Spliced], keep_error: bool, record: bool) -> None:
        self._entries = {e.name: e for e in entries}
        self.keep_error = keep_error
        self.record = record
        self.latents: dict[str, Tensor] = {}
        self.errors: dict[str, Tensor] = {}
        self.reconstructions: dict[str, Tensor] = {}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def _entry(self, sae: str | None) -> _Spliced:
        if sae is None:
            if len(self._entries) != 1:
                raise InvalidArgumentError(
                    f"Expected sae= naming one of the {len(self._entries)} spliced dictionaries "
                    f"{list(self._entries)}; got None."
                )
            return next(iter(self._entries.values()))
        if sae not in self._entries:
            raise SiteNotFoundError(
                f"Expected one of the spliced dictionaries {list(self._entries)}; got {sae!r}."
                f"{did_you_mean(sae, self._entries)}"
            )
        return self._entries[sae]

    def _add_latent_edit(self, kind: Any, latents: LatentIndex, positions, value, sae) -> None:
        entry = self._entry(sae)
        index = check_latents(latents, entry.sites.d_sae)
        entry.latent_edits.append(_Edit(kind, index, _as_positions(positions), value))

    def zero(self, latents: LatentIndex, *, positions: Positions = None, sae: str | None = None):
        """Set the chosen latents to 0 (None: all latents)."""
        self._add_latent_edit("set", latents, positions, 0.0, sae)

    def set(
        self,
        latents: LatentIndex,
        value: float | Tensor,
        *,
        positions: Positions = None,
        sae: str | None = None,
    ) -> None:
        """Set the chosen latents to ``value`` (broadcastable to ``(batch, n_pos, n_latents)``)."""
        self._add_latent_edit("set", latents, positions, value, sae)

    def scale(
        self,
        latents: LatentIndex,
        factor: float | Tensor,
        *,
        positions: Positions = None,
        sae: str | None = None,
    ) -> None:
        """Multiply the chosen latents by ``factor``."""
        self._add_latent_edit("scale", latents, positions, factor, sae)

    def add(
        self,
        latents: LatentIndex,
        value: float | Tensor,
        *,
        positions: Positions = None,
        sae: str | None = None,
    ) -> None:
        """Add ``value`` to the chosen latents."""
        self._add_latent_edit("add", latents, positions, value, sae)

    def transform(self, fn: Callable[[Tensor], Tensor], *, sae: str | None = None) -> None:
        """Replace the latents by ``fn(latents)`` (``(batch, pos, d_sae)`` in and out)."""
        self._entry(sae).latent_edits.append(_Edit("transform", None, None, fn))

    def zero_error(self, *, positions: Positions = None, sae: str | None = None) -> None:
        """Drop the error term at ``positions`` (the model runs on the reconstruction there)."""
        self._entry(sae).error_edits.append(_Edit("set", None, _as_positions(positions), 0.0))

    def patch_error(
        self,
        value: Float[Tensor, "batch pos d_out"],
        *,
        positions: Positions = None,
        sae: str | None = None,
    ) -> None:
        """Replace the error term by ``value`` (broadcastable to ``(batch, n_pos, d_out)``),
        e.g. the error of another run from ``handle.errors``."""
        self._entry(sae).error_edits.append(_Edit("set", None, _as_positions(positions), value))

    def scale_error(
        self, factor: float, *, positions: Positions = None, sae: str | None = None
    ) -> None:
        """Multiply the error term by ``factor``."""
        self._entry(sae).error_edits.append(_Edit("scale", None, _as_positions(positions), factor))

    def clear(self, *, sae: str | None = None) -> None:
        """Remove every edit (of one dictionary when ``sae`` is given)."""
        entries = self._entries.values() if sae is None else [self._entry(sae)]
        for entry in entries:
            entry.latent_edits.clear()
            entry.error_edits.clear()

    def __repr__(self) -> str:
        edits = {n: len(e.latent_edits) + len(e.error_edits) for n, e in self._entries.items()}
        return f"SpliceHandle({edits}, keep_error={self.keep_error})"

    # -- the computation -------------------------------------------------------------------

    def _encode(self, entry: _Spliced, act: Tensor) -> tuple[Tensor, Tensor]:
        x = as_rows(act, entry.sites.d_in, entry.sites.in_hook)
        return reconstruct(entry.sae, x)

    def _replace(self, entry: _Spliced, act: Tensor, f: Tensor, x_hat: Tensor) -> Tensor:
        """The new activation at the output hook: x_hat(edited f) + (edited) error."""
        sites = entry.sites
        y = as_rows(act, sites.d_out, sites.out_hook)
        if y.shape[:2] != x_hat.shape[:2]:
            raise ShapeError(
                f"Expected the transcoder's input and output activations to cover the same "
                f"tokens; got {tuple(x_hat.shape[:2])} and {tuple(y.shape[:2])}."
            )
        # in the wider of the two dtypes, so a bfloat16 dictionary on a float32 model still
        # gives back the activation to float32 rounding with the error term kept
        dtype = torch.promote_types(y.dtype, x_hat.dtype)
        y, x_hat = y.to(x_hat.device, dtype), x_hat.to(dtype)
        error = y - x_hat
        if self.record:
            self.latents[entry.name] = f.detach()
            self.errors[entry.name] = error.detach()
            self.reconstructions[entry.name] = x_hat.detach()
        edited = f
        for edit in entry.latent_edits:
            edited = edit.apply(edited)
        out = x_hat
        if edited is not f:
            # the error stays the un-edited one: the output moves by exactly this difference
            out = x_hat + (entry.sae.decode(edited) - entry.sae.decode(f)).to(dtype)
        term = error if self.keep_error else torch.zeros_like(error)
        for edit in entry.error_edits:
            term = edit.apply(term)
        return (out + term).to(act.device, act.dtype).reshape(act.shape)

    def _hooks(self) -> list[tuple[str, Callable[[Tensor, Any], Tensor | None]]]:
        hooks: list[tuple[str, Callable[[Tensor, Any], Tensor | None]]] = []
        for entry in self._entries.values():
            if entry.sites.is_transcoder:
                hooks.append((entry.sites.in_hook, self._input_hook(entry)))
                hooks.append((entry.sites.out_hook, self._output_hook(entry)))
            else:
                hooks.append((entry.sites.in_hook, self._sae_hook(entry)))
        return hooks

    def _sae_hook(self, entry: _Spliced) -> Callable[[Tensor, Any], Tensor]:
        def hook(act: Tensor, hook: Any) -> Tensor:
            f, x_hat = self._encode(entry, act)
            return self._replace(entry, act, f, x_hat)

        return hook

    def _input_hook(self, entry: _Spliced) -> Callable[[Tensor, Any], None]:
        def hook(act: Tensor, hook: Any) -> None:
            entry.pending = self._encode(entry, act)

        return hook

    def _output_hook(self, entry: _Spliced) -> Callable[[Tensor, Any], Tensor]:
        def hook(act: Tensor, hook: Any) -> Tensor:
            if entry.pending is None:
                raise InvalidSiteError(
                    f"Expected the transcoder's input hook {entry.sites.in_hook!r} to run before "
                    f"its output hook {entry.sites.out_hook!r} in the same forward pass; it did "
                    "not. Hint: do not start the forward pass between the two hooks."
                )
            (f, x_hat), entry.pending = entry.pending, None
            return self._replace(entry, act, f, x_hat)

        return hook


def _named(saes: Any) -> list[tuple[str, Any]]:
    if isinstance(saes, Mapping):
        return [(str(k), v) for k, v in saes.items()]
    if isinstance(saes, Sequence) and not isinstance(saes, str):
        return [(sae_sites(s).out_hook, s) for s in saes]
    return [(sae_sites(saes).out_hook, saes)]


@contextlib.contextmanager
def splice(
    model: Model, saes: Any, *, keep_error: bool = True, record: bool = True
) -> Iterator[SpliceHandle]:
    """Splice SAEs or transcoders into every forward pass of ``model`` inside the block.

    Each dictionary's output activation becomes ``x_hat + error`` (see the module docstring):
    with ``keep_error=True`` the model's output is unchanged until a latent or the error is
    edited through the handle. Hooks are added in a hook scope in the order given, so the
    model is unchanged after the block, also after an exception or a Ctrl-C.

    Args:
        model: a HookedTransformer.
        saes: one SAE/transcoder, a list of them, or a dict ``name -> SAE``. Names default to
            the hook each replaces (``cfg.out_hook_name`` for transcoders, else
            ``cfg.hook_name``).
        keep_error: add the reconstruction error back (True), or run on the reconstruction
            alone (False).
        record: keep the last forward's latents, errors and reconstructions on the handle
            (``(batch, pos, d_sae)`` per dictionary; turn off for long runs).

    Yields:
        A :class:`SpliceHandle`.

    Example:
        >>> from mechkit.sae import SAEConfig, SparseDictionary
        >>> model = mk.load_model("attn-only-2l")
        >>> sae = SparseDictionary.from_config(SAEConfig(
        ...     architecture="relu", d_in=128, d_sae=64, hook_name="blocks.0.hook_resid_post"))
        >>> tokens = torch.randint(1, 500, (8, 16), generator=torch.Generator().manual_seed(0))
        >>> with mk.splice(model, sae) as h:
        ...     h.scale([42], 5.0, positions=[-1])    # amplify latent 42 at the last token
        ...     logits = model(tokens)                # (batch, pos, d_vocab)
        ...     h.latents["blocks.0.hook_resid_post"].shape   # (batch, pos, d_sae)
        torch.Size([8, 16, 64])
    """
    named = _named(saes)
    if not named:
        raise InvalidArgumentError("Expected at least one SAE or transcoder to splice; got none.")
    entries: list[_Spliced] = []
    seen: dict[str, SAESites] = {}
    for name, sae in named:
        sites = sae_sites(sae)
        check_hooks(model, sites)
        if name in seen:
            raise InvalidArgumentError(
                f"Expected distinct names for the spliced dictionaries; {name!r} "
                "appears twice. Hint: pass a dict name -> SAE."
            )
        for other, other_sites in seen.items():
            if other_sites.out_hook == sites.out_hook:
                raise InvalidSiteError(
                    f"Expected at most one dictionary replacing {sites.out_hook!r}; {other!r} and "
                    f"{name!r} both do. Hint: splice them in separate blocks."
                )
        seen[name] = sites
        entries.append(_Spliced(name, sae, sites))
    handle = SpliceHandle(entries, keep_error, record)
    try:
        with hook_scope(model, fwd_hooks=handle._hooks()):
            yield handle
    finally:
        for entry in entries:
            entry.pending = None


# ----------------------------------------------------------------------------------------------
# Activation patching on latents
# ----------------------------------------------------------------------------------------------


@renamed_arguments(clean_tokens="clean", corrupt_tokens="corrupt")
@torch.no_grad()
def patch_latents(
    model: Model,
    sae: SparseDictionaryLike,
    clean: Any,
    corrupt: Any = None,
    metric: Any = None,
    *,
    latents: int | Sequence[int] | None = None,
    positions: Literal["all", "each"] | Sequence[int] = "all",
    direction: Literal["denoising", "noising"] | None = None,
    ablation: Literal["corrupt", "mean", "zero"] = "corrupt",
    reference: Any = None,
    batch_size: int | None = None,
    memory_budget: int | str | None = None,
    progress: bool = True,
) -> PatchResult:
    """Activation patching over an SAE's latents: each latent's value from the other run.

    With the dictionary spliced in (error term kept), the base run is repeated with one latent
    set to its value in the other run (denoising: the corrupt run with clean values; noising:
    the clean run with the ablation's values), and the metric scored. Since the error term is
    the un-edited one, that is the base run with ``(f_source[i] - f_base[i]) * W_dec[i]`` added
    at the dictionary's output hook, which is how it runs: many latents per forward, each in its
    own copy of the batch, starting at the SAE's block from the cached base run
    (:mod:`mechkit.patching.engine`).

    Args:
        model: a HookedTransformer.
        sae: an SAE or transcoder whose hooks sit in the model's blocks.
        clean, corrupt, metric: a :class:`~mechkit.PromptPairs` (its logit difference the
            default metric), or prompts of one shape and a metric, as in
            :func:`mechkit.core.resolve_contrast` (``clean_tokens=``/``corrupt_tokens=`` are
            the deprecated names of the first two).
        latents: the latents to patch: a list of indices; an int ``n`` for the ``n`` latents
            whose activation differs most between the runs (sum of ``|f_source - f_base|``
            over prompts and patched positions); None for every latent that differs at all.
            Latents that do not differ score the unpatched run without running.
        positions: ``"all"`` (patch a latent at every position at once), ``"each"`` (one patch
            per latent and position), or a list of positions (one patch each).
        direction, ablation, reference: the core's vocabulary (``"resample"`` is not offered);
            ``ablation="mean"`` or ``"zero"`` sets a latent to its mean over ``reference`` or
            to zero in the clean run.
        batch_size: prompts per pass (None: all; splitting needs a mechkit Metric).
        memory_budget: bytes (or ``"2GB"``) a pass may use, as in :func:`mk.activation_patch`.
        progress: show a progress bar.

    Returns:
        A :class:`~mechkit.patching.result.PatchResult` with axes ``("latent",)`` or
        ``("latent", "pos")`` (``.top(n)``, ``.to_dataframe()``, ``.plot()``, ``.normalized()``).

    Example:
        >>> from mechkit.sae import SAEConfig, SparseDictionary
        >>> model = mk.load_model("attn-only-2l")
        >>> sae = SparseDictionary.from_config(SAEConfig(
        ...     architecture="relu", d_in=128, d_sae=64, hook_name="blocks.0.hook_resid_post"))
        >>> clean = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
        >>> corrupt = torch.tensor([[1, 9, 3, 4], [5, 9, 7, 8]])
        >>> r = mk.patch_latents(model, sae, clean, corrupt, lambda lg: lg[:, -1, 3].mean(),
        ...                      latents=5, progress=False)
        >>> r.axes, r.scores.shape                # the 5 latents that differ most
        (('latent',), torch.Size([5]))
    """
    if isinstance(positions, str):
        check_choice("positions", positions, ["all", "each"], also="a list of positions")
    check_budget(memory_budget)
    sites = sae_sites(sae)
    check_hooks(model, sites)
    layer = hook_layer(sites.out_hook)
    if layer is None:
        raise InvalidSiteError(
            f"Expected a dictionary whose output hook sits in a block (blocks.N....); got "
            f"{sites.out_hook!r}. Hint: splice it with mk.splice and patch by hand."
        )
    contrast = resolve_contrast(
        model,
        clean,
        corrupt,
        metric,
        direction=direction,
        ablation=ablation,
        reference=reference,
        ablations=("corrupt", "mean", "zero"),
    )
    n_batch = contrast.n_prompts
    size = prompts_per_pass(n_batch, batch_size, contrast.metric)
    base_tokens = contrast.base_tokens
    seq = base_tokens.shape[1]

    # the latents of every prompt first: which latents to patch is decided over all of them
    f_base = _latents_on(model, sae, sites, base_tokens, size)  # (batch, pos, d_sae)
    source_tokens = contrast.source_tokens
    if source_tokens is not None:
        f_source = _latents_on(model, sae, sites, source_tokens, size)
    elif contrast.ablation == "zero":
        f_source = torch.zeros_like(f_base)
    else:
        assert contrast.reference_tokens is not None and contrast.reference_mask is not None
        f_ref = _latents_on(model, sae, sites, contrast.reference_tokens, size)
        f_source = reference_mean(f_ref, contrast.reference_mask, seq).expand_as(f_base)
    delta = f_source - f_base  # (batch, pos, d_sae)

    if isinstance(positions, str):
        pos_list = None if positions == "all" else list(range(seq))
    else:
        pos_list = [int(p) % seq for p in _resolve_positions(_as_positions(positions), seq, "cpu")]
    chosen = delta if pos_list is None else delta[:, pos_list]
    moved = chosen.abs().sum((0, 1)).float().cpu()  # (d_sae,)
    if latents is None:
        latent_list = moved.nonzero().flatten().tolist()
        if not latent_list:
            raise InvalidArgumentError(
                "Expected some latent to differ between the two runs at the patched positions; "
                "none does, so there is nothing to patch. Hint: other prompts or positions."
            )
    elif isinstance(latents, int) and not isinstance(latents, bool):
        if latents <= 0:
            raise InvalidArgumentError(
                f"Expected a positive number of latents; got {latents}. Hint: None patches "
                "every latent that differs."
            )
        latent_list = moved.argsort(descending=True, stable=True)[:latents].tolist()
    else:
        index = check_latents(latents, sites.d_sae)  # (n,), never None for a list
        latent_list = [] if index is None else index.tolist()
    keys: list[tuple[int, ...]] = [
        (li,) if pos_list is None else (li, pi)
        for li in range(len(latent_list))
        for pi in range(1 if pos_list is None else len(pos_list))
    ]

    w_dec = sae.W_dec.detach()
    sums = {key: 0.0 for key in keys}
    prompts: dict[tuple[int, ...], list[Tensor | None]] = {key: [] for key in keys}
    totals = {"base": 0.0, "source": 0.0}
    n_batches = -(-n_batch // size)
    bar = progress_bar(
        n_batches * len(keys), f"patching latents of {sites.out_hook}", enabled=progress
    )

    def work(rows: slice) -> None:
        n = rows.stop - rows.start
        m = batch_metric(contrast.metric, rows, n_batch)
        base = engine.run_base(model, base_tokens[rows])
        reader = engine.MetricReader(m, base)
        base_value, base_per_prompt = engine.base_score(reader, base)
        source_value = 0.0
        if source_tokens is not None:
            source_value = float(engine.score_logits(reader, model(source_tokens[rows]))[0])
        jobs, done = [], {}
        for key in keys:
            latent = latent_list[key[0]]
            d = delta[rows, :, latent]  # (batch, pos)
            if pos_list is not None:
                pos = pos_list[key[1]]
                d = torch.zeros_like(d).index_copy(
                    1, torch.tensor([pos], device=d.device), d[:, pos : pos + 1]
                )
            nonzero = (d != 0).any(0).nonzero()
            if nonzero.numel() == 0:  # nothing moves: the unpatched run's score
                done[key] = (float(base_value), base_per_prompt)
                continue
            edit = _adder(d, w_dec[latent], sites.d_out)
            jobs.append(engine.PatchJob(key, layer, int(nonzero[0, 0]), {sites.out_hook: edit}))
        bar.update(len(done))
        budget = parse_budget(memory_budget, base.tokens.device)
        for chunk in engine.run_jobs(model, base, jobs, reader, budget=budget, progress=bar):
            for res in chunk:
                done[res.key] = (float(res.score), res.per_prompt)
        # kept only once the whole batch has run (a batch out of memory is retried in halves)
        for key, (score, per_prompt) in done.items():
            sums[key] += score * n
            prompts[key].append(per_prompt)
        totals["base"] += float(base_value) * n
        totals["source"] += source_value * n

    try:
        each_batch(n_batch, size, work)
    finally:
        bar.close()

    axes: tuple[str, ...] = ("latent",) if pos_list is None else ("latent", "pos")
    labels: dict[str, list[Any]] = {"latent": latent_list}
    ticks = {"latent": [f"#{i}" for i in latent_list]}
    if pos_list is not None:
        labels["pos"] = pos_list
        ticks["pos"] = [str(p) for p in pos_list]
    shape = tuple(len(labels[a]) for a in axes)
    scores = torch.full(shape, float("nan"))
    per_prompt: Tensor | None = torch.full((*shape, n_batch), float("nan"))
    for key in keys:
        scores[key] = sums[key] / n_batch
        parts = prompts[key]
        if per_prompt is None or any(p is None for p in parts):
            per_prompt = None
        else:
            per_prompt[key] = torch.cat([p.float().cpu() for p in parts if p is not None])
    base_value = totals["base"] / n_batch
    source = totals["source"] / n_batch if source_tokens is not None else None
    clean_score, corrupt_score = (
        (source, base_value) if contrast.direction == "denoising" else (base_value, source)
    )
    return PatchResult(
        scores=scores,
        per_prompt=per_prompt,
        axes=axes,
        labels=labels,
        tick_labels=ticks,
        clean_score=clean_score,
        corrupt_score=corrupt_score,
        method=contrast.method,
        site=f"latents of {sites.out_hook}",
        metric_name=metric_name(contrast.metric),
    )


def _latents_on(
    model: Model, sae: SparseDictionaryLike, sites: SAESites, tokens: Tensor, size: int
) -> Tensor:
    """The dictionary's latents ``(batch, pos, d_sae)`` (float32) on ``tokens``, ``size``
    prompts per forward pass (stopped after the dictionary's block)."""
    parts: list[Tensor] = []
    stop = hook_layer(sites.in_hook)

    def work(rows: slice) -> None:
        held: list[Tensor] = []
        with hook_scope(model, fwd_hooks=[(sites.in_hook, lambda act, hook: held.append(act))]):
            model(tokens[rows], stop_at_layer=None if stop is None else stop + 1)
        parts.append(_latents_of(sae, sites, held[0]))  # kept once the pass has succeeded

    each_batch(tokens.shape[0], size, work)
    return torch.cat(parts)


def _latents_of(sae: SparseDictionaryLike, sites: SAESites, act: Tensor) -> Tensor:
    f, _ = reconstruct(sae, as_rows(act, sites.d_in, sites.in_hook))
    return f.float()


def _adder(delta: Tensor, direction: Tensor, width: int) -> Callable[[Tensor, int], None]:
    """An engine edit adding ``delta[b, p] * direction`` to the rows, from position ``first``."""

    def edit(rows: Tensor, first: int) -> None:
        d = delta[:, first:].to(rows.device, rows.dtype)  # (batch, suffix)
        add = d[..., None] * direction.to(rows.device, rows.dtype)  # (batch, suffix, d_out)
        rows += add.reshape(rows.shape) if rows.shape[-1] != width else add

    return edit
