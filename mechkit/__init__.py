"""mechkit: a mechanistic-interpretability toolkit on TransformerLens HookedTransformers.

>>> import mechkit as mk
>>> model = mk.load_model("attn-only-2l")
"""

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
    UnknownModelError,
    UnsupportedModelError,
)
from mechkit.models import BUILTIN_MODELS, ModelInfo, Processing, load_model, model_info

__version__ = "0.1.0"

__all__ = [
    "BUILTIN_MODELS",
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
