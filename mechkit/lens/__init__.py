"""Lenses on the residual stream: the logit lens and the tuned lens."""

from mechkit.lens.logit_lens import LogitLens, decode_residual, logit_lens
from mechkit.lens.tuned_lens import (
    LensComparison,
    TunedLens,
    TunedLensConfig,
    compare_lenses,
    train_tuned_lens,
)

__all__ = [
    "LensComparison",
    "LogitLens",
    "TunedLens",
    "TunedLensConfig",
    "compare_lenses",
    "decode_residual",
    "logit_lens",
    "train_tuned_lens",
]
