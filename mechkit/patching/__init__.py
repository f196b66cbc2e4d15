"""Causal interventions at speed: activation patching, path patching and patching sweeps."""

from mechkit.patching.activation import PATCHABLE, activation_patch
from mechkit.patching.path import FINAL_RESIDUAL, path_patch
from mechkit.patching.result import PatchResult

__all__ = ["FINAL_RESIDUAL", "PATCHABLE", "PatchResult", "activation_patch", "path_patch"]
