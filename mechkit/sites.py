"""Sites: one typed way to name an activation of a HookedTransformer.

A :class:`Site` is a component (``"resid_pre"``, ``"z"``, ``"pattern"``...), a layer, and
optionally a head, a position and a neuron. It maps to a TransformerLens hook name and to the
slice of that hook's activation it denotes. Sites are checked against ``model.hook_dict`` and the
model's sizes before anything runs, with close-match suggestions on a typo.

    >>> Site("z", layer=3, head=2).hook_name
    'blocks.3.attn.hook_z'
    >>> Site.from_hook_name("blocks.0.hook_resid_post")
    Site(component='resid_post', layer=0, head=None, position=None, neuron=None)

Activation shapes, by component (TransformerLens's own):

======================================  ==========================================
``embed``, ``pos_embed``                ``(batch, pos, d_model)`` (no layer)
``resid_pre/mid/post``, ``attn_out``,   ``(batch, pos, d_model)``
``mlp_out``, ``attn_in``, ``mlp_in``
``q``, ``z``, ``rot_q``                 ``(batch, pos, head, d_head)``
``k``, ``v``, ``rot_k``                 ``(batch, pos, kv_head, d_head)`` (kv_head < head in GQA)
``pattern``, ``attn_scores``            ``(batch, head, query_pos, key_pos)``
``mlp_pre``, ``mlp_post``               ``(batch, pos, d_mlp)``
``ln_final_scale``                      ``(batch, pos, 1)`` (no layer)
======================================  ==========================================
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch

from mechkit.errors import InvalidArgumentError, InvalidSiteError, SiteNotFoundError, did_you_mean

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = ["Site", "Component", "COMPONENTS", "validate_sites", "as_site"]

Component = Literal[
    "embed",
    "pos_embed",
    "resid_pre",
    "resid_mid",
    "resid_post",
    "attn_in",
    "attn_out",
    "mlp_in",
    "mlp_out",
    "q",
    "k",
    "v",
    "z",
    "rot_q",
    "rot_k",
    "pattern",
    "attn_scores",
    "mlp_pre",
    "mlp_post",
    "ln_final_scale",
]
COMPONENTS: tuple[str, ...] = get_args(Component)

# component -> (hook name template, axis of the head, axis of the position, has a neuron axis)
_LAYOUT: dict[str, tuple[str, int | None, int | None, bool]] = {
    "embed": ("hook_embed", None, 1, False),
    "pos_embed": ("hook_pos_embed", None, 1, False),
    "ln_final_scale": ("ln_final.hook_scale", None, 1, False),
    "resid_pre": ("blocks.{layer}.hook_resid_pre", None, 1, False),
    "resid_mid": ("blocks.{layer}.hook_resid_mid", None, 1, False),
    "resid_post": ("blocks.{layer}.hook_resid_post", None, 1, False),
    "attn_in": ("blocks.{layer}.hook_attn_in", None, 1, False),
    "attn_out": ("blocks.{layer}.hook_attn_out", None, 1, False),
    "mlp_in": ("blocks.{layer}.hook_mlp_in", None, 1, False),
    "mlp_out": ("blocks.{layer}.hook_mlp_out", None, 1, False),
    "q": ("blocks.{layer}.attn.hook_q", 2, 1, False),
    "k": ("blocks.{layer}.attn.hook_k", 2, 1, False),
    "v": ("blocks.{layer}.attn.hook_v", 2, 1, False),
    "z": ("blocks.{layer}.attn.hook_z", 2, 1, False),
    "rot_q": ("blocks.{layer}.attn.hook_rot_q", 2, 1, False),
    "rot_k": ("blocks.{layer}.attn.hook_rot_k", 2, 1, False),
    "pattern": ("blocks.{layer}.attn.hook_pattern", 1, 2, False),
    "attn_scores": ("blocks.{layer}.attn.hook_attn_scores", 1, 2, False),
    "mlp_pre": ("blocks.{layer}.mlp.hook_pre", None, 1, True),
    "mlp_post": ("blocks.{layer}.mlp.hook_post", None, 1, True),
}
_NO_LAYER = {"embed", "pos_embed", "ln_final_scale"}
_KV = {"k", "v", "rot_k"}
_MLP_PARTS = {"mlp_pre", "mlp_post", "mlp_out", "mlp_in", "resid_mid"}


@dataclasses.dataclass(frozen=True)
class Site:
    """An activation of the model: a component at a layer, optionally one head, position, neuron.

    Args:
        component: which activation (see the module docstring for the list and shapes).
        layer: the block index; None for ``embed``, ``pos_embed`` and ``ln_final_scale``.
            Negative values count from the last layer once validated against a model.
        head: one attention head (for ``q z pattern attn_scores``), or one key/value head (for
            ``k v``: grouped-query models have fewer of them). None means all heads.
        position: one position (the query position for ``pattern``), or a tuple giving one
            position per batch row (for padded prompts whose answers sit at different places).
            None means all positions.
        neuron: one MLP neuron (``mlp_pre``, ``mlp_post``). None means all.

    Example:
        >>> Site("pattern", layer=1, head=4, position=-1).index(ndim=4)
        (slice(None, None, None), 4, -1)
    """

    component: Component
    layer: int | None = None
    head: int | None = None
    position: int | tuple[int, ...] | None = None
    neuron: int | None = None

    def __post_init__(self) -> None:
        if self.component not in _LAYOUT:
            raise SiteNotFoundError(
                f"Expected a site component among {', '.join(COMPONENTS)}; got "
                f"{self.component!r}.{did_you_mean(str(self.component), COMPONENTS)}"
            )
        head_axis, _, has_neuron = _LAYOUT[self.component][1:]
        if self.component in _NO_LAYER and self.layer is not None:
            raise InvalidSiteError(
                f"Expected no layer for component {self.component!r}; got layer={self.layer}."
            )
        if self.component not in _NO_LAYER and self.layer is None:
            raise InvalidSiteError(
                f"Expected a layer for component {self.component!r}; got layer=None. "
                f"Hint: Site({self.component!r}, layer=0)."
            )
        if self.head is not None and head_axis is None:
            raise InvalidSiteError(
                f"Expected head=None for component {self.component!r}, which has no head axis; "
                f"got head={self.head}. Hint: use 'z' (or 'q', 'k', 'v', 'pattern') for heads."
            )
        if self.neuron is not None and not has_neuron:
            raise InvalidSiteError(
                f"Expected neuron=None for {self.component!r}; got neuron={self.neuron}. "
                "Hint: neurons live at 'mlp_pre' and 'mlp_post'."
            )
        if isinstance(self.position, list):  # lists are unhashable; keep the dataclass frozen
            object.__setattr__(self, "position", tuple(self.position))

    @property
    def hook_name(self) -> str:
        """The TransformerLens hook name, e.g. ``blocks.3.attn.hook_z``."""
        return _LAYOUT[self.component][0].format(layer=self.layer)

    @property
    def head_axis(self) -> int | None:
        """The axis of the heads in this site's activation, or None."""
        return _LAYOUT[self.component][1]

    @property
    def position_axis(self) -> int | None:
        """The axis of the (query) positions in this site's activation."""
        return _LAYOUT[self.component][2]

    @property
    def label(self) -> str:
        """A short label, e.g. ``L3H2 z`` or ``L5 resid_pre @4``."""
        parts = [f"L{self.layer}" if self.layer is not None else ""]
        if self.head is not None:
            parts[0] += f"H{self.head}"
        parts.append(self.component)
        if self.neuron is not None:
            parts.append(f"N{self.neuron}")
        if self.position is not None:
            parts.append(f"@{self.position}")
        return " ".join(p for p in parts if p)

    def index(self, ndim: int) -> tuple[Any, ...]:
        """The index into this site's activation that selects its head, position and neuron.

        A per-row position (a tuple) gives advanced indexing over the batch and position axes,
        so the result has the batch axis first and no position axis.
        """
        idx: list[Any] = [slice(None)] * ndim
        position_axis, head_axis = self.position_axis, self.head_axis
        if isinstance(self.position, tuple) and position_axis is not None:
            idx[0] = torch.arange(len(self.position))
            idx[position_axis] = torch.tensor(self.position)
        elif self.position is not None and position_axis is not None:
            idx[position_axis] = self.position
        if self.head is not None and head_axis is not None:  # __post_init__: a head has an axis
            idx[head_axis] = self.head
        if self.neuron is not None:
            idx[ndim - 1] = self.neuron
        while idx and isinstance(idx[-1], slice) and idx[-1] == slice(None):
            idx.pop()
        return tuple(idx)

    def with_(self, **changes: Any) -> Site:
        """A copy with some fields changed: ``site.with_(head=3)``."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hook_name(
        cls, name: str, model: HookedTransformer | None = None, **fields: Any
    ) -> Site:
        """The site for a TransformerLens hook name such as ``blocks.3.hook_resid_pre``.

        With ``model`` given, the name is checked against ``model.hook_dict`` first, so a typo
        gets the closest real hook names as suggestions.
        """
        if model is not None and name not in model.hook_dict:
            raise SiteNotFoundError(
                f"Expected a hook name of this model; got {name!r}."
                f"{did_you_mean(name, model.hook_dict) or _HOOK_HINT}"
            )
        for component, (template, *_rest) in _LAYOUT.items():
            if "{layer}" not in template:
                if name == template:
                    return cls(component, **fields)  # type: ignore[arg-type]
                continue
            prefix, suffix = template.split("{layer}")
            if name.startswith(prefix) and name.endswith(suffix):
                middle = name[len(prefix) : len(name) - len(suffix)]
                if middle.isdigit():
                    return cls(component, layer=int(middle), **fields)  # type: ignore[arg-type]
        templates = [t.format(layer=0) for t, *_ in _LAYOUT.values()]
        raise SiteNotFoundError(
            f"Expected a hook name that mechkit maps to a site (such as "
            f"'blocks.0.hook_resid_pre' or 'blocks.0.attn.hook_z'); got {name!r}."
            f"{did_you_mean(name, templates) or _HOOK_HINT}"
        )

    def resolve(self, model: HookedTransformer) -> Site:
        """This site checked against ``model``, with negative layers counted from the end.

        Raises:
            SiteNotFoundError: the model has no such hook.
            InvalidSiteError: the layer, head or neuron is out of range.
        """
        cfg = model.cfg
        site = self
        if self.layer is not None:
            if not -cfg.n_layers <= self.layer < cfg.n_layers:
                raise InvalidSiteError(
                    f"Expected a layer in [0, {cfg.n_layers}) for {self.component!r} (the model "
                    f"has {cfg.n_layers} layers); got {self.layer}."
                )
            site = self.with_(layer=self.layer % cfg.n_layers)
        # attention-only models keep MLP hook points that never fire: refuse them too
        no_mlp = getattr(cfg, "attn_only", False) and site.component in _MLP_PARTS
        if no_mlp or site.hook_name not in model.hook_dict:
            suggestion = "" if no_mlp else did_you_mean(site.hook_name, model.hook_dict)
            raise SiteNotFoundError(
                f"Expected a site the model has; {site.label!r} needs hook {site.hook_name!r}, "
                f"which this model lacks.{suggestion}" + _missing_hook_hint(site, cfg)
            )
        if site.head is not None:
            n = (cfg.n_key_value_heads or cfg.n_heads) if site.component in _KV else cfg.n_heads
            if not 0 <= site.head < n:
                kind = "key/value heads" if site.component in _KV else "heads"
                raise InvalidSiteError(
                    f"Expected a head in [0, {n}) for {site.component!r} (the model has {n} "
                    f"{kind} per layer); got {site.head}."
                )
        if site.neuron is not None and not 0 <= site.neuron < (cfg.d_mlp or 0):
            raise InvalidSiteError(f"Expected a neuron in [0, {cfg.d_mlp}); got {site.neuron}.")
        return site


_HOOK_HINT = " Hint: list the real names with `list(model.hook_dict)`."


def _missing_hook_hint(site: Site, cfg: Any) -> str:
    if site.component in _MLP_PARTS and getattr(cfg, "attn_only", False):
        return " Hint: this model is attention-only; it has no MLP."
    if site.component in {"attn_in", "mlp_in"}:
        return " Hint: set model.set_use_split_qkv_input(True) / use_hook_mlp_in first."
    if site.component == "pos_embed":
        return " Hint: models with rotary embeddings have no positional-embedding hook."
    return ""


def validate_sites(model: HookedTransformer, sites: Any) -> list[Site]:
    """Resolve a site, hook name, or a list of them against ``model`` before anything runs.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> validate_sites(model, ["blocks.1.attn.hook_z", Site("resid_pre", layer=-1)])[1].layer
        1
        >>> validate_sites(model, Site("mlp_out", layer=0))   # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        mechkit.errors.SiteNotFoundError: ...attention-only; it has no MLP.
    """
    items = sites if isinstance(sites, list | tuple) else [sites]
    out = []
    for item in items:
        site = Site.from_hook_name(item, model) if isinstance(item, str) else item
        if not isinstance(site, Site):
            raise InvalidSiteError(
                f"Expected a mechkit Site or a hook name string; got {type(item).__name__}."
            )
        out.append(site.resolve(model))
    return out


def as_site(site: str | Site, layer: int | Site | None = None) -> Site:
    """The :class:`Site` a method's ``layer`` and ``site`` arguments name, so every method that
    asks for a layer and a site also takes one ``Site``: ``site="resid_pre", layer=3``,
    ``site=Site("resid_pre", layer=3)`` or ``layer=Site("resid_pre", layer=3)``. A layer given
    beside a Site must agree with it. The result is not yet checked against a model
    (:meth:`Site.resolve`).

    Example:
        >>> as_site("resid_post", 2).hook_name
        'blocks.2.hook_resid_post'
        >>> as_site("resid_pre", Site("resid_mid", layer=1)).hook_name
        'blocks.1.hook_resid_mid'
    """
    if isinstance(layer, Site):
        return layer
    if isinstance(site, Site):
        if layer is not None and site.layer is not None and layer != site.layer:
            raise InvalidArgumentError(
                f"Expected layer=None or the Site's own layer ({site.layer}) beside "
                f"site={site!r}; got layer={layer!r}. Hint: pass the Site alone."
            )
        return site
    if not isinstance(site, str):
        raise InvalidSiteError(
            f"Expected a site: a component name such as 'resid_pre' or a mechkit Site; got "
            f"{type(site).__name__}."
        )
    if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int)):
        raise InvalidSiteError(f"Expected an int layer (or a Site); got {layer!r}.")
    return Site(site, layer=layer)  # type: ignore[arg-type]
