"""EAP, edge attribution patching (Syed et al. 2023): every edge from one forward and one
backward pass per batch, ``(a'_u - a_u) . dM/d(input_v)`` with the gradient on the clean run."""

from __future__ import annotations

from mechkit.core import Model
from mechkit.graph.methods.gradients import gradient_scores
from mechkit.graph.registry import EdgeScores, register_edge_method
from mechkit.graph.setup import EdgeSetup

__all__ = ["eap"]


@register_edge_method(
    "eap",
    description="gradient at the clean run times the ablated-minus-clean sender output",
    paper="Syed et al. 2023, Attribution Patching Outperforms Automated Circuit Discovery",
)
def eap(model: Model, setup: EdgeSetup, *, progress: bool) -> EdgeScores:
    """EAP scores (module docstring); run through ``mk.edge_attribution(..., method="eap")``.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> graph = mk.edge_attribution(model, torch.tensor([[1, 2, 3]]), torch.tensor([[1, 7, 3]]),
        ...     lambda logits: logits[:, -1, 0].mean(), method="eap")
        >>> graph.method, graph.n_edges
        ('eap', 81)
    """
    return gradient_scores(
        model, setup, n_points=1, per_block=False, progress=progress, description="eap"
    )
