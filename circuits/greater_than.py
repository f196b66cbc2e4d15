"""Greater-than (Hanna et al. 2023, "How does GPT-2 compute greater-than?").

"The war lasted from the year 1732 to the year 17" is completed by GPT-2 small with a year
after 32: its probability mass on two-digit tokens YY > 32 far exceeds the mass on YY <= 32.
Hanna et al. measure it with the **probability difference** ``p(YY > start) - p(YY <= start)``
(GPT-2 small: 81.7%), corrupt the start year to "01" (so every year is greater), and find a
circuit of attention heads (5.1, 5.5, 6.1, 6.9, 7.10, 8.8, 8.11, 9.1) that move the start year
to the end, and MLPs 8-11 that compute the comparison.

**SmolLM2's tokenizer writes every digit as its own token** (" 1732" is " ", "1", "7", "3",
"2"), so the paper's setting (one two-digit token YY predicted after "17") does not exist for
it. The model predicts the tens digit first. This module keeps the paper's method and data and
adapts the metric to the tokenizer:

* two-digit tokenizers (GPT-2): ``p(YY > start) - p(YY <= start)`` over the 100 tokens "00".."99";
* one-digit tokenizers (SmolLM2, Llama): the tens digit, ``p(d > D) - p(d < D)`` where ``D`` is
  the start year's tens digit (the equal digit, which needs the next token to decide, counts on
  neither side). Prompts end with the century ("... to the year 17"), so the next token is the
  tens digit.

The adapted metric measures the same comparison one digit coarser; its numbers are not the
paper's and the report says so.

Method (both settings): the metric on clean and corrupt ("01") prompts; activation patching
(denoising) of every head's output and every MLP's output; attribution patching beside it; the
edge graph (EAP-IG) and its faithfulness at several sizes.

    mechkit reproduce greater_than --model smollm2-135m --out reports/greater_than
    python -m circuits.greater_than ...    # the same from a checkout
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import json
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import mechkit as mk
from mechkit.core import head_name

__all__ = ["NOUNS", "PAPER_GPT2", "YearMetric", "GreaterThanReport", "dataset", "reproduce"]

NOUNS = (
    "abduction", "accord", "affair", "arrangement", "attack", "campaign", "case", "conflict",
    "contract", "crisis", "deal", "dispute", "effort", "era", "expedition", "flight", "journey",
    "operation", "pact", "plan", "practice", "process", "program", "project", "reign",
    "relationship",
    "rule", "sanctions", "search", "siege", "strike", "tour", "tradition", "treaty", "trial",
    "voyage", "war",
)  # fmt: skip
TEMPLATE = "The {noun} lasted from the year {century}{yy:02d} to the year {century}"

# Hanna et al. 2023, GPT-2 small (as reported in the paper).
PAPER_GPT2: dict[str, Any] = {
    "model": "gpt2",
    "probability_difference": 0.817,
    "heads": ["5.1", "5.5", "6.1", "6.9", "7.10", "8.8", "8.11", "9.1"],
    "mlps": [8, 9, 10, 11],
}


def digit_mode(model: Any) -> str:
    """``"two-digit"`` when the tokenizer has one token for "32" after " 17", else
    ``"one-digit"``."""
    pieces = model.to_str_tokens(" 1732", prepend_bos=False)
    return "two-digit" if "32" in [p.strip() for p in pieces] else "one-digit"


@dataclasses.dataclass(frozen=True, eq=False)
class YearMetric(mk.Metric):
    """p(later) - p(earlier-or-equal) at each prompt's last position.

    Attributes:
        greater: ``(batch, n_candidates)`` bool, the candidate tokens that count as later.
        smaller: ``(batch, n_candidates)`` bool, those that count as earlier (or equal).
        candidates: ``(n_candidates,)`` token ids ("00".."99", or the digits "0".."9").
        positions: the answer positions.
    """

    greater: torch.Tensor
    smaller: torch.Tensor
    candidates: torch.Tensor
    positions: torch.Tensor

    def per_prompt(self, logits: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(logits.shape[0], device=logits.device)
        at = logits if logits.ndim == 2 else logits[rows, self.positions.to(logits.device)]
        probs = at.float().softmax(-1)[:, self.candidates.to(logits.device)]
        greater = (probs * self.greater.to(probs.device)).sum(-1)
        smaller = (probs * self.smaller.to(probs.device)).sum(-1)
        return greater - smaller

    def select(self, rows: Any) -> YearMetric:
        return dataclasses.replace(
            self, greater=self.greater[rows], smaller=self.smaller[rows],
            positions=self.positions[rows],
        )  # fmt: skip


def dataset(
    model: Any, n: int = 32, *, seed: int = 0
) -> tuple[mk.PromptPairs, YearMetric, list[int], str]:
    """``n`` prompts (start years 1102..1798, YY in 02..98), their "01" corruptions, the metric
    and the digit mode."""
    mode = digit_mode(model)
    rng = random.Random(seed)
    clean, corrupt, yys = [], [], []
    for _ in range(n):
        noun, century, yy = rng.choice(NOUNS), rng.randint(11, 17), rng.randint(2, 98)
        clean.append(TEMPLATE.format(noun=noun, century=century, yy=yy))
        corrupt.append(TEMPLATE.format(noun=noun, century=century, yy=1))
        yys.append(yy)
    if mode == "two-digit":
        texts = [f"{v:02d}" for v in range(100)]
        values = torch.arange(100)
        starts = torch.tensor(yys)
        greater = values[None, :] > starts[:, None]
        smaller = ~greater
    else:
        texts = [str(v) for v in range(10)]
        values = torch.arange(10)
        tens = torch.tensor([y // 10 for y in yys])
        greater = values[None, :] > tens[:, None]
        smaller = values[None, :] < tens[:, None]
    candidates = torch.tensor([mk.tokenize_answer(model, t) for t in texts])
    # answers only name a token for PromptPairs' bookkeeping; the metric reads the candidates
    pairs = mk.PromptPairs.from_lists(model, clean, corrupt, texts[:1] * n, texts[1:2] * n)
    metric = YearMetric(greater, smaller, candidates, pairs.answer_positions())
    return pairs, metric, yys, mode


@dataclasses.dataclass(frozen=True, eq=False)
class GreaterThanReport:
    model_name: str
    mode: str
    n_prompts: int
    clean_score: float
    corrupt_score: float
    heads: mk.patching.PatchResult
    mlps: mk.patching.PatchResult
    attribution_heads: mk.patching.PatchResult
    graph: mk.CircuitGraph
    curve: Any
    seconds: float

    def top_heads(self, n: int = 8) -> list[str]:
        return [head_name(w["layer"], w["head"]) for w, _ in self.heads.normalized().top(n)]

    def top_mlps(self, n: int = 4) -> list[int]:
        return [w["layer"] for w, _ in self.mlps.normalized().top(n)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "digit_mode": self.mode,
            "metric": "p(YY > start) - p(YY <= start)" if self.mode == "two-digit"
            else "p(tens digit > start's) - p(tens digit < start's)",
            "n_prompts": self.n_prompts,
            "probability_difference": self.clean_score,
            "corrupt_probability_difference": self.corrupt_score,
            "top_heads": self.top_heads(),
            "top_mlps": self.top_mlps(),
            "faithfulness": self.curve.to_dataframe().to_dict("records"),
            "seconds": self.seconds,
            "paper_gpt2": PAPER_GPT2,
        }  # fmt: skip

    def write(self, out: str | Path) -> Path:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "greater_than.json").write_text(json.dumps(self.to_dict(), indent=1))
        figures = {
            "heads.html": self.heads.normalized().plot(),
            "mlps.html": self.mlps.normalized().plot(),
            "attribution_heads.html": self.attribution_heads.normalized().plot(),
            "faithfulness.html": self.curve.plot(),
            "circuit.html": self.graph.greedy(100).prune().plot(),
        }
        for name, fig in figures.items():
            fig.write_html(out / name, include_plotlyjs="directory")
        links = " ".join(f'<a href="{n}">{n}</a>' for n in figures)
        data = self.to_dict()
        caveat = (
            ""
            if self.mode == "two-digit"
            else "This model's tokenizer splits years into digits, so the paper's two-digit "
            "setting does not exist for it: the metric reads the tens digit and its numbers are "
            "not comparable with the paper's."
        )
        index = out / "index.html"
        index.write_text(
            f"""<!doctype html><html><head><meta charset="utf-8"><title>Greater-than</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}</style></head><body>
<h1>Greater-than: {html.escape(self.model_name)}</h1>
<p>Tokenizer: {html.escape(self.mode)}; metric: {html.escape(data["metric"])}. {caveat}</p>
<p>Probability difference {self.clean_score:.1%} (corrupt "01": {self.corrupt_score:.1%});
GPT-2 small in the paper: {PAPER_GPT2["probability_difference"]:.1%}.</p>
<p>Heads that restore it most (denoising): {html.escape(", ".join(self.top_heads()))}
(paper: {", ".join(PAPER_GPT2["heads"])}); MLPs: {self.top_mlps()} (paper: 8-11).</p>
<p>Figures: {links}; numbers: <a href="greater_than.json">greater_than.json</a>.</p>
</body></html>
"""
        )
        return index


def reproduce(
    model: Any, *, n_prompts: int = 24, seed: int = 0, sizes: Sequence[int] = (30, 100, 300, 1000)
) -> GreaterThanReport:
    """Hanna et al.'s measurements with the metric the tokenizer allows (module docstring)."""
    start = time.perf_counter()
    pairs, metric, _, mode = dataset(model, n_prompts, seed=seed)
    heads = mk.activation_patch(model, pairs, metric=metric, site="z", progress=False)
    mlps = mk.activation_patch(model, pairs, metric=metric, site="mlp_out", positions="all",
                               progress=False)  # fmt: skip
    attribution = mk.attribution_patch(model, pairs, metric=metric, site="z")
    graph = mk.edge_attribution(model, pairs, metric=metric, method="eap-ig-inputs", progress=False)
    curve = mk.faithfulness_curve(model, graph, pairs, metric=metric, sizes=sizes)
    return GreaterThanReport(
        model_name=str(model.cfg.model_name),
        mode=mode,
        n_prompts=n_prompts,
        clean_score=float(heads.clean_score),
        corrupt_score=float(heads.corrupt_score),
        heads=heads,
        mlps=mlps,
        attribution_heads=attribution,
        graph=graph,
        curve=curve,
        seconds=time.perf_counter() - start,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Greater-than (Hanna et al. 2023).")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", default="reports/greater_than")
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    model = mk.load_model(args.model)
    report = reproduce(model, n_prompts=args.prompts, seed=args.seed)
    index = report.write(args.out)
    print(json.dumps({k: v for k, v in report.to_dict().items() if k != "faithfulness"}, indent=1))
    print(f"wrote {index}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
