"""CD-T beside EAP, EAP-IG and exact edge patching: time and faithfulness curve (Hsu et al. 2024
compare CD-T with ACDC and EAP the same way).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cdt_comparison.py --task toy --out /tmp/cdt
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cdt_comparison.py --task ioi --prompts 8 \
        --exact-candidates 300 --sizes 10 20 50 100 200 300 1000 3000 --out /tmp/cdt-out/ioi
    (the same with --task greater-than)

``toy``: ``attn-only-2l`` on repeated random tokens, one token of the repeat corrupted, metric
the logit of the token to copy (seconds on a CPU). ``ioi`` and ``greater-than``: SmolLM2 on
the reproductions' prompts. CD-T runs one pass per source (301 on SmolLM2); exact runs one pass
per edge, hours for SmolLM2's ~70,000 edges on a CPU, so ``--exact-candidates K`` scores exactly
only the union of every other method's top ``K`` edges (the rest score 0 and rank last: its
curve means something only up to the union's size). Those runs start at the receiver's layer
(with one edge ablated every sender keeps its clean output, so the run is the clean one up to
there), about 2.5 times cheaper than the library's runs of the whole masked model; a sample of
``--check-exact`` edges is scored both ways and the largest difference reported. Writes
``comparison.json`` (times, faithfulness per size, rank correlation and top-n overlap with exact
on the candidates, exact's CPU time per edge and the projected time for every edge, machine
load), ``faithfulness.html``, each graph's JSON and the candidates' scores.
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


def _receiver_sites(layout: object) -> dict[int, tuple[str, int, int]]:
    """Receiver index -> (hook name, index within the hook, layer)."""
    from mechkit.graph.runs import receiver_hook_names

    sites = {}
    for name, first, count in receiver_hook_names(layout):
        layer = int(name.split(".")[1])
        for offset in range(count):
            sites[first + offset] = (name, offset, layer)
    return sites


def _adding(per_hook: dict, delta: torch.Tensor, n_batch: int) -> object:
    """A hook that adds ``delta[:, :, sender]`` to the rows of circuit ``c`` at the receiver's
    index, for each ``(c, index, sender)`` listed under the hook's name."""

    def hook(act: torch.Tensor, hook: object) -> torch.Tensor:
        act = act.clone()  # q/k/v inputs are expanded views of one residual
        for c, offset, s in per_hook[hook.name]:
            block = slice(c * n_batch, (c + 1) * n_batch)
            if act.ndim == 4:  # (circuit * batch, pos, head, d_model)
                act[block, :, offset] += delta[:, :, s].to(act.dtype)
            else:  # (circuit * batch, pos, d_model)
                act[block] += delta[:, :, s].to(act.dtype)
        return act

    return hook


@torch.no_grad()
def _exact_from_receiver(
    model: mk.Model, setup: object, edges: list[tuple[int, int]], chunk: int = 16
) -> torch.Tensor:
    """Exact scores ``M(edge ablated) - M(clean)`` of ``edges``, each run only from its receiver's
    layer on: with one edge ablated every sender keeps its clean output, so the run equals the
    clean one up to the receiver's block, where the receiver's input gains ``a'_u - a_u``. Runs
    of edges into the same layer are stacked ``chunk`` at a time."""
    from mechkit.graph.runs import graph_mode
    from mechkit.graph.setup import batch_metric, mean_value

    sites = _receiver_sites(setup.layout)
    n_prompts = setup.n_prompts
    scores = torch.zeros(len(edges), dtype=torch.float64)
    by_layer: dict[int, list[int]] = {}
    for index, (_, r) in enumerate(edges):
        by_layer.setdefault(sites[r][2], []).append(index)

    def work(rows: slice) -> None:
        weight = (rows.stop - rows.start) / n_prompts
        metric = batch_metric(setup.metric, rows, n_prompts)
        tokens = setup.clean_tokens[rows]
        n_batch = len(tokens)
        # what an ablated edge adds to its receiver's input: (batch, pos, sender, d_model)
        delta = setup.ablated_rows(rows) - setup.clean_senders[rows]
        with graph_mode(model):
            _, _, shortformer, mask = model.input_to_embed(tokens)
            logits, cache = model.run_with_cache(
                tokens, names_filter=lambda name: name.endswith("hook_resid_pre")
            )
            base = float(mean_value(metric, logits))
            for layer, indices in sorted(by_layer.items()):
                for first in range(0, len(indices), chunk):
                    part = indices[first : first + chunk]
                    n = len(part)
                    per_hook: dict[str, list[tuple[int, int, int]]] = {}
                    for c, index in enumerate(part):
                        s, r = edges[index]
                        name, offset, _ = sites[r]
                        per_hook.setdefault(name, []).append((c, offset, s))

                    hook = _adding(per_hook, delta, n_batch)
                    resid = cache[f"blocks.{layer}.hook_resid_pre"].repeat(n, 1, 1)
                    out = model.run_with_hooks(
                        resid,
                        start_at_layer=layer,
                        attention_mask=None if mask is None else mask.repeat(n, 1),
                        shortformer_pos_embed=None
                        if shortformer is None
                        else shortformer.repeat(n, 1, 1),
                        fwd_hooks=[(name, hook) for name in per_hook],
                    )
                    for c, index in enumerate(part):
                        value = float(mean_value(metric, out[c * n_batch : (c + 1) * n_batch]))
                        scores[index] += (value - base) * weight

    setup.each_batch(work)
    return scores


def _exact_on_candidates(
    model: mk.Model, inputs: tuple, graphs: list, k: int, n_check: int
) -> tuple[mk.CircuitGraph, torch.Tensor, dict]:
    """Exact scores of the union of each graph's top ``k`` edges (0 elsewhere), and a check of
    ``n_check`` of them against the library's masked circuit runs."""
    from mechkit.graph.setup import batched_circuit_values, edge_setup, resolve_edge_contrast

    candidates = torch.zeros_like(graphs[0].layout.valid)
    for graph in graphs:
        candidates |= graph.top_edges(k).edges
    setup = edge_setup(model, resolve_edge_contrast(model, *inputs))
    valid = setup.layout.valid
    edges = [tuple(e) for e in candidates.nonzero().tolist()]
    start = time.process_time()
    values = _exact_from_receiver(model, setup, edges)
    cpu_per_edge = (time.process_time() - start) / len(edges)
    scores = torch.zeros(valid.shape)
    for (s, r), value in zip(edges, values.tolist(), strict=True):
        scores[s, r] = value
    # the same edges through the library's runs (every edge masked, the whole model run)
    picks = torch.randperm(len(edges), generator=torch.Generator().manual_seed(0))[:n_check]
    keeps = [valid]
    for i in picks.tolist():
        keep = valid.clone()
        keep[edges[i]] = False
        keeps.append(keep)
    start = time.process_time()
    library = batched_circuit_values(model, setup, keeps)
    library_cpu_per_edge = (time.process_time() - start) / max(1, len(keeps))
    library_scores = library[1:] - library[0]
    check = {
        "n_edges": len(picks),
        "max_abs_difference": float((library_scores - values[picks]).abs().max())
        if len(picks)
        else None,
        "max_abs_score": float(values.abs().max()),
        "cpu_seconds_per_edge": cpu_per_edge,
        "library_cpu_seconds_per_edge": library_cpu_per_edge,
    }
    method = f"exact ({len(edges)} candidate edges)"
    return dataclasses.replace(graphs[0], scores=scores, method=method), candidates, check


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
    parser.add_argument(
        "--check-exact",
        type=int,
        default=10,
        help="candidate edges also scored by the library's full masked runs, to check",
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
    load_at_start = os.getloadavg()
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
    candidates, check = None, None
    if restricted:
        start, start_cpu = time.perf_counter(), time.process_time()
        graph, candidates, check = _exact_on_candidates(
            model, inputs, graphs, args.exact_candidates, args.check_exact
        )
        seconds["exact"] = time.perf_counter() - start
        cpu["exact"] = time.process_time() - start_cpu
        graphs.append(graph)
        args.methods = [*others, "exact"]
        print(f"exact           {seconds['exact']:8.2f} s, {int(candidates.sum())} candidates",
              flush=True)  # fmt: skip
        check["projected_all_edges_cpu_hours"] = (
            check["cpu_seconds_per_edge"] * graphs[0].n_edges / 3600
        )
        print(check, flush=True)
    for name, graph in zip(args.methods, graphs, strict=True):  # every score, to reuse
        graph.save(out / f"graph_{name}.json")
    start, start_cpu = time.perf_counter(), time.process_time()
    curve = mk.faithfulness_curve(model, graphs, *inputs, sizes=args.sizes)
    curve_seconds = (time.perf_counter() - start, time.process_time() - start_cpu)
    frame = curve.to_dataframe()
    print(frame.to_string())
    result = {
        "task": args.task,
        "n_prompts": args.prompts,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "faithfulness": frame.to_dict(orient="records"),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": load_at_start,
        "load_average": os.getloadavg(),
        "curve_seconds": curve_seconds[0],
        "curve_cpu_seconds": curve_seconds[1],
        "exact_check": check,
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
        ranked = {name: g.scores[valid].abs().argsort(descending=True)
                  for name, g in zip(args.methods, graphs, strict=True)}  # fmt: skip
        result["top_overlap_with_exact"] = {  # of exact's top n in the pool, how many it found
            name: {n: len(set(order[:n].tolist()) & set(ranked["exact"][:n].tolist()))
                   for n in args.sizes if n <= int(valid.sum())}
            for name, order in ranked.items()
        }  # fmt: skip
        print(result["top_overlap_with_exact"])
        from safetensors.torch import save_file

        scores = {name: g.scores[valid].contiguous() for name, g in zip(args.methods, graphs,
                                                                         strict=True)}  # fmt: skip
        save_file({**scores, "edges": valid.nonzero().contiguous()},
                  str(out / "candidate_scores.safetensors"))  # fmt: skip
    (out / "comparison.json").write_text(json.dumps(result, indent=1))
    curve.plot(title=f"Faithfulness by circuit size, {args.task}").write_html(
        out / "faithfulness.html", include_plotlyjs="cdn"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
