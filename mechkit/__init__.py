"""mechkit: a mechanistic-interpretability toolkit on TransformerLens HookedTransformers.

>>> import mechkit as mk
>>> model = mk.load_model("attn-only-2l")
"""

from mechkit.corpus import corpus_tokens
from mechkit.decomposition import (
    Attribution,
    ResidualDecomposition,
    decompose_resid,
    direct_logit_attribution,
    neuron_attribution,
)
from mechkit.errors import (
    DatasetFormatError,
    DeviceError,
    EmptyDatasetError,
    InvalidSiteError,
    MechkitError,
    ModelUnavailableError,
    MultiTokenAnswerError,
    PromptLengthError,
    ShapeError,
    SiteNotFoundError,
    UnknownKindError,
    UnknownModelError,
    UnsupportedModelError,
)
from mechkit.heads import HeadScores, detect_heads, render_attention
from mechkit.interventions import Add, Captured, Patch, Transform, Zero, capture, intervene
from mechkit.lens import (
    LensComparison,
    LogitLens,
    TunedLens,
    TunedLensConfig,
    compare_lenses,
    decode_residual,
    logit_lens,
    train_tuned_lens,
)
from mechkit.metrics import (
    CrossEntropy,
    KLDivergence,
    LogitDiff,
    Metric,
    Normalized,
    ProbDiff,
    cross_entropy,
    kl_divergence,
    logit_diff,
    normalize,
    prob_diff,
)
from mechkit.models import BUILTIN_MODELS, ModelInfo, Processing, load_model, model_info
from mechkit.patching import PATCHABLE, PatchResult, activation_patch, path_patch
from mechkit.prompts import PromptPairs
from mechkit.sites import COMPONENTS, Site, validate_sites
from mechkit.tokens import tokenize_answer

__version__ = "0.1.0"

__all__ = [
    "PATCHABLE",
    "PatchResult",
    "activation_patch",
    "path_patch",
    "render_attention",
    "detect_heads",
    "UnknownKindError",
    "HeadScores",
    "train_tuned_lens",
    "decode_residual",
    "corpus_tokens",
    "compare_lenses",
    "TunedLensConfig",
    "TunedLens",
    "LensComparison",
    "Add",
    "Attribution",
    "BUILTIN_MODELS",
    "COMPONENTS",
    "Captured",
    "CrossEntropy",
    "KLDivergence",
    "LogitLens",
    "LogitDiff",
    "Metric",
    "Normalized",
    "Patch",
    "ProbDiff",
    "ResidualDecomposition",
    "PromptPairs",
    "Site",
    "Transform",
    "Zero",
    "capture",
    "cross_entropy",
    "decompose_resid",
    "direct_logit_attribution",
    "intervene",
    "kl_divergence",
    "logit_lens",
    "logit_diff",
    "neuron_attribution",
    "normalize",
    "prob_diff",
    "tokenize_answer",
    "validate_sites",
    "DatasetFormatError",
    "DeviceError",
    "EmptyDatasetError",
    "InvalidSiteError",
    "MechkitError",
    "ModelInfo",
    "ModelUnavailableError",
    "MultiTokenAnswerError",
    "Processing",
    "PromptLengthError",
    "ShapeError",
    "SiteNotFoundError",
    "UnknownModelError",
    "UnsupportedModelError",
    "__version__",
    "load_model",
    "model_info",
]
