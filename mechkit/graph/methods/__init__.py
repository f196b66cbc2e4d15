"""The built-in edge-attribution methods, one module each, registered in
:data:`mechkit.graph.EDGE_METHODS` on import.

A new method (CD-T, another EAP variant) is one module here holding one function decorated with
:func:`~mechkit.graph.register_edge_method`, plus one import line below; see
:mod:`mechkit.graph.registry` for the function's contract. A method defined outside the package
registers the same way and is then available to ``mk.edge_attribution(..., method=name)``.
"""

from mechkit.graph.methods.cdt import cdt
from mechkit.graph.methods.eap import eap
from mechkit.graph.methods.eap_ig_activations import eap_ig_activations
from mechkit.graph.methods.eap_ig_inputs import eap_ig_inputs
from mechkit.graph.methods.exact import exact

__all__ = ["eap", "eap_ig_inputs", "eap_ig_activations", "exact", "cdt"]
