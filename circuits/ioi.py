"""Indirect object identification (Wang et al. 2022, "Interpretability in the Wild").

In "When Mary and John went to the store, John gave a drink to", a model predicts " Mary": the
indirect object (IO), not the repeated subject (S). Wang et al. found the circuit in GPT-2 small
that does it: **name movers** copy the IO name to the output (and **negative name movers**
write against it); **S-inhibition** heads tell the name movers' queries which name is
duplicated; **induction** and **duplicate-token** heads detect the duplicate at S2; and
**previous-token** heads feed the induction heads. This module reproduces their method on any
model mechkit loads, step by step, with mechkit's public API only:

1. the dataset: 15 templates in BABA and ABBA order, names that are single tokens for the
   model's tokenizer, places and objects; the corruption p_ABC replaces the three names with
   three unrelated ones (same template, same token positions);
2. the model's logit difference logit(IO) - logit(S) and how often IO wins;
3. direct logit attribution by head at the final position: name movers (large positive) and
   negative name movers (large negative). The attention check comes first: only a head that
   attends from the end to IO (at least ``min_attention``, and more than to S2) can be a name
   mover, and the class threshold is taken among the heads that pass it;
3b. backup name movers (Wang et al. sec. 3.4): with the name movers mean-ablated, the heads
   whose direct effect rises most, and that then attend to IO;
4. path patching (noising with p_ABC) from every head into the name movers' queries:
   S-inhibition heads;
5. path patching into the S-inhibition heads' values: induction and duplicate-token heads, told
   apart by their induction and duplicate-token scores on repeated random tokens;
6. path patching into the induction heads' keys: previous-token heads;
   Heads with a large direct effect that do not attend to IO are reported as "other direct"
   (a class the paper did not need for GPT-2) and kept in the circuit;
7. the circuit's faithfulness with every other head mean-ablated over p_ABC (per template),
   completeness (ablating a class from the circuit and from the model should hurt alike) and
   minimality (each head's own contribution inside the circuit), on the prompts the classes
   were assigned on and on a second, larger set drawn with another seed over all 15 templates
   (the held-out numbers are the ones to quote).

    mechkit reproduce ioi --model smollm2-135m --out reports/ioi --prompts 32
    python -m circuits.ioi ...    # the same from a checkout

GPT-2 small's published figures (``PAPER_GPT2``) are kept as data; with ``--model gpt2`` (its
weights on disk or from the hub) the report shows ours beside the paper's.
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
from mechkit.core import head_name, parse_node

__all__ = [
    "BABA_TEMPLATES",
    "PAPER_GPT2",
    "IOIDataset",
    "IOIReport",
    "ioi_dataset",
    "reproduce",
]

# ----------------------------------------------------------------------------------- data

# The paper's 15 BABA templates ([B] the subject, [A] the indirect object); ABBA swaps the
# first two names. Each prompt stops before the final [A], the answer.
BABA_TEMPLATES = (
    "Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to",
    "Then, [B] and [A] had a lot of fun at the [PLACE]. [B] gave a [OBJECT] to",
    "Then, [B] and [A] were working at the [PLACE]. [B] decided to give a [OBJECT] to",
    "Then, [B] and [A] were thinking about going to the [PLACE]. [B] wanted to give a [OBJECT] to",
    "Then, [B] and [A] had a long argument, and afterwards [B] said to",
    "After [B] and [A] went to the [PLACE], [B] gave a [OBJECT] to",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give it to",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give the [OBJECT] to",
    "While [B] and [A] were working at the [PLACE], [B] gave a [OBJECT] to",
    "While [B] and [A] were commuting to the [PLACE], [B] gave a [OBJECT] to",
    "After the lunch, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to",
    "Afterwards, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to",
    "Then, [B] and [A] had a long argument. Afterwards [B] said to",
    "The [PLACE] [B] and [A] went to had a [OBJECT]. [B] gave it to",
    "Friends [B] and [A] found a [OBJECT] at the [PLACE]. [B] gave it to",
)
PLACES = ("store", "garden", "restaurant", "school", "hospital", "office", "house", "station")
OBJECTS = ("ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack")
_NAME_TEXT = """
Aaron Adam Alan Alex Alice Amy Anderson Andre Andrew Andy Anna Anthony Arthur Austin Blake Brian
Carl Charles Charlie Christian Christopher Clark Cole Daniel David Dean Edward Elizabeth Emily
Eric Eva Ford Frank George Georgia Graham Grant Henry Ian Jack Jacob Jake James Jamie Jane Jason
Jay Jennifer Jeremy Jessica John Jonathan Jordan Joseph Joshua Justin Kate Kelly Kevin Laura Leon
Lewis Lisa Louis Luke Madison Marco Marcus Maria Mark Martin Mary Matthew Max Michael Michelle
Morgan Patrick Paul Peter Prince Rachel Richard River Robert Roman Rose Ruby Russell Ryan Sarah
Scott Sean Simon Stephen Steven Sullivan Taylor Thomas Tyler Victoria Warren William
"""
NAMES = tuple(_NAME_TEXT.split())

# Wang et al. 2022 on GPT-2 small ("layer.head"); faithfulness with mean ablation over p_ABC.
PAPER_GPT2: dict[str, Any] = {
    "model": "gpt2",
    "logit_diff": 3.56,
    "io_over_s": 0.993,
    "faithfulness": 0.87,
    "classes": {
        "name mover": ["9.9", "9.6", "10.0"],
        "negative name mover": ["10.7", "11.10"],
        "s-inhibition": ["7.3", "7.9", "8.6", "8.10"],
        "induction": ["5.5", "6.9"],
        "duplicate token": ["0.1", "3.0"],
        "previous token": ["2.2", "4.11"],
        "backup name mover": ["9.0", "9.7", "10.1", "10.2", "10.6", "10.10", "11.2", "11.9"],
    },
}
CLASSES = tuple(PAPER_GPT2["classes"])


@dataclasses.dataclass(frozen=True, eq=False)
class IOIDataset:
    """IOI prompts with their p_ABC corruptions.

    Attributes:
        pairs: clean IOI prompts and p_ABC prompts, answer IO, wrong answer S.
        templates: the template index of each prompt; orders: ``"BABA"`` or ``"ABBA"``.
        io, s1, s2, end: the token positions of the IO name, both subject names and the last
            token of each prompt.
        seed: the seed that drew the dataset.
    """

    pairs: mk.PromptPairs
    templates: tuple[int, ...]
    orders: tuple[str, ...]
    io: torch.Tensor
    s1: torch.Tensor
    s2: torch.Tensor
    end: torch.Tensor
    seed: int

    def __len__(self) -> int:
        return len(self.templates)


def single_token_names(model: Any) -> list[str]:
    """The names of ``NAMES`` that are one token (with their leading space) for ``model``."""
    return [n for n in NAMES if len(model.to_tokens(" " + n, prepend_bos=False)[0]) == 1]


def _names(template: str, io: str, s1: str, s2: str) -> str:
    """[A] -> io; the first [B] -> s1, the last [B] -> s2."""
    head, _, tail = template.replace("[A]", io).rpartition("[B]")
    return head.replace("[B]", s1) + s2 + tail


def ioi_dataset(model: Any, n: int = 32, *, seed: int = 0) -> IOIDataset:
    """``n`` IOI prompts (half BABA, half ABBA, templates in turn) and their p_ABC corruptions.

    Names, places and objects are drawn with ``seed``; names are single tokens for the model.
    """
    names = single_token_names(model)
    if len(names) < 5:
        raise mk.MechkitError(
            f"Expected at least 5 single-token names for this tokenizer; found {len(names)}."
        )
    rng = random.Random(seed)
    rows, templates, orders = [], [], []
    for i in range(n):
        t = i % len(BABA_TEMPLATES)
        order = "BABA" if (i // len(BABA_TEMPLATES)) % 2 == 0 else "ABBA"
        a, b, c, d, e = rng.sample(names, 5)
        place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
        template = BABA_TEMPLATES[t]
        if order == "ABBA":
            template = template.replace("[B] and [A]", "[A] and [B]", 1)

        filled = template.replace("[PLACE]", place).replace("[OBJECT]", obj)
        clean = _names(filled, a, b, b)
        corrupt = _names(filled, c, d, e)  # p_ABC: three unrelated names
        rows.append((clean, corrupt, " " + a, " " + b))
        templates.append(t)
        orders.append(order)
    clean, corrupt, answers, wrongs = (list(x) for x in zip(*rows, strict=True))
    pairs = mk.PromptPairs.from_lists(model, clean, corrupt, answers, wrongs)
    tokens = pairs.clean_tokens
    io = torch.zeros(n, dtype=torch.long)
    s1, s2 = torch.zeros_like(io), torch.zeros_like(io)
    for i in range(n):
        row = tokens[i, : int(pairs.clean_lengths[i])]
        io[i] = (row == pairs.answer[i]).nonzero()[0, 0]
        s_at = (row == pairs.wrong[i]).nonzero()[:, 0]
        s1[i], s2[i] = s_at[0], s_at[-1]
    return IOIDataset(
        pairs, tuple(templates), tuple(orders), io, s1, s2, pairs.answer_positions(), seed
    )


# ----------------------------------------------------------------------------------- method


@dataclasses.dataclass(frozen=True, eq=False)
class IOIReport:
    """Every number of the reproduction, the evidence per head, and the figures' data.

    ``assignment`` and ``evaluation`` hold the circuit's scores (faithfulness, completeness,
    minimality) on the prompts the classes were assigned on and on the held-out prompts drawn
    with ``eval_seed``; ``faithfulness`` is the held-out one.
    """

    model_name: str
    n_prompts: int
    n_path_prompts: int
    seed: int
    logit_diff: float
    io_over_s: float
    classes: dict[str, list[dict[str, Any]]]
    assignment: dict[str, Any]
    evaluation: dict[str, Any]
    dla: torch.Tensor  # (layer, head)
    dla_movers_ablated: torch.Tensor  # (layer, head), the name movers mean-ablated
    path_scores: dict[str, mk.patching.PatchResult]
    circuit: mk.CircuitGraph
    seconds: float

    @property
    def faithfulness(self) -> float:
        """The circuit's faithfulness on the held-out prompts."""
        return float(self.evaluation["faithfulness"])

    def heads(self, kind: str) -> list[str]:
        return [h["head"] for h in self.classes.get(kind, [])]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "n_prompts": self.n_prompts,
            "n_path_prompts": self.n_path_prompts,
            "seed": self.seed,
            "logit_diff": self.logit_diff,
            "io_over_s": self.io_over_s,
            "classes": self.classes,
            "faithfulness": self.faithfulness,
            "assignment_prompts": self.assignment,
            "evaluation_prompts": self.evaluation,
            "seconds": self.seconds,
            "paper_gpt2": PAPER_GPT2,
        }

    def to_dataframe(self) -> Any:
        """One row per head in the circuit: class, head and its evidence."""
        import pandas as pd

        rows = [{"class": kind, **item} for kind, items in self.classes.items() for item in items]
        return pd.DataFrame(rows)

    def plot(self) -> Any:
        """The heads' direct logit attribution to logit(IO) - logit(S), layer x head."""
        import plotly.express as px

        return px.imshow(
            self.dla.numpy(),
            labels={"x": "head", "y": "layer", "color": "DLA"},
            color_continuous_scale="RdBu",
            color_continuous_midpoint=0.0,
            aspect="auto",
            title=f"Direct logit attribution to logit(IO) - logit(S), {self.model_name}",
        )

    def plot_backup(self) -> Any:
        """How each head's direct logit attribution changes when the name movers are
        mean-ablated (backup name movers rise), layer x head."""
        import plotly.express as px

        return px.imshow(
            (self.dla_movers_ablated - self.dla).numpy(),
            labels={"x": "head", "y": "layer", "color": "change in DLA"},
            color_continuous_scale="RdBu",
            color_continuous_midpoint=0.0,
            aspect="auto",
            title=f"Change in DLA with the name movers mean-ablated, {self.model_name}",
        )

    def write(self, out: str | Path) -> Path:
        """Write ``index.html`` with the figures, the circuit (JSON, SVG, plotly) and
        ``ioi.json`` with every number into ``out``."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "ioi.json").write_text(json.dumps(self.to_dict(), indent=1))
        self.circuit.save(out / "ioi_circuit.json")
        (out / "ioi_circuit.svg").write_text(self.circuit.to_svg())
        figures = {
            "dla.html": self.plot(),
            "backup.html": self.plot_backup(),
            "circuit.html": self.circuit.plot(),
        }
        for name, result in self.path_scores.items():
            figures[f"path_{name}.html"] = result.plot(title=f"Path patching into {name}")
        for name, fig in figures.items():
            fig.write_html(out / name, include_plotlyjs="directory")
        page = _page(self, sorted(figures))
        index = out / "index.html"
        index.write_text(page)
        return index


def reproduce(
    model: Any,
    *,
    n_prompts: int = 32,
    n_path_prompts: int = 8,
    n_eval_prompts: int = 64,
    seed: int = 0,
    eval_seed: int | None = None,
    threshold: float = 0.2,
    min_attention: float = 0.1,
    max_per_class: int = 4,
    head_prompts: int = 16,
    progress: bool = False,
) -> IOIReport:
    """Wang et al.'s method on ``model``, from the dataset to the circuit's faithfulness.

    Args:
        model: a HookedTransformer whose tokenizer has single-token names.
        n_prompts, seed: the prompts the classes are assigned on (logit difference, DLA,
            attention, backup name movers).
        n_path_prompts: the first prompts of the dataset used for path patching (two passes
            per sender; on a CPU the cost that decides the run time). All 15 templates are
            covered from 15 prompts up.
        n_eval_prompts, eval_seed: the held-out prompts the circuit is evaluated on as well
            (all 15 templates from 15 prompts up; ``eval_seed`` None: ``seed + 1``).
        threshold: a head joins a class when its score is at least this fraction of the
            strongest score among the heads that qualify (at most ``max_per_class`` heads).
        min_attention: the attention from the end to IO a (backup or negative) name mover
            needs, besides attending to IO more than to S2.
        head_prompts: repeated random sequences the induction, duplicate-token and
            previous-token scores are read on (``mk.detect_heads``'s ``n_prompts``).
        progress: progress bars of the patching sweeps.
    """
    start = time.perf_counter()
    data = ioi_dataset(model, n_prompts, seed=seed)
    pairs = data.pairs
    metric = mk.LogitDiff.from_pairs(pairs)
    eval_seed = seed + 1 if eval_seed is None else eval_seed
    if eval_seed == seed:
        raise mk.InvalidArgumentError(
            f"Expected an eval_seed other than seed ({seed}): the circuit is evaluated on "
            "prompts it was not found on. Hint: leave eval_seed out (seed + 1)."
        )

    # 2. the model's behaviour
    with torch.no_grad():
        per_prompt = metric.per_prompt(model(pairs.clean_tokens))
    logit_diff, io_over_s = float(per_prompt.mean()), float((per_prompt > 0).float().mean())

    # 3. name movers and negative name movers: direct logit attribution at the end. The
    # attention check comes first (Wang et al. sec. 3.1: a name mover attends from the end to
    # IO and copies it); the class threshold is relative to the best head that passes it.
    dla = mk.direct_logit_attribution(model, pairs).head_scores()  # (layer, head)
    attention = _attention_from_end(model, data)
    passes = _attends_to_io(attention, min_attention)  # (layer, head) bool
    classes: dict[str, list[dict[str, Any]]] = {k: [] for k in (*CLASSES, "other direct")}
    movers: list[tuple[tuple[int, int], float]] = []
    for sign, kind in ((1.0, "name mover"), (-1.0, "negative name mover")):
        picked = _pick((sign * dla).masked_fill(~passes, 0.0), threshold, max_per_class)
        for (layer, head), value in picked:
            classes[kind].append(_evidence(layer, head, dla=sign * value, **attention[layer][head]))
        if sign > 0:
            movers = picked
    # heads with a large direct effect that fail the check: kept apart, as evidence
    failing = dla.abs().masked_fill(passes, 0.0)
    for (layer, head), _ in _pick(failing, threshold, max_per_class, best=dla.abs().max()):
        classes["other direct"].append(
            _evidence(layer, head, dla=float(dla[layer, head]), **attention[layer][head])
        )

    # 3b. backup name movers: the name movers mean-ablated, whose direct effect rises?
    means = _template_means(model, data)
    mover_heads = [h for h, _ in movers]
    with torch.no_grad(), mk.intervene(model, *_mean_ablations(mover_heads, means)):
        dla_ablated = mk.direct_logit_attribution(model, pairs).head_scores()
        attention_ablated = _attention_from_end(model, data)
    rise = dla_ablated - dla
    taken = {(layer, head) for items in classes.values() for h in items
             for layer, head in [_parse(h["head"])]}  # fmt: skip
    eligible = _attends_to_io(attention_ablated, min_attention)
    for cell in taken:
        eligible[cell] = False
    if mover_heads:
        for (layer, head), value in _pick(rise.masked_fill(~eligible, 0.0), threshold,
                                          2 * max_per_class):  # fmt: skip
            seen = attention_ablated[layer][head]
            classes["backup name mover"].append(_evidence(
                layer, head, dla=float(dla[layer, head]), dla_rise=value,
                attn_end_to_io_movers_ablated=seen["attn_end_to_io"],
                attn_end_to_s2_movers_ablated=seen["attn_end_to_s2"],
            ))  # fmt: skip

    # 4. S-inhibition: every head's path into the name movers' queries
    path_scores: dict[str, mk.patching.PatchResult] = {}
    mover_sites = [mk.Site("q", layer=layer, head=head) for (layer, head), _ in movers]
    path_pairs = pairs[: min(n_path_prompts, len(pairs))]
    s_inhibition: list[tuple[tuple[int, int], float]] = []
    if mover_sites:
        into_q = _path(model, path_pairs, mover_sites, progress)
        path_scores["name mover queries"] = into_q
        first_mover = min(layer for (layer, _), _ in movers)
        s_inhibition = _pick(_drop(into_q, before_layer=first_mover), threshold, max_per_class)
    for (layer, head), value in s_inhibition:
        classes["s-inhibition"].append(_evidence(layer, head, path_drop_into_movers=value))

    # 5. induction and duplicate-token heads: paths into the S-inhibition heads' values
    induction_scores, duplicate_scores, previous_scores = (
        mk.detect_heads(model, kind, n_prompts=head_prompts, progress=False).scores
        for kind in ("induction", "duplicate_token", "previous_token")
    )
    group = model.cfg.n_heads // (model.cfg.n_key_value_heads or model.cfg.n_heads)
    value_sites = _unique_sites("v", [(lay, h // group) for (lay, h), _ in s_inhibition])
    induction: list[tuple[tuple[int, int], float]] = []
    if value_sites:
        into_v = _path(model, path_pairs, value_sites, progress)
        path_scores["s-inhibition values"] = into_v
        first = min(s.layer for s in value_sites)
        found = _pick(_drop(into_v, before_layer=first), threshold, 2 * max_per_class)
        for (layer, head), value in found:
            ind, dup = float(induction_scores[layer, head]), float(duplicate_scores[layer, head])
            kind = "induction" if ind >= dup else "duplicate token"
            classes[kind].append(
                _evidence(layer, head, path_drop_into_s_inhibition=value, induction_score=ind,
                          duplicate_token_score=dup)
            )  # fmt: skip
            if kind == "induction":
                induction.append(((layer, head), value))

    # 6. previous-token heads: paths into the induction heads' keys
    key_sites = _unique_sites("k", [(lay, h // group) for (lay, h), _ in induction])
    if key_sites:
        into_k = _path(model, path_pairs, key_sites, progress)
        path_scores["induction keys"] = into_k
        first = min(s.layer for s in key_sites)
        for (layer, head), value in _pick(_drop(into_k, first), threshold, max_per_class):
            classes["previous token"].append(
                _evidence(layer, head, path_drop_into_induction_keys=value,
                          previous_token_score=float(previous_scores[layer, head]))
            )  # fmt: skip

    # 7. faithfulness, completeness, minimality: mean ablation over p_ABC, per template, on
    # the assignment prompts and on held-out prompts
    assignment = _circuit_scores(model, data, classes, means)
    held_out = ioi_dataset(model, n_eval_prompts, seed=eval_seed)
    evaluation = _circuit_scores(model, held_out, classes, _template_means(model, held_out))

    graph = _circuit_graph(model, classes, path_scores, dla)
    return IOIReport(
        model_name=str(getattr(model.cfg, "model_name", "model")),
        n_prompts=n_prompts,
        n_path_prompts=len(path_pairs),
        seed=seed,
        logit_diff=logit_diff,
        io_over_s=io_over_s,
        classes={k: v for k, v in classes.items()},
        assignment=assignment,
        evaluation=evaluation,
        dla=dla,
        dla_movers_ablated=dla_ablated,
        path_scores=path_scores,
        circuit=graph,
        seconds=time.perf_counter() - start,
    )


def _circuit_scores(
    model: Any,
    data: IOIDataset,
    classes: dict[str, list[dict[str, Any]]],
    means: list[torch.Tensor],
) -> dict[str, Any]:
    """Faithfulness, completeness and minimality of the circuit on ``data`` (Wang et al.
    sec. 4), every head outside the kept set mean-ablated over ``data``'s p_ABC prompts."""
    metric = mk.LogitDiff.from_pairs(data.pairs)
    circuit_heads = sorted({_parse(h["head"]) for items in classes.values() for h in items})
    everything = [(layer, head) for layer in range(model.cfg.n_layers)
                  for head in range(model.cfg.n_heads)]  # fmt: skip
    kinds = [(kind, {_parse(h["head"]) for h in items}) for kind, items in classes.items() if items]
    sets: list[list[tuple[int, int]]] = [everything, circuit_heads, []]
    for _, removed in kinds:
        sets.append([h for h in circuit_heads if h not in removed])
        sets.append([h for h in everything if h not in removed])
    sets += [[h for h in circuit_heads if h != head] for head in circuit_heads]
    scorer = _ablated_scores_fn(model, data, metric, means)
    values = iter(scorer(sets, reference=circuit_heads))  # in the order above
    full, circuit_ld, none = next(values), next(values), next(values)
    completeness = []
    for kind, _ in kinds:
        in_circuit, in_model = next(values), next(values)
        completeness.append({
            "removed": kind,
            "circuit_logit_diff": in_circuit,
            "model_logit_diff": in_model,
            "gap": abs(in_circuit - in_model),
        })  # fmt: skip
    minimality = []
    for head in circuit_heads:
        without = next(values)
        minimality.append({
            "head": head_name(*head),
            "circuit_logit_diff_without": without,
            "relative_drop": (circuit_ld - without) / circuit_ld if circuit_ld else float("nan"),
        })  # fmt: skip
    return {
        "n_prompts": len(data),
        "seed": data.seed,
        "templates": len(set(data.templates)),
        "model_logit_diff": full,
        "circuit_logit_diff": circuit_ld,
        "all_heads_ablated_logit_diff": none,
        "faithfulness": circuit_ld / full if full else float("nan"),
        "completeness": completeness,
        "minimality": minimality,
    }


# ----------------------------------------------------------------------------------- steps


def _pick(
    scores: torch.Tensor, threshold: float, limit: int, *, best: Any = None
) -> list[tuple[tuple[int, int], float]]:
    """The (layer, head) cells with the largest scores: at least ``threshold`` x the best
    (``best``: the largest score, unless given)."""
    flat = scores.flatten()
    best = float(flat.max() if best is None else best)
    if best <= 0:
        return []
    order = flat.argsort(descending=True)[:limit]
    n_heads = scores.shape[1]
    return [
        ((int(i) // n_heads, int(i) % n_heads), float(flat[i]))
        for i in order
        if float(flat[i]) >= threshold * best
    ]


def _evidence(layer: int, head: int, **values: float) -> dict[str, Any]:
    return {"head": head_name(layer, head), **{k: round(float(v), 4) for k, v in values.items()}}


def _parse(name: str) -> tuple[int, int]:
    """``(layer, head)`` of a head name: ours (``L9H6``) or the paper's (``9.6``)."""
    node = parse_node(name)
    assert node.layer is not None and node.index is not None
    return node.layer, node.index


def _attention_from_end(model: Any, data: IOIDataset) -> list[list[dict[str, float]]]:
    """Each head's attention from the final token to IO and to S2, averaged over prompts."""
    sites = [mk.Site("pattern", layer=layer) for layer in range(model.cfg.n_layers)]
    rows = torch.arange(len(data))
    with torch.no_grad(), mk.capture(model, *sites) as acts:
        model(data.pairs.clean_tokens)
    out = []
    for site in sites:
        pattern = acts[site]  # (batch, head, query, key)
        at_end = pattern[rows, :, data.end]  # (batch, head, key)
        to_io = at_end[rows, :, data.io].mean(0)
        to_s2 = at_end[rows, :, data.s2].mean(0)
        out.append(
            [{"attn_end_to_io": float(a), "attn_end_to_s2": float(b)}
             for a, b in zip(to_io, to_s2, strict=True)]
        )  # fmt: skip
    return out


def _attends_to_io(attention: list[list[dict[str, float]]], least: float) -> torch.Tensor:
    """``(layer, head)``: the head attends from the end to IO, at least ``least`` and more
    than to S2 (the check a name mover passes)."""
    return torch.tensor([
        [a["attn_end_to_io"] >= least and a["attn_end_to_io"] > a["attn_end_to_s2"] for a in row]
        for row in attention
    ])  # fmt: skip


def _mean_ablations(heads: Sequence[tuple[int, int]], means: list[torch.Tensor]) -> list[Any]:
    """Interventions that set these heads' z to their p_ABC template means."""
    edits = []
    for layer in sorted({layer for layer, _ in heads}):
        mask = torch.zeros(means[layer].shape[2], dtype=torch.bool)
        mask[[h for lay, h in heads if lay == layer]] = True
        mask = mask.to(means[layer].device)[None, None, :, None]
        edits.append(
            mk.Transform(
                mk.Site("z", layer=layer),
                lambda z, m=mask, v=means[layer]: torch.where(m, v.to(z.dtype), z),
            )
        )
    return edits


def _path(model: Any, pairs: mk.PromptPairs, receivers: list[mk.Site], progress: bool) -> Any:
    """Path patching (noising with p_ABC) from every head into ``receivers``, normalized so 1
    is the clean logit difference and 0 the corrupt one."""
    result = mk.path_patch(
        model, pairs, senders="heads", receivers=receivers, direction="noising", progress=progress
    )
    return result.normalized()


def _drop(result: Any, before_layer: int) -> torch.Tensor:
    """How far each head's path lowers the normalized score (1 - score), heads at or after
    ``before_layer`` set to zero (they cannot reach the receivers)."""
    drop = 1.0 - result.scores
    drop[before_layer:] = 0.0
    return drop


def _unique_sites(component: str, cells: Sequence[tuple[int, int]]) -> list[mk.Site]:
    return [mk.Site(component, layer=layer, head=head) for layer, head in sorted(set(cells))]


def _template_means(model: Any, data: IOIDataset) -> list[torch.Tensor]:
    """Per layer, each prompt's mean-ablation value of z: the mean over the p_ABC prompts of
    its template, ``(batch, pos, head, d_head)`` (zero on padding)."""
    sites = [mk.Site("z", layer=layer) for layer in range(model.cfg.n_layers)]
    with torch.no_grad(), mk.capture(model, *sites) as acts:
        model(data.pairs.corrupt_tokens)
    templates = torch.tensor(data.templates)
    lengths = data.pairs.corrupt_lengths
    means = []
    for site in sites:
        z = acts[site]
        value = torch.zeros_like(z)
        for t in templates.unique():
            rows = (templates == t).nonzero()[:, 0]
            length = int(lengths[rows[0]])
            value[rows, :length] = z[rows, :length].mean(0, keepdim=True)
        means.append(value)
    return means


PROMPTS_PER_PASS = 64
"""Prompts in one forward pass of :func:`_ablated_scores_fn` (the prompts times the head sets
it scores together): one pass per set would leave a CPU's matrix units mostly idle."""


def _ablated_scores_fn(model: Any, data: IOIDataset, metric: Any, means: list[torch.Tensor]):
    """``scores(kept_sets, reference=None)``: for each set of kept heads, the mean logit
    difference (``metric``, a :class:`mk.LogitDiff` bound to ``data``) with every other head
    mean-ablated.

    A set's run equals, up to the first layer where their kept heads differ, the run of the
    plain model or of ``reference`` (a kept set: the circuit, whose sets without one head or
    one class differ from it only from that layer on). So each set starts at that layer from
    the captured residual of whichever of the two agrees with it longest (a set equal to one
    of them takes its score), sets that start at the same layer share a forward pass (the
    prompts repeated once per set, each copy with its own heads ablated), and only the answer
    position of each prompt is unembedded."""
    n_layers, n_heads, n = model.cfg.n_layers, model.cfg.n_heads, len(data)
    tokens = data.pairs.clean_tokens
    at_answer = metric.positions
    if at_answer is None:  # the last position
        at_answer = torch.full((n,), tokens.shape[1] - 1, dtype=torch.long)
    last = mk.LogitDiff(metric.answer, metric.wrong)  # on (prompt, 1, vocab) logits
    per_pass = max(1, PROMPTS_PER_PASS // n)

    def mask_of(kept: Sequence[tuple[int, int]]) -> torch.Tensor:
        keep = torch.zeros(n_layers, n_heads, dtype=torch.bool)
        for layer, head in kept:
            keep[layer, head] = True
        return keep

    def first_difference(a: torch.Tensor, b: torch.Tensor) -> int:
        differs = (a != b).any(-1).nonzero()
        return int(differs[0]) if len(differs) else n_layers

    def run(keeps: torch.Tensor, start: int, residual: torch.Tensor | None, layers=()) -> Any:
        """The copies' logit differences (one per kept mask in ``keeps``) from ``start`` on,
        and the residual entering each of ``layers``, ``{layer: (copy * prompt, pos, d)}``."""
        copies = len(keeps)
        edits = []
        for layer in range(start, n_layers):
            if bool(keeps[:, layer].all()):
                continue  # every copy keeps this layer's heads
            mean = means[layer].repeat(copies, 1, 1, 1)  # (copy prompt, pos, head, d)
            mask = keeps[:, layer].repeat_interleave(n, 0).to(mean.device)[:, None, :, None]
            edits.append(
                mk.Transform(
                    mk.Site("z", layer=layer),
                    lambda z, m=mask, v=mean: torch.where(m, z, v.to(z.dtype)),
                )
            )
        sites = [mk.Site("resid_pre", layer=layer) for layer in layers]
        with torch.no_grad(), mk.intervene(model, *edits), mk.capture(model, *sites) as acts:
            if residual is None:
                final = model(tokens.repeat(copies, 1), stop_at_layer=n_layers)
            else:
                final = model(residual, start_at_layer=start, stop_at_layer=n_layers)
            rows = torch.arange(copies * n, device=final.device)
            at = final[rows, at_answer.repeat(copies).to(final.device)][:, None]
            logits = model.unembed(model.ln_final(at))  # (copy * prompt, 1, vocab)
        values = [float(last(logits[i * n : (i + 1) * n])) for i in range(copies)]
        return values, {site.layer: acts[site] for site in sites}

    def scores(
        kept_sets: Sequence[Sequence[tuple[int, int]]],
        reference: Sequence[tuple[int, int]] | None = None,
    ) -> list[float]:
        masks = [mask_of(kept) for kept in kept_sets]
        refs = [torch.ones(n_layers, n_heads, dtype=torch.bool)]
        if reference is not None:
            refs.append(mask_of(reference))
        plan = []  # per set: (reference, first layer where they differ)
        for keep in masks:
            firsts = [first_difference(keep, ref) for ref in refs]
            best = max(range(len(refs)), key=lambda k: firsts[k])
            plan.append((best, firsts[best]))
        todo = sorted((start, i) for i, (_, start) in enumerate(plan) if start < n_layers)
        chunks = [todo[lo : lo + per_pass] for lo in range(0, len(todo), per_pass)]
        # a chunk starts at its earliest layer (sorted): every copy's reference residual there
        needed: dict[int, set[int]] = {k: set() for k in range(len(refs))}
        for chunk in chunks:
            for _, i in chunk:
                needed[plan[i][0]].add(chunk[0][0])
        ref_values: dict[int, float] = {}
        ref_resid: dict[int, dict[int, torch.Tensor]] = {}
        for k, ref in enumerate(refs):
            if any(r == k for r, _ in plan):
                values, ref_resid[k] = run(ref[None], 0, None, sorted(needed[k]))
                ref_values[k] = values[0]
        out = [ref_values[k] if start == n_layers else 0.0 for k, start in plan]
        for chunk in chunks:
            start = chunk[0][0]
            residual = torch.cat([ref_resid[plan[i][0]][start] for _, i in chunk])
            values, _ = run(torch.stack([masks[i] for _, i in chunk]), start, residual)
            for (_, i), value in zip(chunk, values, strict=True):
                out[i] = value
        return out

    return scores


def _circuit_graph(
    model: Any,
    classes: dict[str, list[dict[str, Any]]],
    path_scores: dict[str, Any],
    dla: torch.Tensor,
) -> mk.CircuitGraph:
    """The head-level circuit as a graph: senders into the receivers they were found through,
    scored by their path-patching drop (and the name movers by their DLA into the logits)."""
    layout = mk.graph.GraphLayout.from_model(model)
    group = model.cfg.n_heads // (model.cfg.n_key_value_heads or model.cfg.n_heads)
    scores = torch.zeros(layout.valid.shape)
    edges: list[str] = []

    def add(src: tuple[int, int], dst: str, value: float) -> None:
        name = f"{head_name(*src)}->{dst}"
        try:
            s, r = layout.edge_index(name)
        except mk.MechkitError:
            return  # a sender not before its receiver
        scores[s, r] = value
        edges.append(name)

    heads = {kind: [_parse(h["head"]) for h in items] for kind, items in classes.items()}
    for kind in ("name mover", "negative name mover", "backup name mover", "other direct"):
        for layer, head in heads.get(kind, []):
            add((layer, head), "logits", float(dla[layer, head]))
    pairs = [
        ("s-inhibition", "name mover", "q", "name mover queries"),
        ("induction", "s-inhibition", "v", "s-inhibition values"),
        ("duplicate token", "s-inhibition", "v", "s-inhibition values"),
        ("previous token", "induction", "k", "induction keys"),
    ]
    for sender_kind, receiver_kind, component, result_name in pairs:
        result = path_scores.get(result_name)
        if result is None:
            continue
        for layer, head in heads[sender_kind]:
            value = 1.0 - float(result.scores[layer, head])
            for r_layer, r_head in heads[receiver_kind]:
                index = r_head if component == "q" else r_head // group
                add((layer, head), head_name(r_layer, index, component), value)
    graph = mk.CircuitGraph(
        layout=layout, scores=scores, method="path patching (Wang et al.)",
        metric_name="logit difference", model_name=str(model.cfg.model_name),
    )  # fmt: skip
    return graph.with_edges(edges)


# ----------------------------------------------------------------------------------- report


def _page(report: IOIReport, figures: list[str]) -> str:
    paper = PAPER_GPT2
    rows = []
    for kind in (*CLASSES, "other direct"):
        ours = ", ".join(report.heads(kind)) or "none found"
        published = paper["classes"].get(kind)  # the paper's "layer.head", in our names
        theirs = ", ".join(map(str, map(parse_node, published))) if published else "-"
        rows.append(
            f"<tr><td>{html.escape(kind)}</td><td>{html.escape(ours)}</td>"
            f"<td>{html.escape(theirs)}</td></tr>"
        )
    # one table per class, with the evidence columns that class has (no empty cells)
    evidence = "".join(
        f"<h3>{html.escape(kind)}</h3>{_records_table(items)}"
        for kind, items in report.classes.items()
        if items
    )
    links = " ".join(f'<a href="{html.escape(f)}">{html.escape(f)}</a>' for f in figures)
    a, e = report.assignment, report.evaluation
    sets = (
        f"<tr><td>prompts (seed)</td><td>{a['n_prompts']} ({a['seed']})</td>"
        f"<td>{e['n_prompts']} ({e['seed']})</td><td></td></tr>"
        f"<tr><td>templates covered</td><td>{a['templates']}</td><td>{e['templates']}</td>"
        "<td>15</td></tr>"
        + "".join(
            f"<tr><td>{label}</td><td>{a[key]:.2f}</td><td>{e[key]:.2f}</td><td></td></tr>"
            for label, key in (
                ("logit difference, model", "model_logit_diff"),
                ("logit difference, circuit", "circuit_logit_diff"),
                ("logit difference, every head ablated", "all_heads_ablated_logit_diff"),
            )
        )
        + f"<tr><td>faithfulness</td><td>{a['faithfulness']:.1%}</td>"
        f"<td>{e['faithfulness']:.1%}</td><td>{paper['faithfulness']:.0%}</td></tr>"
    )
    return f"""<!doctype html><html><head><meta charset="utf-8">
<title>IOI circuit: {html.escape(report.model_name)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px}}</style></head>
<body><h1>Indirect object identification: {html.escape(report.model_name)}</h1>
<p>Classes assigned on {report.n_prompts} prompts (seed {report.seed}; path patching on the
first {report.n_path_prompts}); the circuit evaluated on those and on {e["n_prompts"]} held-out
prompts (seed {e["seed"]}), {report.seconds:.0f} s. Figures: {links};
the circuit as <a href="ioi_circuit.svg">SVG</a> and <a href="ioi_circuit.json">JSON</a>;
every number in <a href="ioi.json">ioi.json</a>.</p>
<table><tr><th></th><th>{html.escape(report.model_name)}</th><th>GPT-2 small (paper)</th></tr>
<tr><td>logit difference</td><td>{report.logit_diff:.2f}</td><td>{paper["logit_diff"]}</td></tr>
<tr><td>IO over S</td><td>{report.io_over_s:.1%}</td><td>{paper["io_over_s"]:.1%}</td></tr>
</table>
<h2>Heads by class</h2><table><tr><th>class</th><th>ours</th><th>paper (GPT-2)</th></tr>
{"".join(rows)}</table>
<p>A name mover (and a negative one) attends from the end to IO, at least as much as the
threshold asks and more than to S2; the class threshold is relative to the strongest head that
passes this check. Backup name movers: heads whose direct effect rises when the name movers are
mean-ablated, and that then attend to IO (<a href="backup.html">backup.html</a>).</p>
<h2>Evidence</h2>{evidence}
<h2>Faithfulness (every head outside the circuit mean-ablated over p_ABC)</h2>
<table><tr><th></th><th>assignment prompts</th><th>held-out prompts</th>
<th>GPT-2 (paper)</th></tr>{sets}</table>
<h2>Completeness and minimality, held-out prompts</h2>
{_records_table(e["completeness"])}{_records_table(e["minimality"])}
<h2>Completeness and minimality, assignment prompts</h2>
{_records_table(a["completeness"])}{_records_table(a["minimality"])}
</body></html>
"""


def _records_table(records: list[dict[str, Any]]) -> str:
    if not records:
        return ""
    keys = list(records[0])
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(r[k]))}</td>" for k in keys) + "</tr>"
        for r in records
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Reproduce the IOI circuit (Wang et al. 2022).")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", default="reports/ioi")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--path-prompts", type=int, default=8)
    parser.add_argument("--eval-prompts", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-seed", type=int, default=None)
    args = parser.parse_args(argv)
    model = mk.load_model(args.model)
    report = reproduce(
        model, n_prompts=args.prompts, n_path_prompts=args.path_prompts,
        n_eval_prompts=args.eval_prompts, seed=args.seed, eval_seed=args.eval_seed,
        progress=True,
    )  # fmt: skip
    index = report.write(args.out)
    print(f"logit difference {report.logit_diff:.2f}, IO over S {report.io_over_s:.1%}, "
          f"faithfulness {report.assignment['faithfulness']:.1%} on the "
          f"{report.n_prompts} assignment prompts, {report.faithfulness:.1%} on "
          f"{report.evaluation['n_prompts']} held-out prompts")  # fmt: skip
    for kind in (*CLASSES, "other direct"):
        print(f"{kind:20s} {', '.join(report.heads(kind)) or '-'}")
    print(f"wrote {index}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
