"""How results name the model and the metric they were computed with."""

from __future__ import annotations

from typing import Any

__all__ = ["model_name", "metric_name"]


def model_name(model: Any) -> str:
    """The name a user loaded the model by (``"smollm2-135m"``), else TransformerLens's
    ``cfg.model_name``, else the class name.

    Example:
        >>> model_name(mk.load_model("attn-only-2l"))
        'attn-only-2l'
    """
    info = getattr(model, "mechkit_info", None)
    name = getattr(info, "name", None)
    if name:
        return str(name)
    cfg = getattr(model, "cfg", None)
    name = getattr(cfg, "model_name", None)
    return str(name) if name else type(model).__name__


def metric_name(metric: Any) -> str:
    """A metric's class name (``"LogitDiff"``; a wrapper's with what it wraps,
    ``"Normalized(LogitDiff)"``), or a function's name.

    Example:
        >>> metric_name(mk.LogitDiff(torch.tensor([1]), torch.tensor([2])))
        'LogitDiff'
    """
    if isinstance(metric, type):
        return metric.__name__
    inner = getattr(metric, "metric", None)  # a wrapper such as Normalized names what it wraps
    if inner is not None and callable(inner) and not isinstance(metric, type):
        return f"{type(metric).__name__}({metric_name(inner)})"
    name = getattr(metric, "__name__", None)
    return str(name) if name else type(metric).__name__
