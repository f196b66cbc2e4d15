"""Residual-stream decomposition and direct logit attribution (Elhage et al. 2021).

The residual stream before block ``L`` is a sum of what wrote into it::

    resid_pre[L] = embed (+ pos_embed) + sum_{l<L} ( sum_h z[l,h] W_O[l,h] + b_O[l]
                                                     + mlp_neurons[l] + b_out[l] )

:func:`decompose_resid` returns those parts: the embedding, each attention head (its share
``z W_O`` from ``hook_z``), each layer's attention output bias, each MLP (its neurons,
``mlp_out - b_out``) and the remaining biases (the MLP output biases, summed). They add up to
the residual (tested to 1e-4).

:func:`direct_logit_attribution` projects each part onto a logit, a logit difference or any
direction through the final normalization **with its scale frozen at the value of the run**
(the standard linearisation: the scale is a property of the whole residual, not of a part).
With ``divide_by_scale=True`` (the default) the contributions, plus the unembedding bias, sum
exactly to the model's final logit (difference); with False they are raw dot products with the
direction, which do not sum to the logits but compare parts across prompts of different norm.
:func:`neuron_attribution` does the same for the neurons of one MLP layer without building a
``[d_mlp, d_model]`` tensor per position.

Parts are named in the one scheme of :mod:`mechkit.core.names`: ``L9H6`` (a head), ``L9.mlp``,
``L9N123`` (a neuron), plus ``embed``, ``pos_embed``, ``L9.attn_bias`` (block 9's attention
output bias), ``mlp_biases``, ``ln_final_bias`` and ``unembed_bias``; ``.score(name)`` also reads
the older and the peers' names (``a9.h6``, ``m9``).

Example:
    >>> model = mk.load_model("attn-only-2l")
    >>> dla = mk.direct_logit_attribution(model, torch.tensor([[1, 2, 3]]), answer=[5], wrong=[6])
    >>> dla.values.shape, dla.labels[:3]     # (component, batch)
    (torch.Size([13, 1]), ('embed', 'pos_embed', 'L0H0'))
    >>> bool(torch.allclose(dla.values.sum(0), dla.total, atol=1e-4))
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, cast

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechkit.core.names import head_name, mlp_name, neuron_name, parse_node
from mechkit.core.results import rank
from mechkit.core.types import Model
from mechkit.errors import InvalidArgumentError, InvalidSiteError, ShapeError
from mechkit.hook_scope import run_with_cache
from mechkit.prompts import PromptPairs
from mechkit.sites import Site
from mechkit.tokens import token_batch, tokenize_answer

Prompts = str | Sequence[str] | Int[Tensor, "batch pos"] | PromptPairs
"""What the functions here take as prompts: text, texts (right-padded), ids, or PromptPairs."""

__all__ = [
    "ResidualDecomposition",
    "Attribution",
    "decompose_resid",
    "direct_logit_attribution",
    "neuron_attribution",
]


@dataclasses.dataclass(frozen=True, eq=False)
class ResidualDecomposition:
    """The parts of the residual stream before block ``layer`` (``n_layers``: the final one).

    Attributes:
        labels: one per part: ``embed``, ``pos_embed``, ``L{l}H{h}``, ``L{l}.attn_bias``,
            ``L{l}.mlp``, ``mlp_biases``.
        kinds: ``embed``, ``pos_embed``, ``head``, ``attn_bias``, ``mlp``, ``bias`` per part.
        layers, heads: the layer and head of each part (None where it has none).
        parts: ``(component, batch, pos, d_model)``, or ``(component, batch, d_model)`` when
            positions were chosen.
        resid: the residual itself, same layout without the component axis.
        scale: the final normalization's scale from the run, ``(batch, pos, 1)`` or
            ``(batch, 1)``.
        layer: the block the residual enters (``n_layers`` for the final residual).

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> dec = mk.decompose_resid(model, torch.tensor([[1, 2, 3]]))
        >>> dec.parts.shape, dec.part("L1H0").shape          # (component, batch, pos, d_model)
        (torch.Size([12, 1, 3, 128]), torch.Size([1, 3, 128]))
    """

    labels: tuple[str, ...]
    kinds: tuple[str, ...]
    layers: tuple[int | None, ...]
    heads: tuple[int | None, ...]
    parts: Float[Tensor, "component batch *pos d_model"]
    resid: Float[Tensor, "batch *pos d_model"]
    scale: Float[Tensor, "batch *pos 1"] | None
    layer: int

    @property
    def mean_norm(self) -> Float[Tensor, " component"]:
        """Each part's norm, averaged over prompts (and positions)."""
        return self.parts.norm(dim=-1).flatten(1).mean(-1)

    def part(self, name: str) -> Tensor:
        """The part named ``name`` (``"L3H5"``, ``"L2.mlp"``, ``"embed"``; peers' names such as
        ``"a3.h5"`` or ``"m2"`` are read too), ``(batch, [pos,] d_model)``."""
        return self.parts[_index(self.labels, name)]

    def top(self, n: int = 10, *, absolute: bool = True) -> list[tuple[str, float]]:
        """The ``n`` parts with the largest mean norm, ``(label, mean norm)``, by
        :func:`mechkit.core.rank` (norms are never negative, so ``absolute`` changes nothing)."""
        return rank(list(self.labels), self.mean_norm, n, absolute=absolute)

    def plot(self) -> Any:
        """A bar chart of each part's mean norm."""
        import plotly.graph_objects as go

        fig = go.Figure(go.Bar(x=list(self.labels), y=self.mean_norm.tolist()))
        fig.update_layout(
            title=f"Parts of the residual stream before block {self.layer}",
            xaxis_title="part",
            yaxis_title="mean norm",
        )
        return fig

    def to_dataframe(self) -> Any:
        """One row per part: its label, kind, layer, head and mean norm over prompts/positions."""
        import pandas as pd

        norms = self.mean_norm
        return pd.DataFrame(
            {
                "label": self.labels,
                "kind": self.kinds,
                "layer": self.layers,
                "head": self.heads,
                "mean_norm": norms.tolist(),
            }
        )


@dataclasses.dataclass(frozen=True, eq=False)
class Attribution:
    """Per-part contributions to a logit, logit difference or direction, per prompt.

    Attributes:
        labels, kinds, layers, heads: as in :class:`ResidualDecomposition` (plus
            ``unembed_bias`` for DLA, or ``L{l}N{n}`` neurons for :func:`neuron_attribution`).
        values: ``(component, batch)`` each part's contribution for each prompt.
        target: what was attributed, in words.
        divide_by_scale: whether the final norm's frozen scale was applied.
        total: ``(batch,)`` the model's own value of the target (logit, difference or
            projection), for comparison with ``values.sum(0)``.
        n_layers, n_heads: the model's sizes (for the head heatmap).

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> dla = mk.direct_logit_attribution(model, torch.tensor([[1, 2, 3]]), answer=5, wrong=6)
        >>> dla.values.shape, dla.head_scores().shape        # (component, batch), (layer, head)
        (torch.Size([13, 1]), torch.Size([2, 4]))
    """

    labels: tuple[str, ...]
    kinds: tuple[str, ...]
    layers: tuple[int | None, ...]
    heads: tuple[int | None, ...]
    values: Float[Tensor, "component batch"]
    target: str
    divide_by_scale: bool
    total: Float[Tensor, " batch"]
    n_layers: int
    n_heads: int

    @property
    def mean(self) -> Float[Tensor, " component"]:
        """The mean contribution over prompts."""
        return self.values.mean(-1)

    def top(self, n: int = 10, *, absolute: bool = True) -> list[tuple[str, float]]:
        """The ``n`` parts with the largest mean contribution, ``(label, mean)``, ranked by
        :func:`mechkit.core.rank`: by its size when ``absolute``, else the most positive first."""
        return rank(list(self.labels), self.mean, n, absolute=absolute)

    def score(self, name: str) -> float:
        """The mean contribution of the part named ``name`` (``"L3H5"``, ``"L2.mlp"``,
        ``"L2N7"``, ``"unembed_bias"``; peers' names such as ``"a3.h5"`` or ``"m2"`` too)."""
        return float(self.mean[_index(self.labels, name)])

    def head_scores(self) -> Float[Tensor, "layer head"]:
        """The heads' mean contributions as a ``(layer, head)`` grid (0 for absent heads)."""
        grid = torch.zeros(self.n_layers, self.n_heads)
        for i, kind in enumerate(self.kinds):
            if kind == "head":
                grid[self.layers[i], self.heads[i]] = self.mean[i]
        return grid

    def to_dataframe(self) -> Any:
        """One row per part: label, kind, layer, head, mean and std over prompts."""
        import pandas as pd

        std = self.values.std(-1) if self.values.shape[1] > 1 else torch.zeros(len(self.labels))
        return pd.DataFrame(
            {
                "label": self.labels,
                "kind": self.kinds,
                "layer": self.layers,
                "head": self.heads,
                "mean": self.mean.tolist(),
                "std": std.tolist(),
            }
        )

    def plot(self) -> Any:
        """A layer x head heatmap of the heads, and a bar chart of every other part."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        grid = self.head_scores()
        bound = float(grid.abs().max()) or 1.0
        others = [i for i, k in enumerate(self.kinds) if k != "head"]
        fig = make_subplots(
            rows=1,
            cols=2,
            column_widths=[0.6, 0.4],
            subplot_titles=("attention heads", "other parts"),
        )
        fig.add_trace(
            go.Heatmap(
                z=grid.numpy(),
                x=[f"H{h}" for h in range(self.n_heads)],
                y=[f"L{layer}" for layer in range(self.n_layers)],
                colorscale="RdBu",
                zmid=0,
                zmin=-bound,
                zmax=bound,
                colorbar={"x": 0.55},
                hovertemplate="%{y}%{x}: %{z:.3f}<extra></extra>",
            ),
            row=1,
            col=1,
        )
        fig.add_trace(
            go.Bar(
                x=[float(self.mean[i]) for i in others],
                y=[self.labels[i] for i in others],
                orientation="h",
                showlegend=False,
            ),
            row=1,
            col=2,
        )
        fig.update_layout(
            title=f"Direct attribution to {self.target}",
            height=max(450, 16 * max(self.n_layers, len(others)) + 150),
        )
        fig.update_yaxes(autorange="reversed", row=1, col=1)
        return fig


def _index(labels: Sequence[str], name: str) -> int:
    """The index of the part named ``name``: a label as written, or a node name in any scheme
    :func:`~mechkit.core.parse_node` reads, written in ours."""
    if name in labels:
        return list(labels).index(name)
    try:
        ours = str(parse_node(name))
    except InvalidArgumentError:
        ours = name
    if ours in labels:
        return list(labels).index(ours)
    shown = ", ".join(list(labels)[:6])
    raise InvalidArgumentError(
        f"Expected the name of a part ({shown}, ...); got {name!r}. Hint: .labels lists them."
    )


def _block(model: Model, layer: int | Site | None, components: Sequence[str]) -> int | None:
    """The block index of a ``layer`` argument given as an int or a Site of ``components``."""
    if not isinstance(layer, Site):
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int)):
            raise InvalidSiteError(f"Expected an int layer or a Site; got {layer!r}.")
        return layer
    if layer.component not in components or layer.layer is None:
        raise InvalidSiteError(
            f"Expected a Site of {', '.join(components)} at one layer; got {layer!r}."
        )
    index = layer.resolve(model).layer
    assert index is not None  # a resolved site of these components has a layer
    return index + 1 if layer.component == "resid_post" else index


def _positions(mask: Tensor, positions: Any) -> Tensor | None:
    """``(batch,)`` positions (negative ones counted from each row's last real token)."""
    if positions is None:
        return None
    lengths = mask.sum(-1)
    pos = torch.as_tensor(positions, dtype=torch.long)
    if pos.ndim == 0:
        pos = pos.expand(mask.shape[0])
    if pos.shape != (mask.shape[0],):
        raise ShapeError(
            f"Expected one position, or one per prompt ({mask.shape[0]},); got {tuple(pos.shape)}."
        )
    pos = torch.where(pos < 0, lengths + pos, pos)
    if bool((pos < 0).any() or (pos >= lengths).any()):
        raise ShapeError(f"Expected positions inside each prompt (lengths {lengths.tolist()}).")
    return pos


@torch.no_grad()
def decompose_resid(
    model: Model,
    tokens: Prompts,
    *,
    layer: int | Site | None = None,
    positions: Any = None,
    prepend_bos: bool | None = None,
) -> ResidualDecomposition:
    """Split the residual stream before block ``layer`` into the parts that wrote it.

    Args:
        model: a HookedTransformer.
        tokens: a string, list of strings (right-padded), ``(batch, pos)`` ids (taken as
            unpadded), or a :class:`~mechkit.prompts.PromptPairs` (its clean prompts).
        layer: the block whose input to decompose; None (or ``n_layers``) means the final
            residual stream, the input of the final norm. A Site is read as the residual it
            names: ``Site("resid_pre", layer=3)`` is layer 3, ``Site("resid_post", layer=3)``
            layer 4.
        positions: None for all positions; an int or one per prompt to keep only those
            (negative values count back from each prompt's last real token).
        prepend_bos: for string input; None means the model's default.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> dec = decompose_resid(model, torch.tensor([[1, 2, 3]]), layer=1, positions=-1)
        >>> dec.parts.shape, dec.labels[:4]  # (component, batch, d_model): embed, heads, bias
        (torch.Size([7, 1, 128]), ('embed', 'pos_embed', 'L0H0', 'L0H1'))
        >>> bool(torch.allclose(dec.parts.sum(0), dec.resid, atol=1e-4))
        True
    """
    block = _block(model, layer, ("resid_pre", "resid_post"))
    tok, mask = (
        (tokens.clean_tokens, tokens.clean_mask)
        if isinstance(tokens, PromptPairs)
        else token_batch(model, tokens, prepend_bos)
    )
    return _decompose(model, tok, mask, block, positions)


def _decompose(
    model: Model, tok: Tensor, mask: Tensor, layer: int | None, positions: Any
) -> ResidualDecomposition:
    cfg = model.cfg
    n_layers = cfg.n_layers
    layer = n_layers if layer is None else layer
    if not 0 <= layer <= n_layers:
        raise InvalidSiteError(
            f"Expected a layer in [0, {n_layers}] ({n_layers} means the final residual); got "
            f"{layer}."
        )
    pos = _positions(mask, positions)
    resid_name = (
        f"blocks.{layer}.hook_resid_pre"
        if layer < n_layers
        else f"blocks.{n_layers - 1}.hook_resid_post"
    )
    names = {"hook_embed", "hook_pos_embed", "ln_final.hook_scale", resid_name}
    for i in range(layer):
        names |= {f"blocks.{i}.attn.hook_z", f"blocks.{i}.hook_mlp_out"}
    _, cache = run_with_cache(model, tok.to(cfg.device), names_filter=lambda n: n in names)

    def at(x: Tensor) -> Tensor:  # (batch, pos, ...) -> (batch, ...) at the chosen positions
        return x if pos is None else x[torch.arange(x.shape[0]), pos.to(x.device)]

    labels: list[str] = []
    kinds: list[str] = []
    layers: list[int | None] = []
    heads: list[int | None] = []
    parts: list[Tensor] = []

    def add(label: str, kind: str, part: Tensor, lay: int | None = None, head: int | None = None):
        labels.append(label)
        kinds.append(kind)
        layers.append(lay)
        heads.append(head)
        parts.append(part)

    resid = at(cache[resid_name])
    add("embed", "embed", at(cache["hook_embed"]))
    if "hook_pos_embed" in cache:
        add("pos_embed", "pos_embed", at(cache["hook_pos_embed"]))
    mlp_bias = torch.zeros(cfg.d_model, device=resid.device, dtype=resid.dtype)
    for i in range(layer):
        z = at(cache[f"blocks.{i}.attn.hook_z"])  # (batch, [pos,] head, d_head)
        # (head, batch, [pos,] d_model)
        per_head = torch.einsum("...hd,hdm->h...m", z, model.blocks[i].attn.W_O)
        for h in range(cfg.n_heads):
            add(head_name(i, h), "head", per_head[h], i, h)
        add(f"L{i}.attn_bias", "attn_bias", model.b_O[i].expand_as(resid), i)
        if not cfg.attn_only:
            b_out = cast(Tensor, model.blocks[i].mlp.b_out)  # (d_model,)
            add(mlp_name(i), "mlp", at(cache[f"blocks.{i}.hook_mlp_out"]) - b_out, i)
            mlp_bias = mlp_bias + b_out
    if not cfg.attn_only and layer > 0:
        add("mlp_biases", "bias", mlp_bias.expand_as(resid))
    return ResidualDecomposition(
        labels=tuple(labels),
        kinds=tuple(kinds),
        layers=tuple(layers),
        heads=tuple(heads),
        parts=torch.stack(parts),
        resid=resid,
        scale=at(cache["ln_final.hook_scale"]) if "ln_final.hook_scale" in cache else None,
        layer=layer,
    )


def _frozen_final_norm(model: Model, x: Tensor, scale: Tensor | None, divide: bool) -> Tensor:
    """The final norm as a linear map, with the run's scale frozen: centring (LayerNorm),
    division by the scale, and the norm's own weight when it was not folded."""
    kind = model.cfg.normalization_type
    if kind in ("LN", "LNPre"):
        x = x - x.mean(-1, keepdim=True)
    if divide and kind is not None and scale is not None:
        x = x / scale
    w = getattr(model.ln_final, "w", None)
    return x * w if w is not None else x


def _direction(model: Model, n_batch: int, answer: Any, wrong: Any, direction: Any):
    """The residual-space direction per prompt, ``(batch, d_model)``, and words for it."""

    def ids(x: Any) -> Tensor:
        if isinstance(x, str):
            x = [x]
        if isinstance(x, list | tuple):
            x = [tokenize_answer(model, t) if isinstance(t, str) else int(t) for t in x]
        t = torch.as_tensor(x, dtype=torch.long).reshape(-1)
        return t.expand(n_batch) if t.numel() == 1 else t

    if direction is not None:
        if answer is not None or wrong is not None:
            raise InvalidArgumentError(
                "Expected either answer/wrong tokens or a direction, not both."
            )
        d = torch.as_tensor(direction, dtype=model.W_U.dtype, device=model.W_U.device)
        d = d.expand(n_batch, -1) if d.ndim == 1 else d
        if d.shape != (n_batch, model.cfg.d_model):
            raise ShapeError(
                f"Expected a direction of shape (d_model,) = ({model.cfg.d_model},) or (batch, "
                f"d_model); got {tuple(d.shape)}."
            )
        return d, None, "a residual direction"
    if answer is None:
        raise InvalidArgumentError(
            "Expected a target: answer (and wrong) tokens, or a direction. Hint: pass a "
            "PromptPairs to attribute its logit differences."
        )
    a = ids(answer).to(model.W_U.device)
    u = model.W_U[:, a].T  # (batch, d_model)
    bias = model.b_U[a]
    what = "logit(answer)"
    if wrong is not None:
        w = ids(wrong).to(model.W_U.device)
        u = u - model.W_U[:, w].T
        bias = bias - model.b_U[w]
        what = "logit(answer) - logit(wrong)"
    if u.shape[0] != n_batch:
        raise ShapeError(f"Expected one answer per prompt ({n_batch}); got {u.shape[0]}.")
    return u, bias, what


def _target_inputs(
    model: Model,
    tokens: Prompts,
    answer: Any,
    wrong: Any,
    direction: Any,
    positions: Any,
    prepend_bos: bool | None,
) -> tuple[Tensor, Tensor, Any, Any, Any]:
    """Tokens, mask, answers and positions; a PromptPairs supplies whichever were not given."""
    if not isinstance(tokens, PromptPairs):
        return (*token_batch(model, tokens, prepend_bos), answer, wrong, positions)
    pairs = tokens
    if direction is None:
        answer = pairs.answer if answer is None else answer
        wrong = pairs.wrong if wrong is None else wrong
    if isinstance(positions, int) and positions == -1:
        positions = pairs.answer_positions()
    return pairs.clean_tokens, pairs.clean_mask, answer, wrong, positions


@torch.no_grad()
def direct_logit_attribution(
    model: Model,
    tokens: Prompts,
    *,
    answer: Any = None,
    wrong: Any = None,
    direction: Any = None,
    positions: Any = -1,
    layer: int | Site | None = None,
    divide_by_scale: bool = True,
    prepend_bos: bool | None = None,
) -> Attribution:
    """Each part's direct contribution to a logit, a logit difference, or a direction.

    Args:
        model: a HookedTransformer.
        tokens: a :class:`~mechkit.prompts.PromptPairs` (its clean prompts, answers, wrong
            answers and answer positions are used), a string, list of strings or token ids.
        answer, wrong: token strings or ids (one, or one per prompt); with ``wrong`` the target
            is the logit difference.
        direction: instead of tokens, a residual-space direction ``(d_model,)`` or
            ``(batch, d_model)``.
        positions: where to attribute: -1 (each prompt's last real token), an int, or one per
            prompt.
        layer: attribute the parts of the residual before this block (None: the final one), or
            a residual Site (as in :func:`decompose_resid`).
        divide_by_scale: apply the final norm's scale frozen from the run (see module doc).

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> dla = direct_logit_attribution(model, torch.tensor([[1, 2, 3]]), answer=5, wrong=6)
        >>> dla.target, len(dla.top(3)), dla.score("a1.h0") == dla.score("L1H0")
        ('logit(answer) - logit(wrong)', 3, True)
    """
    block = _block(model, layer, ("resid_pre", "resid_post"))
    tok, mask, answer, wrong, positions = _target_inputs(
        model, tokens, answer, wrong, direction, positions, prepend_bos
    )
    dec = _decompose(model, tok, mask, block, positions)  # parts: (component, batch, d_model)
    u, bias, what = _direction(model, tok.shape[0], answer, wrong, direction)
    normed = _frozen_final_norm(model, dec.parts, dec.scale, divide_by_scale)
    values = (normed * u).sum(-1)  # (component, batch)
    labels, kinds = list(dec.labels), list(dec.kinds)
    layers: list[int | None] = list(dec.layers)
    heads: list[int | None] = list(dec.heads)
    final_b = getattr(model.ln_final, "b", None)
    extra = []
    if final_b is not None:
        extra.append(("ln_final_bias", (final_b * u).sum(-1)))
    if bias is not None:
        extra.append(("unembed_bias", bias))
    for label, value in extra:
        labels.append(label)
        kinds.append("bias")
        layers.append(None)
        heads.append(None)
        values = torch.cat([values, value[None].to(values)])
    total = (model.ln_final(dec.resid) * u).sum(-1) + (bias if bias is not None else 0)
    return Attribution(
        labels=tuple(labels),
        kinds=tuple(kinds),
        layers=tuple(layers),
        heads=tuple(heads),
        values=values.cpu(),
        target=what,
        divide_by_scale=divide_by_scale,
        total=total.cpu(),
        n_layers=dec.layer,
        n_heads=model.cfg.n_heads,
    )


@torch.no_grad()
def neuron_attribution(
    model: Model,
    tokens: Prompts,
    layer: int | Site,
    *,
    answer: Any = None,
    wrong: Any = None,
    direction: Any = None,
    positions: Any = -1,
    divide_by_scale: bool = True,
    prepend_bos: bool | None = None,
) -> Attribution:
    """Each neuron of MLP ``layer``: its direct contribution to the target, per prompt.

    Uses ``post[b, n] * (W_out[n] · u_b) / scale_b``: the ``(d_mlp, batch)`` table comes from one
    ``(d_mlp, d_model) @ (d_model, batch)`` product, never a ``[d_mlp, d_model]`` tensor per
    position. The neurons sum to the layer's ``L{layer}.mlp`` part in
    :func:`direct_logit_attribution` (its output bias is not a neuron). ``layer`` is the MLP's
    block, or a Site of it (``Site("mlp_post", layer=3)``); neurons are named ``L3N7``.

    Example:
        >>> model = mk.load_model("smollm2-135m")
        >>> na = neuron_attribution(model, "The cat sat on the", 3, answer=" mat")
        >>> na.values.shape, na.labels[7]  # (d_mlp, batch)
        (torch.Size([1536, 1]), 'L3N7')
    """
    cfg = model.cfg
    if isinstance(layer, Site) and layer.component not in ("mlp_pre", "mlp_post", "mlp_out"):
        raise InvalidSiteError(
            f"Expected a Site of the MLP (mlp_pre, mlp_post, mlp_out); got {layer!r}."
        )
    layer = layer.layer if isinstance(layer, Site) and layer.layer is not None else layer
    if isinstance(layer, Site | bool) or not isinstance(layer, int):
        raise InvalidSiteError(f"Expected an MLP layer (an int) or a Site of it; got {layer!r}.")
    layer = layer % cfg.n_layers if -cfg.n_layers <= layer < 0 else layer
    if cfg.attn_only or not 0 <= layer < cfg.n_layers:
        raise InvalidSiteError(
            f"Expected an MLP layer in [0, {cfg.n_layers}); got {layer}"
            + (" (this model is attention-only)." if cfg.attn_only else ".")
        )
    tok, mask, answer, wrong, positions = _target_inputs(
        model, tokens, answer, wrong, direction, positions, prepend_bos
    )
    pos = _positions(mask, positions)
    post_name = f"blocks.{layer}.mlp.hook_post"
    names = {post_name, "ln_final.hook_scale"}
    _, cache = run_with_cache(model, tok.to(cfg.device), names_filter=lambda n: n in names)
    rows = torch.arange(tok.shape[0])
    post = cache[post_name][rows, pos]  # (batch, d_mlp)
    scale = cache["ln_final.hook_scale"][rows, pos]  # (batch, 1)
    u, _, what = _direction(model, tok.shape[0], answer, wrong, direction)
    w_out = model.blocks[layer].mlp.W_out  # (d_mlp, d_model)
    readout = _frozen_final_norm(model, w_out, None, divide=False) @ u.T  # (d_mlp, batch)
    values = post.T * readout  # (d_mlp, batch)
    if divide_by_scale:
        values = values / scale[:, 0]
    n = values.shape[0]  # d_mlp
    return Attribution(
        labels=tuple(neuron_name(layer, i) for i in range(n)),
        kinds=("neuron",) * n,
        layers=(layer,) * n,
        heads=(None,) * n,
        values=values.cpu(),
        target=what,
        divide_by_scale=divide_by_scale,
        total=values.sum(0).cpu(),
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
    )
