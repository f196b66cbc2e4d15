"""Attribution patching and edge attribution on smollm2-135m: speed, agreement, faithfulness.

    python benchmarks/attribution_speed.py --prompts 8

Prints, for IOI prompt pairs (the demo's, then generated ones with aligned corruptions):

1. Node attribution: ``mk.attribution_patch`` over every head (layer x head) and over the
   residual stream (layer x pos), timed against one forward + backward pass of the model on the
   same batch (the issue's target: at most 3x), and against ``mk.activation_patch`` on the same
   sweep; the correlation of the two and the heads where the estimate misses most.
2. Edges: the time to score every edge of the graph with EAP, EAP-IG (inputs) and EAP-IG
   (activations), 5 steps each.
3. Faithfulness of the top-n edges of each method at several sizes (corrupt ablation).
4. On attn-only-2l: each method's correlation with exact edge patching.
"""

from __future__ import annotations

import argparse
import time

import torch

import mechkit as mk
from benchmarks.patching_speed import ioi_pairs


def _timed(fn, repeat: int = 1):
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def forward_backward(model, pairs) -> None:
    metric = mk.LogitDiff.from_pairs(pairs)
    with torch.enable_grad():
        embed = model.embed(pairs.clean_tokens).detach().requires_grad_(True)
        hooks = [("hook_embed", lambda act, hook: embed)]
        with model.hooks(fwd_hooks=hooks):
            value = metric(model(pairs.clean_tokens))
        torch.autograd.grad(value, embed)


def node_attribution(model, pairs) -> None:
    print("\n## Node attribution (attribution_patch) against one forward + backward")
    fb, _ = _timed(lambda: forward_backward(model, pairs), repeat=3)
    print(f"one forward + backward: {fb:.3f} s")
    for site in ("z", "resid_pre"):
        t_attr, est = _timed(lambda s=site: mk.attribution_patch(model, pairs, site=s), repeat=3)
        t_act, real = _timed(
            lambda s=site: mk.activation_patch(model, pairs, site=s, progress=False)
        )
        e = est.normalized().scores.flatten()
        r = real.normalized().scores.flatten()
        corr = float(torch.corrcoef(torch.stack([e, r]))[0, 1])
        print(
            f"{site:10s} {tuple(est.scores.shape)}: attribution {t_attr:.3f} s = "
            f"{t_attr / fb:.2f}x forward+backward (target <= 3x); activation patching "
            f"{t_act:.1f} s ({t_act / t_attr:.0f}x slower); Pearson r (normalized) {corr:.3f}"
        )
    cmp = mk.compare_attribution(model, pairs, site="z", progress=False)
    print(f"heads: Pearson {cmp.pearson:.3f}, Spearman {cmp.spearman:.3f}; worst 5 (est, real):")
    for cell, est_v, real_v in cmp.worst(5):
        print(f"  L{cell['layer']}H{cell['head']}: {est_v:+.3f} vs {real_v:+.3f}")


def edges(model, pairs, sizes: list[int]) -> list[mk.CircuitGraph]:
    print("\n## Every edge of the graph")
    graphs = []
    for method in ("eap", "eap-ig-inputs", "eap-ig-activations"):
        t, graph = _timed(
            lambda m=method: mk.edge_attribution(model, pairs, method=m, steps=5, progress=False)
        )
        print(f"{graph.method:28s} {graph.layout.n_edges} edges in {t:.1f} s")
        graphs.append(graph)
    t, curve = _timed(lambda: mk.faithfulness_curve(model, graphs, pairs, sizes=sizes))
    print(f"\n## Faithfulness of the top-n edges (corrupt ablation), {t:.1f} s")
    print(curve.to_dataframe().pivot(index="size", columns="method", values="faithfulness"))
    return graphs


def toy_exact() -> None:
    print("\n## attn-only-2l: agreement with exact edge patching")
    model = mk.load_model("attn-only-2l", device="cpu")
    generator = torch.Generator().manual_seed(0)
    segment = torch.randint(1, 500, (16, 8), generator=generator)
    clean = torch.cat([torch.zeros(16, 1, dtype=torch.long), segment, segment[:, :-1]], 1)
    corrupt = clean.clone()
    corrupt[:, 1:9] = torch.randint(1, 500, (16, 8), generator=generator)
    answers, wrongs = segment[:, -1], torch.randint(1, 500, (16,), generator=generator)
    pairs = mk.PromptPairs.from_tokens(clean, corrupt, answers, wrongs)
    exact = mk.edge_attribution(model, pairs, method="exact", progress=False)
    valid = exact.layout.valid
    for method in ("eap", "eap-ig-inputs", "eap-ig-activations"):
        graph = mk.edge_attribution(model, pairs, method=method, progress=False)
        pair = torch.stack([graph.scores[valid], exact.scores[valid]])
        print(f"{graph.method:28s} Pearson r with exact: {float(torch.corrcoef(pair)[0, 1]):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 200, 500, 1000, 3000])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = mk.load_model("smollm2-135m", device=args.device)
    pairs = ioi_pairs(model, args.prompts).to(model.cfg.device)
    print(f"smollm2-135m on {args.device}, {pairs}, {args.threads} threads")
    node_attribution(model, pairs)
    edges(model, pairs, args.sizes)
    toy_exact()


if __name__ == "__main__":
    main()
