"""Next-token predictions for a batch of prompts: the first thing to look at on a new model."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechkit.errors import EmptyDatasetError
from mechkit.tokens import check_tokens, encode, pad_right, tokenizer_of

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = ["NextTokenPredictions", "predict_next_tokens"]


@dataclasses.dataclass(frozen=True, eq=False)
class NextTokenPredictions:
    """The top-k next tokens of each prompt.

    Attributes:
        prompts: the prompt texts.
        token_ids: ``(batch, k)`` the top tokens, most likely first.
        tokens: the decoded top tokens, one tuple per prompt.
        probs: ``(batch, k)`` their probabilities.
        logits: ``(batch, k)`` their logits.

    Example:
        >>> model = mk.load_model("smollm2-135m")
        >>> preds = predict_next_tokens(model, ["The capital of France is"], k=3)
        >>> preds.token_ids.shape, preds.tokens[0][0]        # (batch, k)
        (torch.Size([1, 3]), ' Paris')
    """

    prompts: tuple[str, ...]
    token_ids: Int[Tensor, "batch k"]
    tokens: tuple[tuple[str, ...], ...]
    probs: Float[Tensor, "batch k"]
    logits: Float[Tensor, "batch k"]

    def to_dataframe(self) -> Any:
        """One row per (prompt, rank)."""
        import pandas as pd

        rows = [
            {
                "prompt": prompt,
                "rank": rank + 1,
                "token": self.tokens[i][rank],
                "token_id": int(self.token_ids[i, rank]),
                "prob": float(self.probs[i, rank]),
                "logit": float(self.logits[i, rank]),
            }
            for i, prompt in enumerate(self.prompts)
            for rank in range(self.token_ids.shape[1])
        ]
        return pd.DataFrame(rows)

    def plot(self) -> Any:
        """A plotly bar chart per prompt of the top tokens' probabilities."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        n = len(self.prompts)
        titles = [p if len(p) <= 60 else "..." + p[-57:] for p in self.prompts]
        fig = make_subplots(rows=n, cols=1, subplot_titles=titles, vertical_spacing=0.3 / max(n, 1))
        for i in range(n):
            fig.add_trace(
                go.Bar(
                    x=[repr(t) for t in self.tokens[i]],
                    y=self.probs[i].tolist(),
                    hovertext=[f"logit {v:.2f}" for v in self.logits[i].tolist()],
                    showlegend=False,
                ),
                row=i + 1,
                col=1,
            )
            fig.update_yaxes(title_text="p", range=[0, 1], row=i + 1, col=1)
        fig.update_layout(height=230 * n + 60, title="Next-token predictions", margin={"t": 80})
        return fig


@torch.no_grad()
def predict_next_tokens(
    model: HookedTransformer, prompts: Sequence[str], *, k: int = 5, prepend_bos: bool | None = None
) -> NextTokenPredictions:
    """The ``k`` most likely next tokens after each prompt, from one batched forward pass.

    Prompts of different lengths are right-padded; each is read at its own last token.

    Example:
        >>> model = mk.load_model("smollm2-135m")
        >>> preds = predict_next_tokens(model, ["The Eiffel Tower is located in the city of"])
        >>> preds.tokens[0][0]
        ' Paris'
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise EmptyDatasetError("Expected at least one prompt; got none.")
    tokenizer = tokenizer_of(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = [encode(model, p, prepend_bos) for p in prompts]
    tokens, mask = pad_right(rows, pad)
    check_tokens(model, tokens, mask)
    device = model.cfg.device
    logits = model(tokens.to(device))  # (batch, pos, d_vocab)
    last = mask.sum(-1).to(logits.device) - 1
    at = logits[torch.arange(len(rows), device=logits.device), last].float()  # (batch, d_vocab)
    top = at.topk(k, dim=-1)
    probs = at.softmax(-1).gather(-1, top.indices)
    decoded = tuple(tuple(tokenizer.decode([t]) for t in row) for row in top.indices.tolist())
    return NextTokenPredictions(
        tuple(prompts), top.indices.cpu(), decoded, probs.cpu(), top.values.cpu()
    )
