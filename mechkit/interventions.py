"""Interventions: small objects that change one site's activation, applied only in a scope.

Each intervention names a :class:`~mechkit.sites.Site` and says what to do with the part of the
activation the site selects. They take effect only inside :func:`intervene`, which is built on
:func:`mechkit.hook_scope.hook_scope`: leaving the ``with`` block removes every hook, also when
a hook, the forward pass or the user's own code raises, and when Ctrl-C interrupts.

Example:
    >>> model = mk.load_model("attn-only-2l")
    >>> clean, corrupt = torch.tensor([[1, 2, 3]]), torch.tensor([[1, 5, 3]])
    >>> site = mk.Site("z", layer=1, head=1)
    >>> with mk.capture(model, site) as acts:
    ...     _ = model(clean)
    >>> acts[site].shape                   # (batch, pos, d_head) of one head
    torch.Size([1, 3, 32])
    >>> with mk.intervene(model, mk.Patch(site, acts[site])):
    ...     patched = model(corrupt)       # (batch, pos, d_vocab)

:func:`capture` is the reading counterpart: it records activations at sites during a forward.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mechkit.errors import InvalidSiteError, ShapeError, SiteNotFoundError
from mechkit.hook_scope import hook_scope
from mechkit.sites import Site, validate_sites

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = ["Intervention", "Patch", "Zero", "Add", "Transform", "intervene", "capture", "Captured"]


class Intervention:
    """Base class: a site and a rule that maps the selected activation to its new value.

    Example:
        >>> site = mk.Site("resid_pre", layer=1, position=0)
        >>> mk.Zero(site).apply(torch.ones(1, 2, 3), site)   # (batch, pos, d_model)
        tensor([[[0., 0., 0.],
                 [1., 1., 1.]]])
    """

    site: Site

    def new_value(self, selected: Tensor) -> Tensor:
        """The replacement for ``selected`` (the part of the activation the site picks)."""
        raise NotImplementedError

    def apply(self, activation: Tensor, site: Site) -> Tensor:
        """The whole activation with the site's part replaced (a new tensor; autograd-safe)."""
        idx = site.index(activation.ndim)
        selected = activation[idx]
        value = self.new_value(selected)
        try:
            value = torch.broadcast_to(
                value.to(activation.device, activation.dtype), selected.shape
            )
        except RuntimeError:
            raise ShapeError(
                f"{type(self).__name__} at {site.label!r} ({site.hook_name}): expected a value "
                f"broadcastable to the selected shape {tuple(selected.shape)} (activation "
                f"{tuple(activation.shape)}); got shape {tuple(value.shape)}. Hint: select a "
                "head or position on the Site, or reshape the value."
            ) from None
        out = activation.clone()
        out[idx] = value
        return out


@dataclasses.dataclass(frozen=True, eq=False)
class Patch(Intervention):
    """Replace the site's activation with ``value`` (broadcast to the selected shape).

    Example:
        >>> patch = mk.Patch(mk.Site("resid_pre", layer=1, position=2), torch.zeros(1, 128))
        >>> patch.site.hook_name           # the value is (batch, d_model) at one position
        'blocks.1.hook_resid_pre'
    """

    site: Site
    value: Tensor

    def new_value(self, selected: Tensor) -> Tensor:
        return self.value


@dataclasses.dataclass(frozen=True, eq=False)
class Zero(Intervention):
    """Set the site's activation to zero (zero ablation).

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> with mk.intervene(model, mk.Zero(mk.Site("z", layer=1, head=0))):
        ...     ablated = model(torch.tensor([[1, 2, 3]]))   # (batch, pos, d_vocab)
    """

    site: Site

    def new_value(self, selected: Tensor) -> Tensor:
        return torch.zeros_like(selected)


@dataclasses.dataclass(frozen=True, eq=False)
class Add(Intervention):
    """Add ``scale * vector`` to the site's activation (a steering vector, say).

    Example:
        >>> site = mk.Site("resid_pre", layer=0)
        >>> mk.Add(site, torch.ones(3), scale=2.0).apply(torch.zeros(1, 1, 3), site)
        tensor([[[2., 2., 2.]]])
    """

    site: Site
    vector: Tensor
    scale: float = 1.0

    def new_value(self, selected: Tensor) -> Tensor:
        return selected + self.scale * self.vector.to(selected.device, selected.dtype)


@dataclasses.dataclass(frozen=True, eq=False)
class Transform(Intervention):
    """Replace the site's activation with ``fn(selected)``, for anything the others don't do.

    Example:
        >>> site = mk.Site("resid_pre", layer=0)
        >>> mk.Transform(site, lambda x: -x).apply(torch.ones(1, 1, 2), site)
        tensor([[[-1., -1.]]])
    """

    site: Site
    fn: Callable[[Tensor], Tensor]

    def new_value(self, selected: Tensor) -> Tensor:
        return self.fn(selected)


def _hook_for(intervention: Intervention, site: Site) -> Callable[[Tensor, Any], Tensor]:
    def hook(activation: Tensor, hook: Any) -> Tensor:
        return intervention.apply(activation, site)

    return hook


@contextlib.contextmanager
def intervene(model: HookedTransformer, *interventions: Intervention) -> Iterator[Any]:
    """Apply interventions to every forward pass of ``model`` inside the ``with`` block.

    Sites are validated against the model before any hook is added. On leaving the block, by
    any route, the model has exactly the hooks it had before.

    Yields:
        The model, for convenience.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> tokens = torch.tensor([[1, 2, 3]])
        >>> with mk.intervene(model, mk.Zero(mk.Site("resid_pre", layer=1))):
        ...     ablated = model(tokens)
        >>> bool((ablated != model(tokens)).any())         # and the model is unchanged afterwards
        True
    """
    for item in interventions:
        if not isinstance(item, Intervention):
            raise InvalidSiteError(
                f"Expected mechkit interventions (Patch, Zero, Add, Transform); got "
                f"{type(item).__name__}."
            )
    sites = validate_sites(model, [item.site for item in interventions])
    hooks = [
        (site.hook_name, _hook_for(item, site))
        for item, site in zip(interventions, sites, strict=True)
    ]
    with hook_scope(model, fwd_hooks=hooks):
        yield model


class Captured(dict):
    """Activations recorded by :func:`capture`, keyed by the :class:`Site` asked for.

    ``captured[site]`` is the site's part of the activation, from the last forward pass.

    Example:
        >>> acts = Captured()
        >>> acts[mk.Site("resid_pre", layer=0)] = torch.zeros(1, 2, 3)
        >>> acts["blocks.0.hook_resid_pre"].shape            # by Site or hook name
        torch.Size([1, 2, 3])
    """

    def __getitem__(self, site: Site | str) -> Tensor:
        if isinstance(site, str):
            matches = [s for s in self if s.hook_name == site]
            if len(matches) == 1:
                return super().__getitem__(matches[0])
        if site not in self:
            raise SiteNotFoundError(
                f"Expected one of the captured sites {[s.label for s in self]}; got {site!r}. "
                "Hint: captured values appear only after a forward pass inside the block."
            )
        return super().__getitem__(site)


@contextlib.contextmanager
def capture(model: HookedTransformer, *sites: Site | str, grad: bool = False) -> Iterator[Captured]:
    """Record the activations at ``sites`` during forward passes inside the ``with`` block.

    Args:
        model: the HookedTransformer.
        *sites: sites or hook names; each stores only the part its head/position/neuron picks.
        grad: keep the autograd graph (for gradients through the captured values); by default
            values are detached.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> with mk.capture(model, mk.Site("resid_pre", layer=1)) as acts:
        ...     _ = model(torch.tensor([[1, 2, 3]]))
        >>> acts[mk.Site("resid_pre", layer=1)].shape  # (batch, pos, d_model)
        torch.Size([1, 3, 128])
    """
    asked = [Site.from_hook_name(s, model) if isinstance(s, str) else s for s in sites]
    resolved = validate_sites(model, asked)
    store = Captured()

    def make_hook(key: Site, site: Site) -> Callable[[Tensor, Any], None]:
        def hook(activation: Tensor, hook: Any) -> None:
            value = activation[site.index(activation.ndim)]
            store[key] = value if grad else value.detach()

        return hook

    hooks = [(s.hook_name, make_hook(a, s)) for a, s in zip(asked, resolved, strict=True)]
    with hook_scope(model, fwd_hooks=hooks):
        yield store
