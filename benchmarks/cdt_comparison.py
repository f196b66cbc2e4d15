"""CD-T beside EAP, EAP-IG and exact edge patching: time and faithfulness curve (Hsu et al. 2024
compare CD-T with ACDC and EAP the same way).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cdt_comparison.py --task toy --out /tmp/cdt
    .venv/bin/python benchmarks/cdt_comparison.py --task ioi --prompts 8 --out reports/cdt_ioi
    .venv/bin/python benchmarks/cdt_comparison.py --task greater-than --prompts 8 --out ...

    .venv/bin/python benchmarks/cdt_comparison.py --task ioi --prompts 8 --exact-candidates 300 \
        --sizes 10 30 100 300 --out ...

``toy``: ``attn-only-2l`` on repeated random tokens, one token of the repeat corrupted, metric
the logit of the token to copy (seconds on a CPU). ``ioi`` and ``greater-than``: SmolLM2 on
the reproductions' prompts. CD-T runs one pass per source (301 on SmolLM2); exact runs one pass
per edge, hours for SmolLM2's ~70,000 edges on a CPU, so ``--exact-candidates K`` scores exactly
only the union of every other method's top ``K`` edges (the rest score 0 and rank last: its
curve means something only up to the union's size). Writes ``comparison.json`` (times,
faithfulness per size, rank correlation with exact, machine load) and ``faithfulness.html``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import torch

import mechkit as mk

METHODS = {  # name: (method, options)
    "eap": ("eap", {}),
    "eap-ig-inputs": ("eap-ig-inputs", {"steps": 5}),
    "cd-t": ("cd-t", {}),
    "cd-t-per-edge": ("cd-t", {"propagation": "edge"}),
    "exact": ("exact", {}),
}
DEFAULT_METHODS = ["eap", "eap-ig-inputs", "cd-t", "exact"]


def _toy_task(n_prompts: int) -> tuple[mk.Model, torch.Tensor, torch.Tensor, object]:
    model = mk.load_model("attn-only-2l")
    generator = torch.Generator().manual_seed(0)
    half = torch.randint(1, model.cfg.d_vocab, (n_prompts, 6), generator=generator)
    clean = torch.cat([half, half[:, :4]], dim=1)  # the next token to copy: half[:, 4]
    corrupt = clean.clone()
    corrupt[:, 3] = torch.randint(1, model.cfg.d_vocab, (n_prompts,), generator=generator)
    target = half[:, 4]

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logits[torch.arange(len(logits)), -1, target[: len(logits)]].mean()

    return model, clean, corrupt, metric


def _exact_on_candidates(
    model: mk.Model, inputs: tuple, graphs: list, k: int
) -> tuple[mk.CircuitGraph, torch.Tensor]:
    """Exact scores of the union of each graph's top ``k`` edges (0 elsewhere)."""
    from mechkit.graph.setup import batched_circuit_values, edge_setup, resolve_edge_contrast

    candidates = torch.zeros_like(graphs[0].layout.valid)
    for graph in graphs:
        candidates |= graph.top_edges(k).edges
    setup = edge_setup(model, resolve_edge_contrast(model, *inputs))
    valid = setup.layout.valid
    edges = candidates.nonzero().tolist()
    keeps = [valid]
    for s, r in edges:
        keep = valid.clone()
        keep[s, r] = False
        keeps.append(keep)
    values = batched_circuit_values(model, setup, keeps)
    scores = torch.zeros(valid.shape)
    for (s, r), value in zip(edges, values[1:].tolist(), strict=True):
        scores[s, r] = value - float(values[0])
    method = f"exact ({len(edges)} candidate edges)"
    return dataclasses.replace(graphs[0], scores=scores, method=method), candidates


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=["toy", "ioi", "greater-than"], default="toy")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--sizes", type=int, nargs="+", default=[5, 10, 20, 40, 80])
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS))
    parser.add_argument(
        "--exact-candidates",
        type=int,
        default=0,
        help="exact scores only the union of the other methods' top K edges",
    )
    parser.add_argument("--out", default="/tmp/cdt_comparison")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.task == "toy":
        model, clean, corrupt, metric = _toy_task(args.prompts)
        inputs: tuple = (clean, corrupt, metric)
    else:
        model = mk.load_model("smollm2-135m")
        if args.task == "ioi":
            from circuits import ioi

            pairs = ioi.ioi_dataset(model, args.prompts, seed=0).pairs
            inputs = (pairs, None, mk.LogitDiff.from_pairs(pairs))
        else:
            from circuits import greater_than

            pairs, year_metric, _, _ = greater_than.dataset(model, args.prompts, seed=0)
            inputs = (pairs, None, year_metric)
    graphs, seconds, cpu = [], {}, {}
    restricted = args.exact_candidates > 0 and "exact" in args.methods
    others = [m for m in args.methods if not (restricted and m == "exact")]
    for name in others:
        start, start_cpu = time.perf_counter(), time.process_time()
        method, options = METHODS[name]
        graph = mk.edge_attribution(model, *inputs, method=method, progress=False,
                                    **options)  # fmt: skip
        seconds[name] = time.perf_counter() - start
        cpu[name] = time.process_time() - start_cpu
        graphs.append(graph)
        print(f"{name:15s} {seconds[name]:8.2f} s ({cpu[name]:.2f} s CPU), {graph.n_edges} edges",
              flush=True)  # fmt: skip
    candidates = None
    if restricted:
        start, start_cpu = time.perf_counter(), time.process_time()
        graph, candidates = _exact_on_candidates(model, inputs, graphs, args.exact_candidates)
        seconds["exact"] = time.perf_counter() - start
        cpu["exact"] = time.process_time() - start_cpu
        graphs.append(graph)
        args.methods = [*others, "exact"]
        print(f"exact           {seconds['exact']:8.2f} s, {int(candidates.sum())} candidates",
              flush=True)  # fmt: skip
    curve = mk.faithfulness_curve(model, graphs, *inputs, sizes=args.sizes)
    frame = curve.to_dataframe()
    print(frame.to_string())
    result = {
        "task": args.task,
        "n_prompts": args.prompts,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "faithfulness": frame.to_dict(orient="records"),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "n_edges": graphs[0].n_edges,
        "exact_candidates": None if candidates is None else int(candidates.sum()),
    }
    if "exact" in args.methods:
        from scipy.stats import spearmanr

        exact = graphs[args.methods.index("exact")]
        valid = exact.layout.valid if candidates is None else candidates
        result["spearman_with_exact"] = {
            name: float(spearmanr(g.scores[valid].numpy(), exact.scores[valid].numpy()).statistic)
            for name, g in zip(args.methods, graphs, strict=True)
        }
        print(result["spearman_with_exact"])
    (out / "comparison.json").write_text(json.dumps(result, indent=1))
    curve.plot(title=f"Faithfulness by circuit size, {args.task}").write_html(
        out / "faithfulness.html", include_plotlyjs="cdn"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
