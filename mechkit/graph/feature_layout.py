"""The graph of a sparse feature circuit: dictionary latents and error terms as nodes.

Marks et al. (2024, "Sparse Feature Circuits") splice sparse dictionaries (SAEs, transcoders)
into a model and treat every latent and every dictionary's reconstruction error as a node. A
:class:`FeatureLayout` names them the way the model graph names heads and MLPs:

==================  ==========================================================================
``input``           the embeddings (the residual entering block 0)
``r12.f345``        latent 345 of the dictionary ``r12`` (an SAE after block 12)
``r12.err``         that dictionary's reconstruction error
``logits``          the output, read by the metric
==================  ==========================================================================

Dictionary names default to the site they reconstruct: ``r{L}`` (``hook_resid_post``),
``r{L}pre``, ``r{L}mid``, ``a{L}`` (``attn.hook_z`` or ``hook_attn_out``), ``m{L}``
(``hook_mlp_out``, and transcoders writing it), ``m{L}post`` (``mlp.hook_post``).

Every dictionary has a place in the forward pass where it reads the residual stream and one
where it writes into it. An edge ``u -> v`` exists when ``u`` writes before ``v`` reads and no
dictionary on the residual stream itself lies between them (that dictionary's nodes carry
everything that passes, so the path is two edges through them).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import torch
from jaxtyping import Bool
from torch import Tensor

from mechkit.errors import InvalidArgumentError, InvalidSiteError
from mechkit.graph.layout import LayoutNaming, Node, Receiver

__all__ = ["DictionarySite", "FeatureLayout", "dictionary_site"]

# (where the site reads the stream, where it writes, is it the stream itself), per hook suffix;
# block L spans 5L-1 (its resid_pre) .. 5L+4 (its resid_post)
_PLACES: dict[str, tuple[float, float, bool]] = {
    "hook_resid_pre": (-1.0, -1.0, True),
    "attn.hook_z": (0.5, 1.0, False),
    "hook_attn_out": (0.5, 1.0, False),
    "hook_resid_mid": (2.0, 2.0, True),
    "ln2.hook_normalized": (2.5, 2.5, False),
    "hook_mlp_in": (2.5, 2.5, False),
    "mlp.hook_post": (2.5, 2.75, False),
    "hook_mlp_out": (2.5, 3.0, False),
    "hook_resid_post": (4.0, 4.0, True),
}
_SPACING = 1.6  # node names like "r18.f2234" are wider than a head's "a9.h6"
_SHORT = {
    "hook_resid_pre": "r{L}pre",
    "attn.hook_z": "a{L}",
    "hook_attn_out": "a{L}",
    "hook_resid_mid": "r{L}mid",
    "mlp.hook_post": "m{L}post",
    "hook_mlp_out": "m{L}",
    "hook_resid_post": "r{L}",
}


@dataclasses.dataclass(frozen=True)
class DictionarySite:
    """Where a dictionary sits: its name, hooks, width and place in the forward pass.

    Example:
        >>> dictionary_site("blocks.3.hook_resid_post", "blocks.3.hook_resid_post", 64, None).name
        'r3'
    """

    name: str
    in_hook: str
    out_hook: str
    d_sae: int
    reads: float
    writes: float
    on_stream: bool  # reconstructs the residual stream itself (blocks every path across it)


def _place(hook: str) -> tuple[float, float, bool]:
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", hook)
    if match is None or match.group(2) not in _PLACES:
        raise InvalidSiteError(
            f"Expected a dictionary on one of the block hooks {sorted(_PLACES)} (e.g. "
            f"'blocks.6.hook_resid_post'); got {hook!r}. Hint: sparse feature circuits place "
            "each dictionary in the forward pass by its hook."
        )
    reads, writes, stream = _PLACES[match.group(2)]
    base = 5.0 * int(match.group(1))
    return base + reads, base + writes, stream


def dictionary_site(in_hook: str, out_hook: str, d_sae: int, name: str | None) -> DictionarySite:
    """The :class:`DictionarySite` of an SAE (``in_hook == out_hook``) or transcoder.

    Example:
        >>> site = dictionary_site("blocks.2.ln2.hook_normalized", "blocks.2.hook_mlp_out", 32,
        ...                        None)
        >>> site.name, site.on_stream
        ('m2', False)
    """
    reads, _, _ = _place(in_hook)
    _, writes, stream = _place(out_hook)
    if in_hook != out_hook:
        stream = False  # a transcoder predicts a block's output from its input
    if name is None:
        match = re.fullmatch(r"blocks\.(\d+)\.(.+)", out_hook)
        assert match is not None  # _place checked the hook above
        layer, suffix = match.groups()
        if suffix not in _SHORT:
            raise InvalidSiteError(
                f"Expected a name for the dictionary writing {out_hook!r} (no short name for "
                "that hook). Hint: pass dictionaries as a dict {name: sae}."
            )
        name = _SHORT[suffix].format(L=layer)
    if not re.fullmatch(r"[A-Za-z][\w]*", name) or name in ("input", "logits"):
        raise InvalidArgumentError(
            f"Expected a dictionary name of letters, digits and '_' (not 'input' or 'logits'); "
            f"got {name!r}."
        )
    return DictionarySite(name, in_hook, out_hook, int(d_sae), reads, writes, stream)


@dataclasses.dataclass(frozen=True, eq=False)
class FeatureLayout(LayoutNaming):
    """Nodes and valid edges of a sparse feature circuit.

    Attributes:
        dictionaries: the spliced dictionaries in forward order (by where they write).
        latents: per dictionary, the latents that are nodes (each dictionary's error always is).
        senders: ``input``, then each dictionary's latents and error, in forward order.
        receivers: each dictionary's latents and error, then ``logits``.
        valid: ``(sender, receiver)`` bool, True where the edge exists.
        descriptions: short text per node (e.g. the tokens a latent's decoder promotes).

    Example:
        >>> site = dictionary_site("blocks.1.hook_resid_post", "blocks.1.hook_resid_post", 8, None)
        >>> layout = FeatureLayout.build([site], [[3, 5]])
        >>> layout.nodes
        ('input', 'r1.f3', 'r1.f5', 'r1.err', 'logits')
    """

    dictionaries: tuple[DictionarySite, ...]
    latents: tuple[tuple[int, ...], ...]
    senders: tuple[Node, ...]
    receivers: tuple[Receiver, ...]
    valid: Bool[Tensor, "sender receiver"]
    descriptions: dict[str, str] = dataclasses.field(default_factory=dict)

    sender_hint = "input, <dictionary>.f<latent>, <dictionary>.err"
    receiver_hint = "<dictionary>.f<latent>, <dictionary>.err, logits"

    def canonical(self, name: str) -> str:
        """Latent and error names are the layout's own (``r12.f345``): read as written."""
        return name

    @classmethod
    def build(
        cls,
        dictionaries: tuple[DictionarySite, ...] | list[DictionarySite],
        latents: Any,
        descriptions: dict[str, str] | None = None,
    ) -> FeatureLayout:
        """The layout for these dictionaries (any order) and their chosen latents."""
        chosen = dict(zip([d.name for d in dictionaries], latents, strict=True))
        sites = tuple(sorted(dictionaries, key=lambda d: (d.writes, d.reads)))
        names = [d.name for d in sites]
        if len(set(names)) != len(names):
            raise InvalidArgumentError(f"Expected distinct dictionary names; got {names}.")
        hooks = [d.out_hook for d in sites]
        if len(set(hooks)) != len(hooks):
            raise InvalidSiteError(
                f"Expected at most one dictionary writing each hook; got {hooks}. Hint: splice "
                "one SAE or transcoder per site."
            )
        senders = [Node("input", "input")]
        writes = [-math.inf]
        receivers: list[Receiver] = []
        reads: list[float] = []
        owner_s: list[int] = [-1]
        owner_r: list[int] = []
        latents_out = []
        for stage, site in enumerate(sites):
            picked = tuple(int(i) for i in chosen[site.name])
            bad = [i for i in picked if not 0 <= i < site.d_sae]
            if bad:
                raise InvalidArgumentError(
                    f"Expected latents of {site.name!r} in [0, {site.d_sae}); got {bad[:5]}."
                )
            latents_out.append(picked)
            for i in picked:
                name = f"{site.name}.f{i}"
                senders.append(Node(name, "latent", stage, i))
                receivers.append(Receiver(name, "latent", stage, i, (name,)))
            err = f"{site.name}.err"
            senders.append(Node(err, "error", stage))
            receivers.append(Receiver(err, "error", stage, None, (err,)))
            n = len(picked) + 1
            writes += [site.writes] * n
            reads += [site.reads] * n
            owner_s += [stage] * n
            owner_r += [stage] * n
        receivers.append(Receiver("logits", "logits", None, None, ("logits",)))
        reads.append(math.inf)
        owner_r.append(len(sites))
        w = torch.tensor(writes, dtype=torch.float64)[:, None]
        r = torch.tensor(reads, dtype=torch.float64)[None, :]
        valid = w < r
        for stage, site in enumerate(sites):
            if site.on_stream:  # everything crossing this point passes through its nodes
                s_other = torch.tensor(owner_s)[:, None] != stage
                r_other = torch.tensor(owner_r)[None, :] != stage
                valid &= ~((w < site.writes) & (r > site.reads) & s_other & r_other)
        return cls(
            sites,
            tuple(latents_out),
            tuple(senders),
            tuple(receivers),
            valid,
            dict(descriptions or {}),
        )

    # ------------------------------------------------------------------------------- drawing

    @property
    def n_rows(self) -> int:
        return len(self.dictionaries)

    def sender_order(self, sender: int) -> float:
        node = self.senders[sender]
        if node.kind == "input":
            return -math.inf
        assert node.layer is not None  # latents and errors carry their dictionary's stage
        return self.dictionaries[node.layer].writes

    def row_labels(self) -> list[str]:
        return ["input", *(d.name for d in self.dictionaries), "logits"]

    def positions(self) -> dict[str, tuple[float, float]]:
        """One row per dictionary (latents in the order chosen, the error last), centred."""
        width = max((len(chosen) + 1 for chosen in self.latents), default=1)
        middle = _SPACING * (width - 1) / 2
        pos = {"input": (middle, 0.0), "logits": (middle, self.n_rows + 1.0)}
        for stage, (site, chosen) in enumerate(zip(self.dictionaries, self.latents, strict=True)):
            names = [f"{site.name}.f{i}" for i in chosen] + [f"{site.name}.err"]
            offset = (width - len(names)) / 2
            for k, name in enumerate(names):
                pos[name] = (_SPACING * (offset + k), stage + 1.0)
        return pos

    # ------------------------------------------------------------------------------- files

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "features",
            "dictionaries": [dataclasses.asdict(d) for d in self.dictionaries],
            "latents": [list(chosen) for chosen in self.latents],
            "descriptions": self.descriptions,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureLayout:
        sites = [DictionarySite(**d) for d in data["dictionaries"]]
        return cls.build(sites, data["latents"], data.get("descriptions"))

    def same_as(self, other: Any) -> bool:
        return isinstance(other, FeatureLayout) and self.to_dict() == other.to_dict()
