"""Circuits as graphs: edge attribution (EAP, EAP-IG, exact, and any registered method),
selection, evaluation, drawing.

Example:
    >>> list(mk.graph.EDGE_METHODS)
    ['cd-t', 'eap', 'eap-ig-activations', 'eap-ig-inputs', 'exact']
"""

import warnings
from typing import Any

from mechkit.graph.circuit import ROC, CircuitGraph
from mechkit.graph.edges import edge_attribution
from mechkit.graph.evaluate import (
    CircuitEvaluation,
    FaithfulnessCurve,
    evaluate_circuit,
    faithfulness_curve,
)
from mechkit.graph.feature_layout import DictionarySite, FeatureLayout
from mechkit.graph.layout import Edge, GraphLayout, Node, Receiver
from mechkit.graph.registry import (
    EDGE_METHODS,
    EdgeMethod,
    EdgeScores,
    register_edge_method,
    unregister_edge_method,
)
from mechkit.graph.setup import EdgeSetup

__all__ = [
    "EDGE_METHODS",
    "ROC",
    "CircuitEvaluation",
    "CircuitGraph",
    "DictionarySite",
    "Edge",
    "EdgeMethod",
    "EdgeScores",
    "EdgeSetup",
    "FaithfulnessCurve",
    "FeatureLayout",
    "GraphLayout",
    "Node",
    "Receiver",
    "edge_attribution",
    "evaluate_circuit",
    "faithfulness_curve",
    "register_edge_method",
    "unregister_edge_method",
]


def __getattr__(name: str) -> Any:
    if name == "METHODS":
        warnings.warn(
            "mechkit.graph.METHODS is deprecated: mechkit.graph.EDGE_METHODS is the registry "
            "(list(EDGE_METHODS) gives the names).",
            DeprecationWarning,
            stacklevel=2,
        )
        return tuple(EDGE_METHODS)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
