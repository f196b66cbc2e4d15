"""mechkit: a mechanistic-interpretability toolkit on TransformerLens HookedTransformers.

The top level holds what a notebook calls or builds: loading a model, prompts and metrics,
interventions, one function per method, and the errors. Result types, configurations and
building blocks live in their subpackages (``mk.sae.SAEConfig``, ``mk.graph.GraphLayout``,
``mk.steering.pca_vector``); a name that used to be at the top level still works there, with a
``DeprecationWarning`` that names its new home.

Example:
    >>> model = mk.load_model("attn-only-2l")
    >>> model.cfg.n_layers
    2
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

# Subpackages, as namespaces: mk.sae.train_sae, mk.graph.CircuitGraph, mk.core.parse_node, ...
from mechkit import (
    attribution,
    core,
    corpus,
    decomposition,
    distributed,
    editing,
    errors,
    graph,
    heads,
    input_attribution,
    interventions,
    lens,
    metrics,
    mixing,
    models,
    patching,
    probing,
    prompts,
    sae,
    sites,
    steering,
    tokens,
    version,
)

# The names below are grouped by what a user does, not sorted.
# isort: off
# Models, prompts and metrics
from mechkit.models import load_model, model_info
from mechkit.prompts import PromptPairs
from mechkit.sites import Site
from mechkit.tokens import tokenize_answer
from mechkit.metrics import CrossEntropy, KLDivergence, LogitDiff, Metric, Normalized, ProbDiff

# Interventions
from mechkit.interventions import Add, Patch, Transform, Zero, capture, intervene

# Reading the model: lenses, decomposition, heads
from mechkit.lens import logit_lens, train_tuned_lens
from mechkit.decomposition import decompose_resid, direct_logit_attribution, neuron_attribution
from mechkit.heads import detect_heads, render_attention

# Patching and attribution
from mechkit.patching import activation_patch, path_patch
from mechkit.attribution import attribution_patch, compare_attribution

# Circuits
from mechkit.graph import CircuitGraph, edge_attribution, evaluate_circuit, faithfulness_curve

# Sparse dictionaries
from mechkit.sae import (
    attribute_latents,
    evaluate_feature_circuit,
    evaluate_sae,
    feature_browser,
    feature_circuit,
    load_sae,
    patch_latents,
    splice,
    train_sae,
)

# Input attribution
from mechkit.input_attribution import (
    InputAttribution,
    InputAttributionComparison,
    attribute_inputs,
    compare_input_attributions,
    comprehensiveness,
    sufficiency,
    aopc_curves,
    sensitivity_n,
)

# Steering
from mechkit.steering import SteeringVector, generate, steer, steering_sweep

# Context mixing
from mechkit.mixing import ContextMixing, MixingAgreement, context_mixing, mixing_agreement

# Representations: probes, concept erasure, subspace interventions
from mechkit.probing import (
    ConceptEraser,
    DasResult,
    ProbeResult,
    ProbingDataset,
    das,
    erase,
    fit_leace,
    train_probe,
)

# Scaling out: a Ray cluster's actors (mechkit sweep --ray)
from mechkit.distributed import InlineExecutor, RayExecutor

# Facts: causal tracing and editing
from mechkit.editing import TraceResult, WeightEdit, causal_trace, edit

# Errors: every one is a MechkitError and the builtin a user would catch
from mechkit.errors import (
    CacheError,
    ContextLengthError,
    DatasetFormatError,
    DeviceError,
    EmptyDatasetError,
    FileFormatError,
    InvalidArgumentError,
    InvalidSiteError,
    InvalidTokenError,
    InvalidTypeError,
    MechkitError,
    ModelUnavailableError,
    MultiTokenAnswerError,
    NonFiniteError,
    NotFoundError,
    OutOfMemoryError,
    OutputFolderError,
    PromptLengthError,
    ShapeError,
    SiteNotFoundError,
    UnknownKindError,
    UnknownModelError,
    UnsupportedModelError,
    MissingDependencyError,
    WorkerError,
)

# isort: on

__version__ = version.__version__

__all__ = [
    # subpackages
    "attribution", "core", "corpus", "decomposition", "distributed", "editing", "errors",
    "graph", "heads", "input_attribution", "interventions", "lens", "metrics", "mixing",
    "models", "patching", "probing", "prompts", "sae", "sites", "steering", "tokens",
    # models, prompts and metrics
    "load_model", "model_info", "PromptPairs", "Site", "tokenize_answer",
    "Metric", "LogitDiff", "ProbDiff", "CrossEntropy", "KLDivergence", "Normalized",
    # interventions
    "intervene", "capture", "Patch", "Zero", "Add", "Transform",
    # reading the model
    "logit_lens", "train_tuned_lens", "decompose_resid", "direct_logit_attribution",
    "neuron_attribution", "detect_heads", "render_attention",
    # patching and attribution
    "activation_patch", "path_patch", "attribution_patch", "compare_attribution",
    # circuits
    "edge_attribution", "evaluate_circuit", "faithfulness_curve", "CircuitGraph",
    # sparse dictionaries
    "load_sae", "splice", "patch_latents", "attribute_latents", "feature_circuit",
    "evaluate_feature_circuit", "train_sae", "evaluate_sae", "feature_browser",
    # input attribution
    "attribute_inputs", "InputAttribution", "compare_input_attributions",
    "InputAttributionComparison", "comprehensiveness", "sufficiency", "aopc_curves",
    "sensitivity_n",
    # steering
    "SteeringVector", "steer", "generate", "steering_sweep",
    # context mixing
    "context_mixing", "ContextMixing", "mixing_agreement", "MixingAgreement",
    # representations
    "train_probe", "ProbeResult", "ProbingDataset", "fit_leace", "ConceptEraser", "erase",
    "das", "DasResult",
    # scaling out
    "RayExecutor", "InlineExecutor",
    # facts: causal tracing and editing
    "causal_trace", "TraceResult", "edit", "WeightEdit",
    # errors
    "MechkitError", "MissingDependencyError", "WorkerError", "CacheError", "ContextLengthError",
    "DatasetFormatError", "DeviceError",
    "EmptyDatasetError", "FileFormatError", "InvalidArgumentError", "InvalidSiteError",
    "InvalidTokenError", "InvalidTypeError", "ModelUnavailableError", "MultiTokenAnswerError",
    "NonFiniteError", "NotFoundError", "OutOfMemoryError", "OutputFolderError",
    "PromptLengthError", "ShapeError", "SiteNotFoundError", "UnknownKindError",
    "UnknownModelError", "UnsupportedModelError",
    "__version__",
]  # fmt: skip

# Names that were at the top level before 0.2, and where they live now.
_MOVED: dict[str, str] = {
    "AttributionComparison": "mechkit.attribution",
    "corpus_tokens": "mechkit.corpus",
    "Attribution": "mechkit.decomposition",
    "ResidualDecomposition": "mechkit.decomposition",
    "CircuitEvaluation": "mechkit.graph",
    "Edge": "mechkit.graph",
    "FaithfulnessCurve": "mechkit.graph",
    "GraphLayout": "mechkit.graph",
    "HeadScores": "mechkit.heads",
    "Captured": "mechkit.interventions",
    "LensComparison": "mechkit.lens",
    "LogitLens": "mechkit.lens",
    "TunedLens": "mechkit.lens",
    "TunedLensConfig": "mechkit.lens",
    "compare_lenses": "mechkit.lens",
    "decode_residual": "mechkit.lens",
    "cross_entropy": "mechkit.metrics",
    "kl_divergence": "mechkit.metrics",
    "logit_diff": "mechkit.metrics",
    "normalize": "mechkit.metrics",
    "prob_diff": "mechkit.metrics",
    "BUILTIN_MODELS": "mechkit.models",
    "ModelInfo": "mechkit.models",
    "Processing": "mechkit.models",
    "PATCHABLE": "mechkit.patching",
    "PatchResult": "mechkit.patching",
    "ActivationStore": "mechkit.sae",
    "FeatureCircuitEvaluation": "mechkit.sae",
    "FeatureReport": "mechkit.sae",
    "SAEConfig": "mechkit.sae",
    "SAEEvaluation": "mechkit.sae",
    "SparseDictionary": "mechkit.sae",
    "SpliceHandle": "mechkit.sae",
    "TrainConfig": "mechkit.sae",
    "collect_features": "mechkit.sae",
    "feature_connections": "mechkit.sae",
    "sae_corpus_tokens": "mechkit.sae",
    "save_sae": "mechkit.sae",
    "COMPONENTS": "mechkit.sites",
    "validate_sites": "mechkit.sites",
    "ABScore": "mechkit.steering",
    "Generations": "mechkit.steering",
    "LogitDifference": "mechkit.steering",
    "Steering": "mechkit.steering",
    "SteeringSweep": "mechkit.steering",
    "TokenProbability": "mechkit.steering",
    "WordShare": "mechkit.steering",
    "ablate_direction": "mechkit.steering",
    "actadd_vector": "mechkit.steering",
    "activations_at": "mechkit.steering",
    "mean_difference_vector": "mechkit.steering",
    "pca_vector": "mechkit.steering",
    "probe_vector": "mechkit.steering",
    "sae_latent_vector": "mechkit.steering",
}


def __getattr__(name: str) -> Any:
    """Old top-level names: found in their subpackage, with a warning naming it."""
    module = _MOVED.get(name)
    if module is None:
        raise AttributeError(f"module 'mechkit' has no attribute {name!r}")
    short = module.replace("mechkit", "mk", 1)
    warnings.warn(
        f"mk.{name} is now {short}.{name}; the top-level name will be removed in mechkit 0.3.",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(__all__) | set(_MOVED))
