"""Induction heads, found and tested in any model (Olsson et al. 2022, "In-context Learning and
Induction Heads"; Elhage et al. 2021, "A Mathematical Framework for Transformer Circuits").

An induction head completes patterns: at a token ``A`` it attends to the token that followed an
earlier ``A`` (prefix matching) and raises that token's logit (copying), so ``... A B ... A`` is
continued with ``B``. It is built by K-composition: a previous-token head in an earlier layer
writes "the token before me was ``A``" into the residual stream at ``B``, and the induction
head's key reads it there. Olsson et al. tie these heads to in-context learning: the loss late in
a context falls below the loss early in it (the in-context-learning score, loss at token 500
minus loss at token 50) when, and because, induction heads form.

:func:`reproduce` follows that method on any HookedTransformer, using mechkit's public API only:

1. **Data**: ``[BOS] + r + r`` with ``r`` random ordinary tokens (seeded).
2. **Prefix matching** (``mk.detect_heads(model, "induction")``) and **copying**
   (``mk.detect_heads(model, "copying")``: does the head's OV circuit raise the logit of the
   token it attends to) for every head; previous-token scores beside them.
3. **In-context-learning score** on natural text (``mk.corpus.corpus_tokens(..., split="test")``):
   mean loss on token 500 minus mean loss on token 50 (each averaged over a window of ``±10``
   tokens, since one token's loss over a few dozen sequences is too noisy to read); models with
   a context shorter than 512 get the positions scaled to their context, and the report says so.
4. **Induction heads**: the heads whose prefix-matching score is at least ``min_score``.
5. **Previous-token heads feeding them**, by path patching into their keys
   (``mk.path_patch(..., receivers=[mk.Site("k", L, H_kv)])``, grouped-query models: the
   key/value head the query head reads): clean ``[BOS] + r + r``, corrupt ``[BOS] + r' + r``
   (the first copy replaced, so the repetition is broken), noising; metric: the mean log-prob of
   the correct token on the second copy. The senders whose corrupt output, reaching only the
   induction heads' keys, lowers it most are the heads that feed them.
6. **Ablation**: the loss on the second copy with the induction heads' ``z`` zero-ablated and
   mean-ablated (``mk.intervene``), beside ablating as many random heads that are neither
   induction nor feeding heads (a control, averaged over several draws).

    >>> report = reproduce(mk.load_model("attn-only-2l"))
    >>> report.induction_heads                    # ((1, 0), (1, 1), (1, 2), (1, 3))
    >>> report.previous_token_heads[0]            # (0, 2): the layer-0 head their keys read
    >>> report.write("reports/induction")

CLI: ``mechkit reproduce induction --model smollm2-135m --out reports/induction`` (from a
checkout also ``python -m circuits.induction ...``).
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

import mechkit as mk

__all__ = [
    "PAPER",
    "Ablation",
    "ICLScore",
    "InductionReport",
    "icl_score",
    "main",
    "per_token_loss",
    "repeated_tokens",
    "reproduce",
]

_LOGIT_FLOATS = 1 << 26  # logits held at once by per_token_loss (256 MiB in float32)

PAPER: dict[str, Any] = {
    "citation": "Olsson et al. 2022, In-context Learning and Induction Heads; Elhage et al. "
    "2021, A Mathematical Framework for Transformer Circuits",
    "icl_score_tokens": {"early": 50, "late": 500},
    "icl_score_phase_change_nats": {"before": -0.15, "after": -0.4},
    "mechanism": "K-composition: a previous-token head's output is read by the induction head's "
    "key; one-layer attention-only models never form induction heads",
    "ablation": "ablating induction heads removes most of the in-context-learning score "
    "(small models, argument 3)",
}


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ICLScore:
    """The in-context-learning score: mean loss late in a context minus early in it.

    Attributes:
        score: ``mean(loss[late ± window]) - mean(loss[early ± window])`` in nats, or None
            when the model has no tokenizer (no natural text to read).
        stderr: its standard error over sequences.
        early, late, window: token indices (0 = the sequence's first token) and half-width.
        n_sequences: held-out sequences averaged.
        loss_by_token: mean loss per token index (index 0 has none: NaN).
        note: how the positions were chosen (scaled to a short context, no tokenizer...).
    """

    score: float | None
    stderr: float | None
    early: int
    late: int
    window: int
    n_sequences: int
    loss_by_token: tuple[float, ...]
    note: str


@dataclasses.dataclass(frozen=True)
class Ablation:
    """The loss on the second copy of ``[BOS] + r + r`` with some heads' ``z`` ablated.

    Attributes:
        heads: the ablated ``(layer, head)`` pairs (for a control: one draw's).
        group: ``"induction"`` or ``"control"`` (random heads, neither induction nor feeding).
        method: ``"zero"`` or ``"mean"`` (z replaced by its mean over prompts, per position).
        loss: the mean loss on the predictable tokens of the second copy (nats).
        increase: ``loss`` minus the unablated model's loss on the same tokens.
    """

    heads: tuple[tuple[int, int], ...]
    group: str
    method: str
    loss: float
    increase: float


@dataclasses.dataclass(frozen=True, eq=False)
class InductionReport:
    """Everything :func:`reproduce` measured; ``.to_dict()``, ``.to_dataframe()``, ``.plot()``,
    ``.write(folder)`` (``.to_html(path)`` for the page alone).

    Attributes:
        model_name: the model.
        prefix_matching, copying, previous_token: per-head scores (``mk.heads.HeadScores``).
        induction_heads: heads with prefix matching ``>= min_score``, best first.
        path_patching: ``mk.patching.PatchResult`` of every head as a sender into the best induction
            heads' keys (score: the metric's value; below the clean value: the head feeds them).
        previous_token_heads: the senders that lower the metric most (the feeding heads).
        icl: the in-context-learning score on natural text.
        repeated_loss: unablated mean loss on the second copy (predictable tokens) and on the
            first copy (unpredictable), ``{"second_copy": ..., "first_copy": ...}``.
        ablations: induction heads zero/mean-ablated, and the control draws.
        settings: the arguments and data sizes used.
        seconds: wall time of each step.
    """

    model_name: str
    prefix_matching: mk.heads.HeadScores
    copying: mk.heads.HeadScores
    previous_token: mk.heads.HeadScores
    induction_heads: tuple[tuple[int, int], ...]
    path_patching: mk.patching.PatchResult
    previous_token_heads: tuple[tuple[int, int], ...]
    icl: ICLScore
    repeated_loss: dict[str, float]
    ablations: tuple[Ablation, ...]
    settings: dict[str, Any]
    seconds: dict[str, float]

    def ablation_summary(self) -> dict[str, dict[str, float]]:
        """Mean loss increase per ``group`` and ``method`` (controls averaged over draws)."""
        out: dict[str, dict[str, list[float]]] = {}
        for a in self.ablations:
            out.setdefault(a.group, {}).setdefault(a.method, []).append(a.increase)
        return {g: {m: sum(v) / len(v) for m, v in ms.items()} for g, ms in out.items()}

    def path_scores(self) -> list[tuple[str, float]]:
        """Every sender's effect through the keys (metric minus its clean value), most negative
        first."""
        clean = float(self.path_patching.clean_score)
        scores = self.path_patching.scores
        pairs = [
            (f"L{layer}H{head}", float(scores[layer, head]) - clean)
            for layer in range(scores.shape[0])
            for head in range(scores.shape[1])
        ]
        return sorted(pairs, key=lambda p: p[1])

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (per-head tables in ``heads``)."""

        def label(heads: tuple[tuple[int, int], ...]) -> list[str]:
            return [f"L{layer}H{head}" for layer, head in heads]

        ps = self.prefix_matching.scores
        effect = dict(self.path_scores())
        return {
            "model": self.model_name,
            "paper": PAPER,
            "induction_heads": [
                {
                    "head": f"L{layer}H{head}",
                    "prefix_matching": round(float(ps[layer, head]), 4),
                    "copying": round(float(self.copying.scores[layer, head]), 4),
                }
                for layer, head in self.induction_heads
            ],
            "previous_token_heads": [
                {
                    "head": f"L{layer}H{head}",
                    "path_patching_effect": round(effect[f"L{layer}H{head}"], 4),
                    "previous_token_score": round(
                        float(self.previous_token.scores[layer, head]), 4
                    ),
                }
                for layer, head in self.previous_token_heads
            ],
            "path_patching_clean_score": round(float(self.path_patching.clean_score), 4),
            "path_patching_corrupt_score": round(float(self.path_patching.corrupt_score), 4),
            "icl": {k: v for k, v in dataclasses.asdict(self.icl).items() if k != "loss_by_token"},
            "repeated_loss": self.repeated_loss,
            "ablation_increase": self.ablation_summary(),
            "ablations": [
                {**dataclasses.asdict(a), "heads": label(a.heads)} for a in self.ablations
            ],
            "heads": self.to_dataframe().to_dict(orient="records"),
            "settings": self.settings,
            "seconds": self.seconds,
        }

    def to_json(self, path: str | Path | None = None) -> str:
        """The summary as JSON; written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2, default=_jsonable) + "\n"
        if path is not None:
            Path(path).write_text(text)
        return text

    def to_dataframe(self) -> Any:
        """One row per head: scores, path-patching effect, and the roles found."""
        import pandas as pd

        effect = dict(self.path_scores())
        n_layers, n_heads = self.prefix_matching.scores.shape
        rows = []
        for layer in range(n_layers):
            for head in range(n_heads):
                name = f"L{layer}H{head}"
                rows.append(
                    {
                        "layer": layer,
                        "head": head,
                        "label": name,
                        "prefix_matching": float(self.prefix_matching.scores[layer, head]),
                        "copying": float(self.copying.scores[layer, head]),
                        "previous_token": float(self.previous_token.scores[layer, head]),
                        "path_patching_effect": effect[name],
                        "induction_head": (layer, head) in self.induction_heads,
                        "feeds_induction_keys": (layer, head) in self.previous_token_heads,
                    }
                )
        return pd.DataFrame(rows)

    def plot(self) -> dict[str, Any]:
        """Plotly figures by name: head maps, prefix matching vs copying, path patching, ICL
        loss curve, ablation bars."""
        import plotly.graph_objects as go

        frame = self.to_dataframe()
        figures: dict[str, Any] = {
            "prefix_matching": self.prefix_matching.plot(),
            "copying": self.copying.plot(),
            "path_patching": self.path_patching.plot(
                title=f"Path patching into the induction heads' keys: {self.model_name}"
            ),
        }
        scatter = go.Figure(
            go.Scatter(
                x=frame["prefix_matching"],
                y=frame["copying"],
                mode="markers",
                text=frame["label"],
                marker={"color": frame["induction_head"].map({True: "crimson", False: "grey"})},
                hovertemplate="%{text}: prefix %{x:.3f}, copying %{y:.3f}<extra></extra>",
            )
        )
        scatter.update_layout(
            title=f"Prefix matching vs copying, every head: {self.model_name}",
            xaxis_title="prefix-matching score",
            yaxis_title="copying score",
        )
        figures["prefix_vs_copying"] = scatter
        loss = self.icl.loss_by_token
        if self.icl.score is not None:
            icl = go.Figure(go.Scatter(x=list(range(len(loss))), y=list(loss), mode="lines"))
            for at in (self.icl.early, self.icl.late):
                icl.add_vline(x=at, line_dash="dot")
            icl.update_layout(
                title=f"Loss by token index on held-out text (ICL score {self.icl.score:+.3f})",
                xaxis_title="token index",
                yaxis_title="loss (nats)",
                xaxis_type="log",
            )
            figures["icl_loss_by_token"] = icl
        summary = self.ablation_summary()
        bars = go.Figure()
        for method in ("zero", "mean"):
            groups = [g for g in ("induction", "control") if method in summary.get(g, {})]
            bars.add_bar(
                name=f"{method} ablation", x=groups, y=[summary[g][method] for g in groups]
            )
        bars.update_layout(
            title=f"Loss increase on repeated tokens, {len(self.induction_heads)} heads ablated",
            yaxis_title="nats",
            barmode="group",
        )
        figures["ablation"] = bars
        return figures

    def write(self, out: str | Path) -> Path:
        """Write the report into the folder ``out`` as the other reproductions do:
        ``index.html`` with its figures beside it, and ``induction.json`` with every number."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "induction.json").write_text(json.dumps(self.to_dict(), indent=1))
        return self.to_html(out / "index.html")

    def to_html(self, path: str | Path) -> Path:
        """A report page at ``path``; each figure is a page beside it loading the one
        ``plotly.min.js`` of the folder (opens offline)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        links = []
        for name, fig in self.plot().items():
            file = f"{path.stem}_{name}.html"
            fig.write_html(path.parent / file, include_plotlyjs="directory")
            links.append(f'<li><a href="{file}">{html.escape(name)}</a></li>')
        data = self.to_dict()
        heads = _html_table(
            data["induction_heads"], ["head", "prefix_matching", "copying"], "Induction heads"
        )
        feeding = _html_table(
            data["previous_token_heads"],
            ["head", "path_patching_effect", "previous_token_score"],
            "Heads feeding their keys (path patching)",
        )
        ablations = _html_table(
            [
                {"group": g, "method": m, "loss_increase": round(v, 4)}
                for g, ms in data["ablation_increase"].items()
                for m, v in ms.items()
            ],
            ["group", "method", "loss_increase"],
            "Loss increase on the second copy when heads are ablated",
        )
        icl = self.icl
        icl_text = (
            "not measured" if icl.score is None else f"{icl.score:+.3f} ± {icl.stderr:.3f} nats"
        )
        page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Induction heads: {html.escape(self.model_name)}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}
table{{border-collapse:collapse;margin-bottom:1em}}td,th{{border:1px solid #ccc;padding:4px 8px}}
</style></head><body>
<h1>Induction heads: {html.escape(self.model_name)}</h1>
<p>{html.escape(PAPER["citation"])}. Method: <code>circuits/induction.py</code>.</p>
<p>In-context-learning score (loss at token {icl.late} minus token {icl.early}, ±{icl.window}
tokens, {icl.n_sequences} held-out sequences): <b>{html.escape(icl_text)}</b>.
{html.escape(icl.note)} Paper: about -0.4 nats after the phase change.</p>
<p>Loss on repeated random tokens: first copy {self.repeated_loss["first_copy"]:.3f},
second copy {self.repeated_loss["second_copy"]:.3f} nats.</p>
{heads}{feeding}{ablations}
<h2>Figures</h2><ul>{"".join(links)}</ul>
<pre>{html.escape(json.dumps(data["settings"], indent=1, default=_jsonable))}</pre>
</body></html>
"""
        path.write_text(page)
        return path


def _html_table(rows: list[dict[str, Any]], columns: list[str], title: str) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(r[c]))}</td>" for c in columns) + "</tr>"
        for r in rows
    )
    return f"<h2>{html.escape(title)}</h2><table><tr>{head}</tr>{body}</table>"


def _jsonable(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


# ----------------------------------------------------------------------------------------------
# Data and losses
# ----------------------------------------------------------------------------------------------


def repeated_tokens(
    model: Any, n_prompts: int, seq_len: int, *, seed: int = 0
) -> Int[Tensor, "batch pos"]:
    """``(n_prompts, 1 + 2 * seq_len)`` prompts ``[BOS] + r + r``, ``r`` being ``seq_len``
    distinct random ordinary tokens (no special tokens).

    Example:
        >>> repeated_tokens(mk.load_model("attn-only-2l"), 4, 10).shape
        torch.Size([4, 21])
    """
    allowed = _ordinary_ids(model)
    gen = torch.Generator().manual_seed(seed)
    picks = torch.multinomial(torch.ones(n_prompts, len(allowed)), seq_len, generator=gen)
    r = allowed[picks]  # (batch, seq_len)
    bos = torch.full((n_prompts, 1), _bos_id(model), dtype=torch.long)
    return torch.cat([bos, r, r], dim=1)


@torch.no_grad()
def per_token_loss(
    model: Any, tokens: Int[Tensor, "batch pos"], *, batch_size: int | None = None
) -> Float[Tensor, "batch pos"]:
    """The loss on each token given the ones before it; column ``i`` is the loss on token ``i``
    (column 0, which nothing predicts, is NaN).

    Args:
        model: a HookedTransformer.
        tokens: ``(batch, pos)`` token ids.
        batch_size: sequences per forward pass; None: as many as keep the logits under
            64 M floats (2 sequences of 512 tokens for a 49k vocabulary).

    Example:
        >>> per_token_loss(model, tokens).shape      # tokens: (4, 21)
        torch.Size([4, 21])
    """
    if batch_size is None:
        batch_size = max(1, _LOGIT_FLOATS // (tokens.shape[1] * model.cfg.d_vocab))
    out = torch.full(tokens.shape, float("nan"))
    for lo in range(0, len(tokens), batch_size):
        batch = tokens[lo : lo + batch_size].to(model.cfg.device)
        logits = model(batch)  # (batch, pos, d_vocab)
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="none"
        )  # (batch * (pos - 1),)
        out[lo : lo + batch_size, 1:] = nll.view(len(batch), -1).cpu()
    return out


def icl_score(
    losses: Float[Tensor, "batch pos"], early: int, late: int, window: int = 0
) -> tuple[float, float]:
    """``(score, standard error)``: per sequence, mean loss on tokens ``late ± window`` minus
    mean loss on tokens ``early ± window``, averaged over sequences.

    Example:
        >>> icl_score(torch.tensor([[0.0, 3.0, 2.0, 1.0]]), early=1, late=3)
        (-2.0, nan)
    """
    if window < 0 or early - window < 1 or late + window >= losses.shape[1] or early >= late:
        raise ValueError(
            f"Expected 1 <= early - window < late + window < {losses.shape[1]} (tokens); got "
            f"early={early}, late={late}, window={window}."
        )
    late_loss = losses[:, late - window : late + window + 1].mean(1)
    early_loss = losses[:, early - window : early + window + 1].mean(1)
    diff = late_loss - early_loss  # (batch,)
    stderr = float(diff.std() / math.sqrt(len(diff))) if len(diff) > 1 else float("nan")
    return float(diff.mean()), stderr


def _bos_id(model: Any) -> int:
    # mechkit exports no BOS accessor; detect_heads uses the tokenizer's BOS, else EOS, else 0
    tok = model.tokenizer
    if tok is not None:
        for bos in (tok.bos_token_id, tok.eos_token_id):
            if bos is not None:
                return int(bos)
    return 0  # toy models: token 0 is BOS


def _ordinary_ids(model: Any) -> Tensor:
    n_vocab, excluded = model.cfg.d_vocab, {_bos_id(model)}
    tok = model.tokenizer
    if tok is not None:
        n_vocab = min(n_vocab, len(tok))
        excluded |= set(tok.all_special_ids) | set(getattr(tok, "added_tokens_decoder", {}))
    keep = torch.ones(n_vocab, dtype=torch.bool)
    keep[[i for i in excluded if i < n_vocab]] = False
    return keep.nonzero()[:, 0]


def _second_copy_logprob(clean: Tensor, seq_len: int) -> Any:
    """Metric for path patching: mean log-prob of the correct token on the second copy's
    predictable tokens (indices ``seq_len + 2 .. 2 * seq_len``), one value per prompt."""
    targets = clean[:, seq_len + 2 :]  # (batch, seq_len - 1)

    def metric(logits: Tensor) -> Tensor:
        logprobs = logits[:, seq_len + 1 : -1].float().log_softmax(-1)  # predicts the targets
        return logprobs.gather(-1, targets.to(logits.device)[..., None])[..., 0].mean(-1)

    return metric


# ----------------------------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------------------------


def reproduce(
    model: Any,
    *,
    n_prompts: int = 16,  # 16 x [BOS] + r + r: 624 predictable tokens for the ablations
    seq_len: int = 40,  # |r|; detect_heads' default, fits a 128-token context
    n_path_prompts: int = 4,  # path patching runs two passes per sender: fewer, shorter
    path_seq_len: int = 20,  # prompts (SmolLM2 on a CPU: ~300 passes from the sender's layer)
    path_heads: int = 3,  # path patching into the keys of the 3 best induction heads
    min_score: float = 0.4,  # an induction head: prefix matching >= 0.4 (perfect = 1)
    n_previous: int = 3,  # feeding heads reported: at most the 3 senders with the largest effect
    feed_fraction: float = 0.1,  # ... each with at least 10% of the largest one's effect
    n_controls: int = 5,  # random control draws, averaged
    copying_tokens: int = 256,  # tokens the copying score samples (detect_heads' default)
    icl_sequences: int | None = 16,  # held-out text sequences (None: all of the test split)
    seed: int = 0,
    progress: bool = False,
) -> InductionReport:
    """Find a model's induction heads and the heads feeding them, and measure what they do.

    Args:
        model: a HookedTransformer (a tokenizer is needed only for the ICL score).
        n_prompts, seq_len: the repeated-token data, ``[BOS] + r + r`` with ``|r| = seq_len``.
        n_path_prompts, path_seq_len: the path-patching prompts, ``[BOS] + r + r`` with
            ``|r| = path_seq_len`` (the same seed as the data).
        path_heads: path patching goes into the keys of this many best induction heads.
        min_score: prefix-matching threshold for an induction head (the best head is always
            one).
        n_previous, feed_fraction: the feeding heads are the (at most ``n_previous``) senders
            that lower the metric through the keys by at least ``feed_fraction`` times the
            largest such drop.
        n_controls: random draws of control heads.
        copying_tokens: how many random tokens the copying score samples (its standard error
            is at most ``0.5 / sqrt(copying_tokens)``).
        icl_sequences: held-out sequences for the ICL score.
        seed: data and control draws.
        progress: path patching's progress bar.

    Returns:
        An :class:`InductionReport`.
    """
    cfg = model.cfg
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        seconds[name] = round(time.perf_counter() - clock, 1)
        clock = time.perf_counter()

    # 1. repeated random tokens: the first copy is unpredictable, the second predictable by
    #    induction (token seq_len + 1 starts it; it can be predicted from the one after)
    tokens = repeated_tokens(model, n_prompts, seq_len, seed=seed)  # (batch, 1 + 2 * seq_len)

    # 2. prefix matching, copying and previous-token scores for every head
    prefix = mk.detect_heads(model, "induction", tokens=tokens)
    copying = mk.detect_heads(model, "copying", seed=seed, n_tokens=copying_tokens)
    previous = mk.detect_heads(model, "previous_token", tokens=tokens)
    lap("head_scores")

    # 3. the in-context-learning score on held-out natural text
    icl = _icl(model, icl_sequences)
    lap("icl_score")

    # 4. the induction heads: prefix matching >= min_score, best first (at least the best)
    ranked = prefix.scores.flatten().argsort(descending=True).tolist()
    induction = tuple(
        (i // cfg.n_heads, i % cfg.n_heads)
        for k, i in enumerate(ranked)
        if k == 0 or float(prefix.scores.flatten()[i]) >= min_score
    )

    # 5. path patching into their keys: clean [BOS] r r, corrupt [BOS] r' r (repetition broken);
    #    keys are per key/value head in grouped-query models
    n = path_seq_len
    clean = repeated_tokens(model, n_path_prompts, n, seed=seed)  # (batch, 1 + 2n)
    fresh = repeated_tokens(model, n_path_prompts, n, seed=seed + 1)
    corrupt = torch.cat([clean[:, :1], fresh[:, 1 : 1 + n], clean[:, 1 + n :]], 1)  # r' r
    group = cfg.n_heads // (cfg.n_key_value_heads or cfg.n_heads)  # query heads per kv head
    receivers = sorted({(layer, head // group) for layer, head in induction[:path_heads]})
    patched = mk.path_patch(
        model,
        clean,
        corrupt,
        _second_copy_logprob(clean, n),
        senders="heads",
        receivers=[mk.Site("k", layer=layer, head=kv) for layer, kv in receivers],
        direction="noising",
        progress=progress,
    )
    effect = (patched.scores - patched.clean_score).flatten()  # (layer * head,)
    strongest = float(effect.min())
    feeding = tuple(
        (i // cfg.n_heads, i % cfg.n_heads)
        for i in effect.argsort().tolist()[:n_previous]
        if strongest < 0 and float(effect[i]) <= feed_fraction * strongest
    )
    lap("path_patching")

    # 6. ablation of the induction heads' z (zero, mean), and of random control heads
    losses = per_token_loss(model, tokens)  # (batch, pos)
    repeated_loss = {
        "first_copy": float(losses[:, 2 : 1 + seq_len].mean()),
        "second_copy": float(losses[:, seq_len + 2 :].mean()),
    }
    mean_z = _mean_z(model, tokens)
    taken = set(induction) | set(feeding)
    others = [
        (layer, head)
        for layer in range(cfg.n_layers)
        for head in range(cfg.n_heads)
        if (layer, head) not in taken
    ]
    gen = torch.Generator().manual_seed(seed)
    draws: list[tuple[tuple[int, int], ...]] = []  # distinct draws of len(induction) heads
    for _ in range(n_controls if others else 0):
        picks = torch.randperm(len(others), generator=gen)[: len(induction)].tolist()
        draw = tuple(sorted(others[i] for i in picks))
        if draw not in draws:
            draws.append(draw)
    ablations = []
    for heads, grp in [(induction, "induction"), *((d, "control") for d in draws)]:
        for method in ("zero", "mean"):
            loss = _ablated_loss(model, tokens, heads, method, mean_z, seq_len)
            ablations.append(
                Ablation(
                    heads=tuple(sorted(heads)),
                    group=grp,
                    method=method,
                    loss=round(loss, 4),
                    increase=round(loss - repeated_loss["second_copy"], 4),
                )
            )
    lap("ablation")

    return InductionReport(
        model_name=prefix.model_name,
        prefix_matching=prefix,
        copying=copying,
        previous_token=previous,
        induction_heads=induction,
        path_patching=patched,
        previous_token_heads=feeding,
        icl=icl,
        repeated_loss={k: round(v, 4) for k, v in repeated_loss.items()},
        ablations=tuple(ablations),
        settings={
            "n_prompts": n_prompts,
            "seq_len": seq_len,
            "n_path_prompts": n_path_prompts,
            "path_seq_len": path_seq_len,
            "path_heads": [f"L{layer}H{head}" for layer, head in induction[:path_heads]],
            "min_score": min_score,
            "n_previous": n_previous,
            "feed_fraction": feed_fraction,
            "n_controls": n_controls,
            "copying_tokens": copying_tokens,
            "control_pool": [f"L{layer}H{head}" for layer, head in others]
            if len(others) <= 8
            else f"{len(others)} heads (neither induction nor feeding)",
            "icl_sequences": icl_sequences,
            "seed": seed,
            "path_patching": "clean [BOS] r r, corrupt [BOS] r' r, noising, receivers "
            + ", ".join(f"k of L{layer} kv head {kv}" for layer, kv in receivers)
            + "; metric: mean log-prob of the correct token on the second copy",
            "mean_ablation": "z replaced by its mean over the prompts at each position",
        },
        seconds=seconds,
    )


def _icl(model: Any, n_sequences: int | None) -> ICLScore:
    """The ICL score on held-out text: tokens 500 vs 50 (±10), scaled to short contexts."""
    n_ctx = model.cfg.n_ctx
    if model.tokenizer is None:
        return ICLScore(None, None, 0, 0, 0, 0, (), "no tokenizer: natural text cannot be read")
    if n_ctx >= 512:
        early, late, window, seq = 50, 500, 10, 512
        note = "Tokens 50 and 500 as in the paper."
    else:
        early, late = max(3, n_ctx // 50), n_ctx * 500 // 512
        window = max(1, early // 5)
        late = min(late, n_ctx - 1 - window)
        seq = n_ctx
        note = f"Context of {n_ctx} tokens: the paper's 50 and 500 scaled to {early} and {late}."
    text = mk.corpus.corpus_tokens(model, seq_len=seq, split="test", max_sequences=n_sequences)
    losses = per_token_loss(model, text)
    score, stderr = icl_score(losses, early, late, window)
    curve = tuple(round(float(v), 4) for v in losses.mean(0))
    note += f" Each token's loss is averaged with its ±{window} neighbours."
    return ICLScore(score, stderr, early, late, window, len(text), curve, note)


@torch.no_grad()
def _mean_z(model: Any, tokens: Tensor) -> dict[int, Tensor]:
    """Per layer, every head's ``z`` averaged over the prompts: ``(pos, head, d_head)``."""
    sites = [mk.Site("z", layer=layer) for layer in range(model.cfg.n_layers)]
    with mk.capture(model, *sites) as z:
        model(tokens.to(model.cfg.device))
    return {s.layer: z[s].mean(0) for s in sites}  # (pos, head, d_head)


@torch.no_grad()
def _ablated_loss(
    model: Any,
    tokens: Tensor,
    heads: tuple[tuple[int, int], ...],
    method: str,
    mean_z: dict[int, Tensor],
    seq_len: int,
) -> float:
    """Mean loss on the second copy's predictable tokens with ``heads``' z ablated."""
    edits = [
        mk.Zero(mk.Site("z", layer=layer, head=head))
        if method == "zero"
        else mk.Patch(mk.Site("z", layer=layer, head=head), mean_z[layer][:, head])
        for layer, head in heads
    ]
    with mk.intervene(model, *edits):
        losses = per_token_loss(model, tokens)
    return float(losses[:, seq_len + 2 :].mean())


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """``mechkit reproduce induction --model smollm2-135m --out reports/induction`` (from a
    checkout also ``python -m circuits.induction ...``)."""
    parser = argparse.ArgumentParser(description="Induction heads (Olsson et al. 2022).")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", type=Path, default=Path("reports/induction"))
    parser.add_argument("--device", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompts", type=int, default=16, help="repeated-token sequences")
    parser.add_argument(
        "--icl-sequences", type=int, default=16, help="held-out text sequences for the ICL score"
    )
    args = parser.parse_args(argv)
    model = mk.load_model(args.model, device=args.device)
    report = reproduce(
        model,
        n_prompts=args.prompts,
        icl_sequences=args.icl_sequences,
        seed=args.seed,
        progress=True,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    report.to_json(args.out / "induction.json")
    page = report.write(args.out)
    data = report.to_dict()
    print(json.dumps({k: data[k] for k in ("induction_heads", "previous_token_heads")}, indent=1))
    print("ICL score:", data["icl"]["score"], "| ablation:", data["ablation_increase"])
    print(f"wrote {page}")


if __name__ == "__main__":
    main()
