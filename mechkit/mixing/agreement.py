"""How well each context-mixing map agrees with input attributions of the prediction, by the
evaluation of the papers themselves (Abnar & Zuidema 2020; Ferrando et al. 2022; Mohebbi et al.
2023): the Spearman rank correlation, over the tokens of a prompt, between what the last
position draws on in a method's map over all layers and

- **input x gradient**: ``sum_d g_jd e_jd``, token ``j``'s embedding times the gradient of the
  target logit (difference) at the last position with respect to it;
- **occlusion** (erasure): the change of that target when token ``j`` is deleted,

both computed by :func:`mechkit.attribute_inputs` (``method="input_x_gradient"`` and
``"occlusion"``, ``kind="logit"``) on the same prompt and target, over the tokens it attributes
(a leading BOS is not). Every map and attribution is compared by its size (signed maps: ALTI-
Logit, DecompX logit shares; signed attributions). The numbers are per prompt, then averaged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mechkit.core.progress import progress_bar
from mechkit.core.results import rank
from mechkit.core.types import Model
from mechkit.errors import InvalidArgumentError, check_choice
from mechkit.input_attribution import attribute_inputs
from mechkit.metrics import LogitDiff
from mechkit.mixing.api import answer_ids, context_mixing
from mechkit.mixing.registry import METHODS
from mechkit.tokens import token_batch

__all__ = ["MixingAgreement", "mixing_agreement", "spearman", "baseline_scores"]

BASELINES = ("input_x_gradient", "occlusion")
"""The :func:`mechkit.attribute_inputs` methods the maps are held against."""


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


def baseline_scores(
    model: Model,
    prompt: Int[Tensor, "1 pos"],
    answer: int,
    wrong: int | None = None,
    memory_budget: int | str | None = None,
) -> tuple[Float[Tensor, "baseline pos"], Bool[Tensor, " pos"]]:
    """The baselines' sizes for one unpadded prompt, by :func:`mechkit.attribute_inputs`, and
    the positions it attributes (a leading BOS is not).

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> scores, kept = baseline_scores(model, torch.tensor([[1, 2, 3]]), answer=5)
        >>> scores.shape, kept.tolist()                  # (baseline, pos)
        (torch.Size([2, 3]), [True, True, True])
    """
    ids = [[int(t) for t in prompt[0].tolist()]]
    target: Any = (
        answer if wrong is None else LogitDiff(torch.tensor([answer]), torch.tensor([wrong]))
    )
    found = [
        attribute_inputs(
            model,
            ids,
            target,
            method=method,
            kind="logit",
            memory_budget=memory_budget,
            progress=False,
        )
        for method in BASELINES
    ]
    scores = torch.stack([r.scores[0].abs() for r in found])
    return scores, found[0].attributed[0]


@dataclasses.dataclass(frozen=True, eq=False)
class MixingAgreement:
    """Spearman correlations of each method's map with each baseline, per prompt.

    Attributes:
        methods: the methods compared.
        baselines: ``("input_x_gradient", "occlusion")``, methods of
            :func:`mechkit.attribute_inputs`.
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
            ['rollout/input_x_gradient', 'rollout/occlusion']
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
            ['method', 'input_x_gradient', 'occlusion', 'prompts']
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
    layers) with input x gradient and with occlusion of the target logit (both by
    :func:`mechkit.attribute_inputs`), prompt by prompt, over the tokens those attribute.

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
            baselines, kept = baseline_scores(model, prompt, target, other, memory_budget)
            kept = kept.cpu()
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
                for k, baseline in enumerate(baselines.cpu()):
                    values[m, k, b] = spearman(row[kept], baseline[kept])
                bar.update(1)
    return MixingAgreement(methods=tuple(chosen), baselines=BASELINES, values=values)
