"""Activation addition: steering vectors built, applied during generation, measured for cost."""

from mechkit.steering.apply import Generations, Steering, ablate_direction, generate, steer
from mechkit.steering.features import sae_latent_vector
from mechkit.steering.measure import (
    ABScore,
    LogitDifference,
    LogitDiffMeasure,
    MetricMeasure,
    SteeringSweep,
    TokenProbability,
    WordShare,
    steering_sweep,
)
from mechkit.steering.vectors import (
    SteeringVector,
    actadd_vector,
    activations_at,
    mean_difference_vector,
    pca_vector,
    probe_vector,
)

__all__ = [
    "ABScore",
    "Generations",
    "LogitDiffMeasure",
    "LogitDifference",
    "MetricMeasure",
    "Steering",
    "SteeringSweep",
    "SteeringVector",
    "TokenProbability",
    "WordShare",
    "ablate_direction",
    "actadd_vector",
    "activations_at",
    "generate",
    "mean_difference_vector",
    "pca_vector",
    "probe_vector",
    "sae_latent_vector",
    "steer",
    "steering_sweep",
]
