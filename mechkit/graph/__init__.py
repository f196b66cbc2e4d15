"""Circuits as graphs: edge attribution (EAP, EAP-IG, exact), selection, evaluation, drawing."""

from mechkit.graph.circuit import ROC, CircuitGraph
from mechkit.graph.edges import METHODS, edge_attribution
from mechkit.graph.evaluate import (
    CircuitEvaluation,
    FaithfulnessCurve,
    evaluate_circuit,
    faithfulness_curve,
)
from mechkit.graph.feature_layout import DictionarySite, FeatureLayout
from mechkit.graph.layout import Edge, GraphLayout, Node, Receiver

__all__ = [
    "METHODS",
    "ROC",
    "CircuitEvaluation",
    "CircuitGraph",
    "DictionarySite",
    "FeatureLayout",
    "Edge",
    "FaithfulnessCurve",
    "GraphLayout",
    "Node",
    "Receiver",
    "edge_attribution",
    "evaluate_circuit",
    "faithfulness_curve",
]
