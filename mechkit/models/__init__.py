"""Loading models: built-in offline models, toy models, local files and TransformerLens names."""

from mechkit.models.conversion import Processing
from mechkit.models.loading import BUILTIN_MODELS, PROCESSING, ModelInfo, load_model, model_info
from mechkit.models.weight_cache import cache_root

__all__ = [
    "BUILTIN_MODELS",
    "PROCESSING",
    "ModelInfo",
    "Processing",
    "cache_root",
    "load_model",
    "model_info",
]
