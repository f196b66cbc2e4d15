"""Input attribution: which input tokens drove a prediction, by gradients, perturbation and
attention, with the faithfulness of each explanation measured.

The techniques most interpretability courses start from, on the same spine as the rest of
mechkit (models, :class:`~mechkit.PromptPairs`, metrics, scoped hooks), so that a token-level
explanation and a circuit can be compared on the same prompts:

- :func:`attribute_inputs`: saliency, gradient x input, integrated gradients (Sundararajan et
  al. 2017), occlusion, exact Shapley values, KernelSHAP (Lundberg & Lee 2017), LIME (Ribeiro
  et al. 2016) and attention, all returning an :class:`InputAttribution`;
- faithfulness by erasure: :func:`comprehensiveness` and :func:`sufficiency` (DeYoung et al.
  2020), :func:`aopc_curves` (deletion and insertion, with random orders as the control),
  :func:`sensitivity_n` (Ancona et al. 2018);
- :func:`compare_input_attributions`: every method on the same prompts, a table of those
  measures and the rank correlations between methods.
"""

from mechkit.input_attribution import attention, gradients, perturbation  # registers the methods
from mechkit.input_attribution.attribute import attribute_inputs
from mechkit.input_attribution.compare import (
    InputAttributionComparison,
    compare_input_attributions,
    rank_correlation,
)
from mechkit.input_attribution.demo import demo_section
from mechkit.input_attribution.faithfulness import (
    AOPCCurves,
    ErasureScores,
    aopc_curves,
    comprehensiveness,
    sensitivity_n,
    sufficiency,
)
from mechkit.input_attribution.registry import METHODS
from mechkit.input_attribution.result import InputAttribution
from mechkit.input_attribution.targets import Continuation

__all__ = [
    "attribute_inputs",
    "InputAttribution",
    "Continuation",
    "compare_input_attributions",
    "InputAttributionComparison",
    "rank_correlation",
    "comprehensiveness",
    "sufficiency",
    "aopc_curves",
    "sensitivity_n",
    "ErasureScores",
    "AOPCCurves",
    "METHODS",
    "demo_section",
    "attention",
    "gradients",
    "perturbation",
]
