"""Attribution patching: gradient estimates of activation patching, node by node."""

from mechkit.attribution.node import AttributionComparison, attribution_patch, compare_attribution

__all__ = ["AttributionComparison", "attribution_patch", "compare_attribution"]
