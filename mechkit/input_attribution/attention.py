"""Attention as an explanation: the baseline every input-attribution study compares against.

The score of input token ``j`` is the attention weight from the position that predicts the
target (the prompt's last token, or a continuation's step) to ``j``, in one layer: of one head,
or the mean over heads (``head=None``); the last layer by default. Attention weights are not
attributions (Jain & Wallace 2019; Wiegreffe & Pinter 2019): they are reported so that the
faithfulness measures can show how far they are from the gradient and perturbation methods.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mechkit.errors import InvalidArgumentError
from mechkit.hook_scope import hook_scope
from mechkit.input_attribution.registry import Options, Scores, register
from mechkit.input_attribution.runs import PromptRun

__all__ = ["attention"]


@register("attention", reads=("layer", "head"))
def attention(run: PromptRun, options: Options) -> Scores:
    """The attention paid by each step's predicting position to each prompt token.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> r = mk.attribute_inputs(model, [[1, 2, 3]], 5, method="attention", layer=0, head=1)
        >>> round(float(r.scores.sum()), 4)  # the attention row sums to 1
        1.0
    """
    cfg = run.model.cfg
    layer = options.layer + cfg.n_layers if options.layer < 0 else options.layer
    if not 0 <= layer < cfg.n_layers:
        raise InvalidArgumentError(
            f"Expected layer in [-{cfg.n_layers}, {cfg.n_layers}); got {options.layer}."
        )
    if options.head is not None and not 0 <= options.head < cfg.n_heads:
        raise InvalidArgumentError(
            f"Expected head in [0, {cfg.n_heads}) or None (the mean); got {options.head}."
        )
    seen: list[Tensor] = []

    def keep(pattern: Tensor, hook: Any) -> None:
        seen.append(pattern.detach())  # (batch, head, query, key)

    name = f"blocks.{layer}.attn.hook_pattern"
    with torch.no_grad(), hook_scope(run.model, fwd_hooks=[(name, keep)]):
        run.model(run.tokens_tensor())
    pattern = seen[0][0]  # (head, query, key)
    pattern = pattern.mean(0) if options.head is None else pattern[options.head]
    n = len(run.target.prompts[run.i])
    rows = pattern[n - 1 : n - 1 + run.n_steps, :n].float().cpu()  # (step, pos)
    keep_pos = torch.zeros(n, dtype=torch.bool)
    keep_pos[run.positions] = True
    rows = torch.where(keep_pos, rows, 0.0)
    if bar := run.bar:
        bar.update(1)
    return Scores(rows.sum(0), rows, {})
