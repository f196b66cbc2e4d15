"""The shared core under every method that compares runs of a model.

Every method (activation, attribution and path patching, edge attribution, latent patching and
attribution, feature circuits, and the families built after them) uses these pieces the same
way, so a new method has one template to follow:

=========================  =====================================================================
:mod:`~mechkit.core.inputs`     :func:`resolve_contrast`: prompts or :class:`PromptPairs`, the
                                metric, the direction, the ablation and its reference set, all
                                checked before any run; :func:`reference_mean` for mean ablation
:mod:`~mechkit.core.batching`   :func:`each_batch` (prompts per pass, split in two on running out
                                of memory), :func:`prompts_per_pass`, memory budgets
:mod:`~mechkit.core.progress`   :func:`progress_bar`, one look for every long loop
:mod:`~mechkit.core.names`      the one naming scheme (``L9H6``, ``L9.mlp``, ...) and the peers'
:mod:`~mechkit.core.results`    :func:`rank`, behind every result's ``.top(n)``
:mod:`~mechkit.core.labels`     :func:`model_name`, :func:`metric_name`
:mod:`~mechkit.core.metrics`    :func:`batch_metric`, :func:`mean_value`: a metric per batch
:mod:`~mechkit.core.deprecation`  :func:`renamed_arguments`: old keywords kept, with a warning
:mod:`~mechkit.core.types`      ``Model``, the metric and sparse-dictionary protocols, tensor shapes
=========================  =====================================================================
"""

from mechkit.core.batching import (
    check_budget,
    each_batch,
    is_out_of_memory,
    parse_budget,
    prompts_per_pass,
)
from mechkit.core.deprecation import renamed_arguments
from mechkit.core.inputs import (
    ABLATIONS,
    DIRECTIONS,
    Ablation,
    Contrast,
    Direction,
    reference_mean,
    resolve_contrast,
)
from mechkit.core.labels import metric_name, model_name
from mechkit.core.metrics import batch_metric, mean_value
from mechkit.core.names import (
    NodeName,
    edge_name,
    from_eap_ig,
    head_name,
    mlp_name,
    neuron_name,
    parse_edge,
    parse_node,
    to_eap_ig,
)
from mechkit.core.progress import progress_bar
from mechkit.core.results import rank
from mechkit.core.types import MetricFunction, Model, SparseDictionaryLike

__all__ = [
    "ABLATIONS",
    "DIRECTIONS",
    "Ablation",
    "Contrast",
    "Direction",
    "MetricFunction",
    "Model",
    "NodeName",
    "SparseDictionaryLike",
    "batch_metric",
    "check_budget",
    "each_batch",
    "edge_name",
    "from_eap_ig",
    "head_name",
    "is_out_of_memory",
    "mean_value",
    "metric_name",
    "mlp_name",
    "model_name",
    "neuron_name",
    "parse_budget",
    "parse_edge",
    "parse_node",
    "progress_bar",
    "prompts_per_pass",
    "rank",
    "reference_mean",
    "renamed_arguments",
    "resolve_contrast",
    "to_eap_ig",
]
