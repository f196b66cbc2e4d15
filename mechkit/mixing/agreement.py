"""How well each context-mixing map agrees with input attributions of the prediction, by the
evaluation of the papers themselves (Abnar & Zuidema 2020; Ferrando et al. 2022; Mohebbi et al.
2023): the Spearman rank correlation, over the tokens of a prompt, between what the last
position draws on in a method's map over all layers and

- **gradient x input**: ``||g_j * e_j||_2``, the embedding ``e_j`` of token ``j`` times the
  gradient of the target logit (difference) at the last position with respect to it;
- **erasure** (occlusion): ``|F(x) - F(x with e_j = 0)|``, the change of that target when token
  ``j``'s embedding is zeroed, all tokens in one batched pass.

Signed maps (ALTI-Logit, DecompX logit shares) are compared by their size. Both baselines are
computed here by small helpers (:func:`gradient_x_input`, :func:`erasure`) until the
input-attribution family lands; the numbers are per prompt, then averaged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from mechkit.core.progress import progress_bar
from mechkit.core.results import rank
from mechkit.core.types import Model
from mechkit.errors import InvalidArgumentError, check_choice
from mechkit.hook_scope import hook_scope
from mechkit.mixing.api import answer_ids, context_mixing
from mechkit.mixing.registry import METHODS
from mechkit.tokens import token_batch

__all__ = ["MixingAgreement", "mixing_agreement", "spearman", "gradient_x_input", "erasure"]

BASELINES = ("gradient_x_input", "erasure")


def spearman(a: Float[Tensor, " n"], b: Float[Tensor, " n"]) -> float:
    """Spearman's rank correlation of two vectors (ties get their average rank).

    Example:
        >>> round(spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 30.0, 20.0])), 6)
        0.5
    """

    def ranks(x: Tensor) -> Tensor:
        x = x.double()
        order = torch.argsort(x)
        r = torch.empty_like(x)
        r[order] = torch.arange(len(x), dtype=torch.float64)
        for value in torch.unique(x):  # ties: their mean rank
            tied = x == value
            if int(tied.sum()) > 1:
                r[tied] = r[tied].mean()
        return r

    ra, rb = ranks(a.flatten()), ranks(b.flatten())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denominator if denominator > 0 else float("nan")


def _target(model: Model, logits: Tensor, last: int, answer: int, wrong: int | None) -> Tensor:
    value = logits[:, last, answer]
    return value - logits[:, last, wrong] if wrong is not None else value


def gradient_x_input(
    model: Model, tokens: Tensor, answer: int, wrong: int | None = None
) -> Float[Tensor, " pos"]:
    """``||g_j * e_j||`` for one unpadded prompt ``(1, pos)``: the gradient of the target at the
    last position with respect to token ``j``'s embedding, times that embedding.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> gradient_x_input(model, torch.tensor([[1, 2, 3]]), answer=5).shape
        torch.Size([3])
    """
    kept: dict[str, Tensor] = {}

    def leaf(embed: Tensor, hook: object) -> Tensor:
        kept["e"] = embed.detach().requires_grad_(True)
        return kept["e"]

    with torch.enable_grad(), hook_scope(model, fwd_hooks=[("hook_embed", leaf)]):
        logits = model(tokens)
        target = _target(model, logits, tokens.shape[1] - 1, answer, wrong).sum()
        (grad,) = torch.autograd.grad(target, kept["e"])
    return (grad * kept["e"]).detach()[0].norm(dim=-1)


@torch.no_grad()
def erasure(
    model: Model, tokens: Tensor, answer: int, wrong: int | None = None
) -> Float[Tensor, " pos"]:
    """``|F(x) - F(x with e_j = 0)|`` for one unpadded prompt ``(1, pos)``, every ``j`` in one
    batch of copies.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> erasure(model, torch.tensor([[1, 2, 3]]), answer=5).shape
        torch.Size([3])
    """
    n = tokens.shape[1]
    base = _target(model, model(tokens), n - 1, answer, wrong)

    def zero(embed: Tensor, hook: object) -> Tensor:  # copy c: token c's embedding zeroed
        embed = embed.clone()
        embed[torch.arange(n), torch.arange(n)] = 0.0
        return embed

    with hook_scope(model, fwd_hooks=[("hook_embed", zero)]):
        erased = _target(model, model(tokens.expand(n, -1)), n - 1, answer, wrong)
    return (base - erased).abs()


@dataclasses.dataclass(frozen=True, eq=False)
class MixingAgreement:
    """Spearman correlations of each method's map with each baseline, per prompt.

    Attributes:
        methods: the methods compared.
        baselines: ``("gradient_x_input", "erasure")``.
        values: ``(method, baseline, prompt)`` the correlations.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> agree = mk.mixing_agreement(model, torch.tensor([[1, 2, 3, 4, 5]]),
        ...                             methods=["attention", "rollout"], answer=7)
        >>> agree.table.shape                         # (method, baseline), mean over prompts
        torch.Size([2, 2])
    """

    methods: tuple[str, ...]
    baselines: tuple[str, ...]
    values: Float[Tensor, "method baseline prompt"]

    @property
    def table(self) -> Float[Tensor, "method baseline"]:
        """The mean correlation over prompts (NaNs, from constant rows, left out)."""
        return self.values.nanmean(-1)

    def top(self, n: int = 10, *, absolute: bool = True) -> list[tuple[str, float]]:
        """The best-agreeing ``method/baseline`` pairs, by :func:`mechkit.core.rank`.

        Example:
            >>> model = mk.load_model("attn-only-2l")
            >>> agree = mk.mixing_agreement(model, torch.tensor([[1, 2, 3, 4]]),
            ...                             methods=["rollout"], answer=7)
            >>> sorted(label for label, _ in agree.top())
            ['rollout/erasure', 'rollout/gradient_x_input']
        """
        labels = [f"{m}/{b}" for m in self.methods for b in self.baselines]
        return rank(labels, self.table.flatten(), n, absolute=absolute)

    def to_dataframe(self) -> Any:
        """One row per method: its mean correlation with each baseline, and the prompts' count.

        Example:
            >>> model = mk.load_model("attn-only-2l")
            >>> agree = mk.mixing_agreement(model, torch.tensor([[1, 2, 3, 4]]),
            ...                             methods=["rollout"], answer=7)
            >>> list(agree.to_dataframe().columns)
            ['method', 'gradient_x_input', 'erasure', 'prompts']
        """
        import pandas as pd

        table = self.table
        data: dict[str, Any] = {"method": list(self.methods)}
        for i, baseline in enumerate(self.baselines):
            data[baseline] = table[:, i].tolist()
        data["prompts"] = [self.values.shape[-1]] * len(self.methods)
        return pd.DataFrame(data)

    def plot(self) -> Any:
        """Grouped bars: each method's mean correlation with each baseline.

        Example:
            >>> model = mk.load_model("attn-only-2l")
            >>> agree = mk.mixing_agreement(model, torch.tensor([[1, 2, 3, 4]]),
            ...                             methods=["rollout"], answer=7)
            >>> len(agree.plot().data)                              # one bar series per baseline
            2
        """
        import plotly.graph_objects as go

        fig = go.Figure()
        for i, baseline in enumerate(self.baselines):
            fig.add_trace(go.Bar(name=baseline, x=list(self.methods), y=self.table[:, i].tolist()))
        fig.update_layout(
            barmode="group",
            title="Agreement of the last position's map with input attributions (Spearman)",
            yaxis_title="Spearman correlation",
            yaxis_range=[-1, 1],
        )
        return fig


def mixing_agreement(
    model: Model,
    tokens: Any,
    *,
    methods: Sequence[str] | None = None,
    answer: Any = None,
    wrong: Any = None,
    prepend_bos: bool | None = None,
    memory_budget: int | str | None = None,
    progress: bool = True,
) -> MixingAgreement:
    """Spearman correlation of each method's map (the last position's row of its map over all
    layers) with gradient x input and with erasure of the target logit, prompt by prompt.

    Args:
        model: a HookedTransformer.
        tokens: prompts (strings, ids or a PromptPairs); each is scored at its last token.
        methods: the methods to compare (None: every registered one).
        answer, wrong: the target logit (difference): one token or one per prompt; None: the
            model's top prediction at each prompt's last token.
        prepend_bos: for string input; None means the model's default.
        memory_budget: passed to :func:`context_mixing`.
        progress: a bar over the prompts and methods.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> agree = mixing_agreement(model, torch.tensor([[1, 2, 3, 4, 5]]),
        ...                          methods=["alti"], answer=7)
        >>> agree.values.shape                             # (method, baseline, prompt)
        torch.Size([1, 2, 1])
    """
    chosen = list(METHODS) if methods is None else list(methods)
    if not chosen:
        raise InvalidArgumentError(f"Expected at least one method among {list(METHODS)}; got none.")
    for method in chosen:
        check_choice("method", method, list(METHODS))
    tok, mask = token_batch(model, tokens, prepend_bos)
    n_batch = tok.shape[0]
    answers = answer_ids(model, answer, n_batch)
    wrongs = answer_ids(model, wrong, n_batch)
    values = torch.full((len(chosen), len(BASELINES), n_batch), float("nan"))
    device = model.cfg.device
    with progress_bar(n_batch * len(chosen), "mixing agreement", enabled=progress) as bar:
        for b in range(n_batch):
            prompt = tok[b : b + 1, : int(mask[b].sum())].to(device)  # (1, pos): real tokens
            if answers is None:
                with torch.no_grad():
                    target = int(model(prompt)[0, -1].argmax())
            else:
                target = int(answers[b])
            other = None if wrongs is None else int(wrongs[b])
            baselines = [
                gradient_x_input(model, prompt, target, other).cpu(),
                erasure(model, prompt, target, other).cpu(),
            ]
            for m, method in enumerate(chosen):
                mix = context_mixing(
                    model,
                    prompt,
                    method=method,
                    positions=-1,
                    answer=target,
                    wrong=other,
                    memory_budget=memory_budget,
                    progress=False,
                    layers=[model.cfg.n_layers - 1],
                )
                row = (mix.logit if mix.logit is not None else mix.aggregated)[0, 0].abs()
                for k, baseline in enumerate(baselines):
                    values[m, k, b] = spearman(row, baseline)
                bar.update(1)
    return MixingAgreement(methods=tuple(chosen), baselines=BASELINES, values=values)
