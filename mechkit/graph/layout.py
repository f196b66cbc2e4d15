"""The computational graph of a transformer as senders, receivers and edges.

Senders write into the residual stream, receivers read from it (Elhage et al. 2021; Conmy et al.
2023; Syed et al. 2023). Names follow the package's one scheme (:mod:`mechkit.core.names`):

==================  ==========================================================================
``input``           the embeddings (token plus positional): the residual entering block 0
``L{L}H{H}``        attention head H of layer L (its output ``z_H @ W_O[H]``)
``L{L}.mlp``        the MLP of layer L (sender: its output; receiver: its input)
``L{L}H{H}.q``      the query input of head H (receiver)
``L{L}H{G}.k``,     the key and value inputs of key/value head G (receivers); in grouped-query
``L{L}H{G}.v``      models G counts key/value heads, shared by query heads G*r .. G*r + r - 1
``logits``          the final residual stream, read by the unembedding (receiver)
==================  ==========================================================================

An edge ``u -> v`` (``"L0H3->L2H1.q"``) exists when the sender ``u`` comes before the receiver
``v`` in the forward pass: the input feeds everything; a head of layer L feeds the MLP of layer L
(unless attention and MLP run in parallel) and every receiver of later layers. Names typed by a
user are read with :func:`~mechkit.core.names.parse_node`, so EAP-IG's (``a0.h3->a2.h1<q>``) and
the older mechkit names (``a0.h3->a2.h1q``, ``m2``) find the same edges.

Example:
    >>> layout = GraphLayout.from_model(mk.load_model("attn-only-2l"))
    >>> len(layout.senders), len(layout.receivers), layout.n_edges
    (9, 25, 81)
    >>> layout.edge_index("a0.h3->a1.h1q") == layout.edge_index("L0H3->L1H1.q")
    True
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
from typing import Any, Literal

import torch
from jaxtyping import Bool
from torch import Tensor

from mechkit.core.names import head_name, mlp_name, parse_node, to_eap_ig
from mechkit.core.types import Model
from mechkit.errors import (
    InvalidArgumentError,
    InvalidSiteError,
    SiteNotFoundError,
    UnsupportedModelError,
    did_you_mean,
)

__all__ = ["Node", "Edge", "Receiver", "GraphLayout", "LayoutNaming"]

NodeKind = Literal["input", "head", "mlp", "latent", "error", "logits"]


@dataclasses.dataclass(frozen=True)
class Node:
    """A component of the graph: ``input``, ``L{L}H{H}``, ``L{L}.mlp`` or ``logits`` (in a
    sparse feature circuit also a latent or an error term).

    Example:
        >>> layout = GraphLayout.build(n_layers=1, n_heads=2, n_kv_heads=2, d_model=4, has_mlp=True)
        >>> layout.senders[1]
        Node(name='L0H0', kind='head', layer=0, head=0)
    """

    name: str
    kind: NodeKind
    layer: int | None = None
    head: int | None = None


@dataclasses.dataclass(frozen=True)
class Receiver:
    """An input read from the residual stream: ``L{L}H{H}.q|k|v``, ``L{L}.mlp`` or ``logits``.

    Attributes:
        kind: ``q``, ``k``, ``v``, ``mlp`` or ``logits``.
        head: the query head (q) or key/value head (k, v).
        nodes: the nodes this input feeds (a shared key/value head feeds several heads).

    Example:
        >>> layout = GraphLayout.build(n_layers=1, n_heads=2, n_kv_heads=1, d_model=4,
        ...                            has_mlp=False)
        >>> layout.receivers[2]
        Receiver(name='L0H0.k', kind='k', layer=0, head=0, nodes=('L0H0', 'L0H1'))
    """

    name: str
    kind: Literal["q", "k", "v", "mlp", "latent", "error", "logits"]
    layer: int | None
    head: int | None
    nodes: tuple[str, ...]


def _canonical(name: str) -> str:
    """A model-graph name in the one scheme (peers' and old names converted); a name no scheme
    reads (a feature circuit's ``r3.f12``) unchanged."""
    try:
        return str(parse_node(name))
    except InvalidArgumentError:
        return name


def _older_spelling(name: str) -> str:
    """The pre-scheme mechkit name of a node (``a1.h1k``, ``m3``), or the name itself."""
    try:
        return to_eap_ig(name).replace("<", "").replace(">", "")
    except InvalidArgumentError:
        return name


@dataclasses.dataclass(frozen=True)
class Edge:
    """A path from a sender to a receiver. Names are written in the one scheme (EAP-IG's and the
    older mechkit names are converted).

    Example:
        >>> Edge("a0.h1", "a1.h0q"), Edge.parse("L0H1->L1.mlp").name
        (Edge(src='L0H1', dst='L1H0.q'), 'L0H1->L1.mlp')
    """

    src: str
    dst: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "src", _canonical(self.src.strip()))
        object.__setattr__(self, "dst", _canonical(self.dst.strip()))

    @property
    def name(self) -> str:
        return f"{self.src}->{self.dst}"

    @classmethod
    def parse(cls, name: str) -> Edge:
        src, sep, dst = name.partition("->") if isinstance(name, str) else ("", "", "")
        if not sep or not src.strip() or not dst.strip():
            raise InvalidArgumentError(
                f"Expected an edge name 'sender->receiver' (e.g. 'L0H1->L1H0.q'); got {name!r}."
            )
        return cls(src, dst)


class LayoutNaming:
    """Name lookups shared by every layout: ``senders``, ``receivers`` and ``valid``.

    Example:
        >>> layout = GraphLayout.build(n_layers=1, n_heads=2, n_kv_heads=2, d_model=4,
        ...                            has_mlp=True)
        >>> layout.sender_index("L0.mlp"), layout.sender_index("m0")  # the old name too
        (3, 3)
    """

    senders: tuple[Node, ...]
    receivers: tuple[Receiver, ...]
    valid: Bool[Tensor, "sender receiver"]
    sender_hint = "input, L{L}H{H}, L{L}.mlp"
    receiver_hint = "L{L}H{H}.q|.k|.v, L{L}.mlp, logits"

    @property
    def n_edges(self) -> int:
        return int(self.valid.sum())

    @property
    def nodes(self) -> tuple[str, ...]:
        """Every node name: the senders, then ``logits``."""
        return tuple(n.name for n in self.senders) + ("logits",)

    def canonical(self, name: str) -> str:
        """The layout's own spelling of a node name a user typed."""
        return _canonical(name)

    def sender_index(self, name: str) -> int:
        index = self._sender_map.get(self.canonical(name))
        if index is None:
            raise SiteNotFoundError(
                f"Expected a sender node ({self.sender_hint}); got {name!r}."
                + self._suggest(name, list(self._sender_map))
            )
        return index

    def receiver_index(self, name: str) -> int:
        index = self._receiver_map.get(self.canonical(name))
        if index is None:
            raise SiteNotFoundError(
                f"Expected a receiver ({self.receiver_hint}); got {name!r}."
                + self._suggest(name, list(self._receiver_map))
            )
        return index

    def _suggest(self, name: str, names: list[str]) -> str:
        """ "Did you mean" with the closest names; a mistyped older name (``a1.h1x``) is compared
        with the names in that older spelling and answered in the new one."""
        hint = did_you_mean(self.canonical(name), names)
        if hint:
            return hint
        old = {_older_spelling(n): n for n in names}
        matches = difflib.get_close_matches(name, list(old), n=3, cutoff=0.6)
        return (
            " Did you mean " + " or ".join(repr(old[m]) for m in matches) + "?" if matches else ""
        )

    def edge_index(self, edge: Edge | str) -> tuple[int, int]:
        """``(sender, receiver)`` indices of an edge; unknown or impossible edges raise."""
        edge = Edge.parse(edge) if isinstance(edge, str) else edge
        s, r = self.sender_index(edge.src), self.receiver_index(edge.dst)
        if not bool(self.valid[s, r]):
            raise InvalidSiteError(
                f"Expected an edge that exists in the forward pass; {edge.name!r} goes from a "
                "later component to an earlier one (or within one layer's attention, or past a "
                "dictionary that replaces the whole residual stream)."
            )
        return s, r

    def edge_names(self, mask: Bool[Tensor, "sender receiver"] | None = None) -> list[str]:
        """The names of the edges where ``mask`` (default: ``valid``) is True, in index order."""
        mask = self.valid if mask is None else mask & self.valid
        return [
            f"{self.senders[s].name}->{self.receivers[r].name}" for s, r in mask.nonzero().tolist()
        ]

    @functools.cached_property
    def _sender_map(self) -> dict[str, int]:
        return {n.name: i for i, n in enumerate(self.senders)}

    @functools.cached_property
    def _receiver_map(self) -> dict[str, int]:
        return {r.name: i for i, r in enumerate(self.receivers)}

    def sender_order(self, sender: int) -> float:
        """Forward-order rank of a sender (the input first): receivers of a sender come later."""
        node = self.senders[sender]
        if node.kind == "input":
            return -1.0
        assert node.layer is not None  # every sender but the input has a layer
        return 2.0 * node.layer + (1.0 if node.kind == "mlp" else 0.0)

    def rank(self, name: str) -> int:
        """The row a node is drawn in: -1 for the input, the layer, ``n_rows`` for the logits."""
        if name == "input":
            return -1
        if name == "logits":
            return self.n_rows
        layer = self.senders[self.sender_index(name)].layer
        assert layer is not None  # every sender but the input has a layer
        return layer

    @property
    def n_rows(self) -> int:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True, eq=False)
class GraphLayout(LayoutNaming):
    """Senders, receivers and which edges exist, for one model architecture.

    Attributes:
        n_layers, n_heads, n_kv_heads, d_model: the model's sizes.
        has_mlp: whether blocks have MLPs; parallel: attention and MLP read the same residual.
        senders: sender nodes in forward order (``input`` first).
        receivers: receivers in forward order (``logits`` last).
        valid: ``(sender, receiver)`` bool, True where the edge exists.

    Example:
        >>> layout = GraphLayout.build(n_layers=2, n_heads=2, n_kv_heads=1, d_model=8,
        ...                            has_mlp=True)
        >>> [r.name for r in layout.receivers[:5]]
        ['L0H0.q', 'L0H1.q', 'L0H0.k', 'L0H0.v', 'L0.mlp']
    """

    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    has_mlp: bool
    parallel: bool
    senders: tuple[Node, ...]
    receivers: tuple[Receiver, ...]
    valid: Bool[Tensor, "sender receiver"]

    @classmethod
    def from_model(cls, model: Model) -> GraphLayout:
        """The graph of a HookedTransformer; refuses architectures whose residual stream is not
        a plain sum of head and MLP outputs."""
        cfg = model.cfg
        if getattr(cfg, "use_normalization_before_and_after", False):
            raise UnsupportedModelError(
                f"Expected a model whose attention and MLP outputs add to the residual stream "
                f"directly; {cfg.model_name} normalizes them first (use_normalization_before_"
                "and_after), so head outputs are not separate edges. Hint: use smollm2-135m or "
                "another pre-norm model."
            )
        if cfg.original_architecture in ("OPTForCausalLM",) or getattr(cfg, "post_norm", False):
            raise UnsupportedModelError(f"Expected a pre-norm model; got {cfg.model_name}.")
        return cls.build(
            n_layers=cfg.n_layers,
            n_heads=cfg.n_heads,
            n_kv_heads=cfg.n_key_value_heads or cfg.n_heads,
            d_model=cfg.d_model,
            has_mlp=not cfg.attn_only,
            parallel=bool(getattr(cfg, "parallel_attn_mlp", False)),
        )

    @classmethod
    def build(
        cls,
        *,
        n_layers: int,
        n_heads: int,
        n_kv_heads: int,
        d_model: int,
        has_mlp: bool,
        parallel: bool = False,
    ) -> GraphLayout:
        """The graph from sizes alone (also used to read a saved graph back)."""
        if n_heads % n_kv_heads:
            raise UnsupportedModelError(
                f"Expected n_heads ({n_heads}) to be a multiple of n_kv_heads ({n_kv_heads})."
            )
        group = n_heads // n_kv_heads
        senders: list[Node] = [Node("input", "input")]
        order_s: list[float] = [-1.0]  # forward order: heads of L at 2L, the MLP of L at 2L+1
        receivers: list[Receiver] = []
        order_r: list[float] = []
        for layer in range(n_layers):
            for head in range(n_heads):
                senders.append(Node(head_name(layer, head), "head", layer, head))
                order_s.append(2 * layer)
            for head in range(n_heads):
                name = head_name(layer, head, "q")
                receivers.append(Receiver(name, "q", layer, head, (head_name(layer, head),)))
                order_r.append(2 * layer)
            kinds: tuple[Literal["k"], Literal["v"]] = ("k", "v")
            for kind in kinds:
                for kv in range(n_kv_heads):
                    fed = tuple(head_name(layer, h) for h in range(kv * group, (kv + 1) * group))
                    name = head_name(layer, kv, kind)
                    receivers.append(Receiver(name, kind, layer, kv, fed))
                    order_r.append(2 * layer)
            if has_mlp:
                senders.append(Node(mlp_name(layer), "mlp", layer))
                order_s.append(2 * layer + 1)
                receivers.append(Receiver(mlp_name(layer), "mlp", layer, None, (mlp_name(layer),)))
                order_r.append(2 * layer if parallel else 2 * layer + 1)
        receivers.append(Receiver("logits", "logits", None, None, ("logits",)))
        order_r.append(float("inf"))
        valid = torch.tensor(order_s)[:, None] < torch.tensor(order_r)[None, :]
        return cls(
            n_layers, n_heads, n_kv_heads, d_model, has_mlp, parallel,
            tuple(senders), tuple(receivers), valid,
        )  # fmt: skip

    @property
    def n_rows(self) -> int:
        return self.n_layers

    def row_labels(self) -> list[str]:
        """Labels of the drawn rows, bottom to top: the input, each layer, the logits."""
        return ["input"] + [f"L{i}" for i in range(self.n_layers)] + ["logits"]

    def positions(self) -> dict[str, tuple[float, float]]:
        """Node coordinates: one row per layer (input at the bottom, logits on top), heads by
        index and the MLP to their right."""
        width = self.n_heads + (1 if self.has_mlp else 0)
        pos = {"input": ((width - 1) / 2, 0.0), "logits": ((width - 1) / 2, self.n_layers + 1)}
        for node in self.senders[1:]:
            assert node.layer is not None  # every sender but the input has a layer
            x = float(node.head or 0) if node.kind == "head" else float(self.n_heads)
            pos[node.name] = (x, node.layer + 1.0)
        return pos

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "d_model": self.d_model,
            "has_mlp": self.has_mlp,
            "parallel": self.parallel,
        }

    def same_as(self, other: object) -> bool:
        """Whether ``other`` is the graph of a model of the same shape."""
        return isinstance(other, GraphLayout) and self.to_dict() == other.to_dict()
