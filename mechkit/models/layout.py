"""Store weights in the memory layout TransformerLens's forward pass reads them in.

TransformerLens 3 computes its linear maps with ``F.linear`` on a transposed, contiguous copy of
each weight (``W_gate.T.contiguous()``, ``W_U.T.contiguous()``, the attention weights
rearranged to ``(head d_head, d_model)``), so that the floating-point result matches Hugging
Face's ``nn.Linear`` exactly. Those copies are made again on every forward pass: for SmolLM2
they move about 430 MB per pass (the unembedding alone is 113 MB), which is half the time of a
two-prompt forward and more than half of each generation step on a CPU.

:func:`use_forward_layout` stores each such weight so that the copy is already there: the
parameter keeps its shape and values, but its memory is laid out as the transpose
TransformerLens asks for, so ``.T.contiguous()`` and the attention's rearrangement return views
and ``F.linear`` receives the very same matrix it received before. Outputs are bit-identical
(``tests/models/test_forward_layout.py``); only parameters that TransformerLens reads through such a
copy are touched (the plain ``MLP``, which multiplies with ``addmm``, keeps its layout).
:func:`mechkit.load_model` applies it to every model it loads.
"""

from __future__ import annotations

import torch
from transformer_lens.components import Unembed
from transformer_lens.components.abstract_attention import AbstractAttention
from transformer_lens.components.mlps.gated_mlp import GatedMLP

from mechkit.core.types import Model

__all__ = ["use_forward_layout"]

# attention weights (head, d_model, d_head) are read as ((head d_head), d_model)
_HEAD_INPUT_WEIGHTS = ("W_Q", "W_K", "W_V", "_W_K", "_W_V")


def _store(parameter: torch.Tensor, storage_order: tuple[int, ...]) -> int:
    """Lay ``parameter`` out in memory in ``storage_order``; its shape and values stay."""
    data = parameter.data
    inverse = [0] * len(storage_order)
    for position, dim in enumerate(storage_order):
        inverse[dim] = position
    laid_out = data.permute(storage_order).contiguous().permute(inverse)
    if laid_out.stride() == data.stride():
        return 0
    parameter.data = laid_out
    return 1


@torch.no_grad()
def use_forward_layout(model: Model) -> int:
    """Lay the model's weights out as its forward pass reads them; returns how many moved.

    Applied by :func:`mechkit.load_model`; call it yourself on a ``HookedTransformer`` built
    another way. Values, shapes, gradients and outputs are unchanged; only the strides differ
    (``model.W_U.is_contiguous()`` becomes False). Safe to call twice.

    Example:
        >>> from transformer_lens import HookedTransformer
        >>> model = HookedTransformer(mk.load_model("attn-only-2l").cfg)  # built, not loaded
        >>> tokens = torch.tensor([[1, 2, 3, 4]])
        >>> before = model(tokens)
        >>> use_forward_layout(model), use_forward_layout(model)  # 4 per layer, then the unembed
        (9, 0)
        >>> torch.equal(model(tokens), before)
        True
    """

    moved = 0
    for module in model.modules():
        if isinstance(module, AbstractAttention):
            for name in _HEAD_INPUT_WEIGHTS:
                weight = module._parameters.get(name)
                if weight is not None and weight.dim() == 3:
                    moved += _store(weight, (0, 2, 1))  # (head, d_head, d_model)
            weight = module._parameters.get("W_O")
            if weight is not None and weight.dim() == 3:
                moved += _store(weight, (2, 0, 1))  # (d_model, head, d_head)
        elif isinstance(module, GatedMLP):
            for name in ("W_gate", "W_in", "W_out"):
                moved += _store(getattr(module, name), (1, 0))
        elif isinstance(module, Unembed):
            moved += _store(module.W_U, (1, 0))
    return moved
