"""The one naming scheme for the model's parts, wherever a user reads or types a name.

=====================  ==========================================================================
``L9H6``               attention head 6 of layer 9 (as a graph sender: its output ``z @ W_O``)
``L9H6.q``             the query input of head 6 (``.k``, ``.v``: key and value inputs; in
                       grouped-query models the head number of ``.k``/``.v`` counts key/value
                       heads)
``L9.attn``            the attention layer of block 9 as a whole
``L9.mlp``             the MLP of block 9 (as a graph sender its output, as a receiver its input)
``L9N123``             neuron 123 of block 9's MLP
``input``, ``logits``  the embeddings and the unembedding
``A->B``               the edge from sender ``A`` to receiver ``B`` (``L0H1->L2H3.q``)
=====================  ==========================================================================

Layers and heads count from 0, as in TransformerLens. :func:`parse_node` also reads the names
of the peers, so their results can be compared with ours: EAP-IG's (Hanna et al.; ``a9.h6``,
``m9``, ``a9.h6<q>``, edges ``a0.h1->a2.h3<q>``), the IOI paper's ``9.6`` and the older mechkit
graph names (``a9.h6q``); :func:`to_eap_ig` writes EAP-IG's.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal

from mechkit.errors import InvalidArgumentError

__all__ = [
    "NodeName",
    "head_name",
    "mlp_name",
    "attn_name",
    "neuron_name",
    "edge_name",
    "parse_node",
    "parse_edge",
    "to_eap_ig",
    "from_eap_ig",
]

Kind = Literal["input", "logits", "head", "attn", "mlp", "neuron"]
Port = Literal["q", "k", "v"]


def head_name(layer: int, head: int, port: Port | None = None) -> str:
    """``"L9H6"`` (or ``"L9H6.q"`` for one of its inputs).

    Example:
        >>> head_name(9, 6), head_name(0, 1, "q")
        ('L9H6', 'L0H1.q')
    """
    return f"L{int(layer)}H{int(head)}" + (f".{port}" if port else "")


def mlp_name(layer: int) -> str:
    """``"L9.mlp"``.

    Example:
        >>> mlp_name(9)
        'L9.mlp'
    """
    return f"L{int(layer)}.mlp"


def attn_name(layer: int) -> str:
    """``"L9.attn"``: the attention layer as a whole.

    Example:
        >>> attn_name(9), parse_node("L9.attn").kind
        ('L9.attn', 'attn')
    """
    return f"L{int(layer)}.attn"


def neuron_name(layer: int, neuron: int) -> str:
    """``"L9N123"``.

    Example:
        >>> neuron_name(9, 123)
        'L9N123'
    """
    return f"L{int(layer)}N{int(neuron)}"


def edge_name(sender: str, receiver: str) -> str:
    """``"sender->receiver"``, each written in the one scheme (peers' names are converted).

    Example:
        >>> edge_name("a0.h1", "a2.h3<q>")
        'L0H1->L2H3.q'
    """
    return f"{parse_node(sender)}->{parse_node(receiver)}"


@dataclasses.dataclass(frozen=True)
class NodeName:
    """A parsed name: ``kind``, ``layer`` and ``head`` (or neuron) where they apply, and the
    ``port`` (q, k, v) of a head's input. ``str()`` writes it in the one scheme.

    Example:
        >>> node = NodeName("head", layer=9, index=6, port="q")
        >>> str(node), node.head, node == parse_node("a9.h6<q>")  # EAP-IG's spelling
        ('L9H6.q', 6, True)
        >>> str(NodeName("mlp", layer=3)), str(NodeName("logits"))
        ('L3.mlp', 'logits')
    """

    kind: Kind
    layer: int | None = None
    index: int | None = None  # the head, or the neuron
    port: Port | None = None

    @property
    def head(self) -> int | None:
        return self.index if self.kind == "head" else None

    def __str__(self) -> str:
        if self.kind in ("input", "logits"):
            return self.kind
        assert self.layer is not None
        if self.kind == "head":
            assert self.index is not None
            return head_name(self.layer, self.index, self.port)
        if self.kind == "neuron":
            assert self.index is not None
            return neuron_name(self.layer, self.index)
        return attn_name(self.layer) if self.kind == "attn" else mlp_name(self.layer)

    def eap_ig(self) -> str:
        """The name in EAP-IG's scheme (``a9.h6``, ``m9``; a head input is ``a9.h6<q>``)."""
        if self.kind in ("input", "logits"):
            return self.kind
        if self.kind == "head":
            return f"a{self.layer}.h{self.index}" + (f"<{self.port}>" if self.port else "")
        if self.kind == "mlp":
            return f"m{self.layer}"
        raise InvalidArgumentError(
            f"Expected a node EAP-IG names (input, a head, an MLP, logits); got {self}. Hint: "
            "EAP-IG has no node for a whole attention layer or a neuron."
        )


_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"L(\d+)H(\d+)(?:\.([qkv]))?"), "head"),
    (re.compile(r"L(\d+)\.mlp"), "mlp"),
    (re.compile(r"L(\d+)\.attn"), "attn"),
    (re.compile(r"L(\d+)N(\d+)"), "neuron"),
    (re.compile(r"a(\d+)\.h(\d+)(?:<([qkv])>|([qkv]))?"), "head"),  # EAP-IG, old mechkit graph
    (re.compile(r"m(\d+)"), "mlp"),  # EAP-IG
    (re.compile(r"(\d+)\.(\d+)"), "head"),  # the IOI paper's 9.6
]

_HINT = "L9H6 (a head), L9H6.q (its query input), L9.mlp, L9.attn, L9N123 (a neuron), input, logits"


def parse_node(name: str | NodeName) -> NodeName:
    """The node a name means, in our scheme or a peer's (module docstring).

    Example:
        >>> parse_node("L9H6"), parse_node("a9.h6<q>").port, str(parse_node("m3"))
        (NodeName(kind='head', layer=9, index=6, port=None), 'q', 'L3.mlp')
    """
    if isinstance(name, NodeName):
        return name
    if not isinstance(name, str):
        raise InvalidArgumentError(
            f"Expected a node name (a string such as 'L9H6'); got {type(name).__name__}."
        )
    text = name.strip()
    if text in ("input", "logits"):
        return NodeName(text)  # type: ignore[arg-type]
    for pattern, kind in _PATTERNS:
        match = pattern.fullmatch(text)
        if match is None:
            continue
        groups = [g for g in match.groups()]
        layer = int(groups[0])
        if kind in ("mlp", "attn"):
            return NodeName(kind, layer)  # type: ignore[arg-type]
        index = int(groups[1])
        port = next((g for g in groups[2:] if g), None)
        return NodeName(kind, layer, index, port)  # type: ignore[arg-type]
    raise InvalidArgumentError(f"Expected a node name such as {_HINT}; got {name!r}.")


def parse_edge(name: str) -> tuple[NodeName, NodeName]:
    """``(sender, receiver)`` of an edge name, ours (``L0H1->L2H3.q``) or EAP-IG's.

    Example:
        >>> [str(n) for n in parse_edge("a0.h1->a2.h3<q>")]
        ['L0H1', 'L2H3.q']
    """
    if not isinstance(name, str) or name.count("->") != 1:
        raise InvalidArgumentError(
            f"Expected an edge name 'sender->receiver' such as 'L0H1->L2H3.q'; got {name!r}."
        )
    sender, receiver = name.split("->")
    return parse_node(sender), parse_node(receiver)


def to_eap_ig(name: str) -> str:
    """A node or edge name in EAP-IG's scheme (``L0H1->L2H3.q`` -> ``a0.h1->a2.h3<q>``).

    Example:
        >>> to_eap_ig("L0H1->L2H3.q"), to_eap_ig("L3.mlp")
        ('a0.h1->a2.h3<q>', 'm3')
    """
    if "->" in name:
        sender, receiver = parse_edge(name)
        return f"{sender.eap_ig()}->{receiver.eap_ig()}"
    return parse_node(name).eap_ig()


def from_eap_ig(name: str) -> str:
    """A node or edge name of EAP-IG (or any scheme :func:`parse_node` reads) in ours.

    Example:
        >>> from_eap_ig("a0.h1->m2"), from_eap_ig("a9.h6")
        ('L0H1->L2.mlp', 'L9H6')
    """
    if "->" in name:
        sender, receiver = parse_edge(name)
        return f"{sender}->{receiver}"
    return str(parse_node(name))
