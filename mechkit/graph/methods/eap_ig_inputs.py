"""EAP-IG on the inputs (Hanna et al. 2024): the gradient averaged over ``steps`` runs whose input
embeddings move in a straight line from the ablated to the clean ones (points ``k / steps``,
``k = 1..steps``, so ``steps=1`` is EAP).

The reference code (hannamw/EAP-IG, ``get_scores_eap_ig``) uses, in the version read, the points
``k = 0..steps-1``: the ablated end in, the clean one out, a grid no ``steps`` of ours
reproduces; compare the two at many steps (both tend to the same integral)."""

from __future__ import annotations

from mechkit.core import Model
from mechkit.errors import check_positive_int
from mechkit.graph.methods.gradients import gradient_scores
from mechkit.graph.registry import EdgeScores, register_edge_method
from mechkit.graph.setup import EdgeSetup

__all__ = ["eap_ig_inputs"]


@register_edge_method(
    "eap-ig-inputs",
    description="EAP with the gradient integrated along the input embeddings, ablated to clean",
    paper="Hanna et al. 2024, Have Faith in Faithfulness",
    options={"steps": 5},
)
def eap_ig_inputs(model: Model, setup: EdgeSetup, *, progress: bool, steps: int) -> EdgeScores:
    """EAP-IG scores on the inputs (module docstring).

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> graph = mk.edge_attribution(model, torch.tensor([[1, 2, 3]]), torch.tensor([[1, 7, 3]]),
        ...     lambda logits: logits[:, -1, 0].mean(), method="eap-ig-inputs", steps=3)
        >>> graph.method
        'eap-ig-inputs (3 steps)'
    """
    check_positive_int("steps", steps)
    out = gradient_scores(
        model, setup, n_points=steps, per_block=False, progress=progress,
        description="eap-ig-inputs",
    )  # fmt: skip
    return EdgeScores(out.scores, out.clean_score, f"{steps} steps")
