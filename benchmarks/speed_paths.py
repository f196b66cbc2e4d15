"""The three batched paths: EAP-IG on activations, activation patching of unequal lengths, and
feature-circuit edges, each timed against its peer or its own slow path in the same run.

    python benchmarks/speed_paths.py --prompts 8 --steps 5          # smollm2-135m, CPU
    python benchmarks/speed_paths.py --device cuda --prompts 8 16
    python benchmarks/speed_paths.py --tiny                         # seconds: a smoke run

1. ``edge_attribution(method="eap-ig-activations")`` (both ``ig_average`` estimators) against
   ``"eap-ig-inputs"`` with the same steps: the issue's yardstick (346 s against 8.7 s before).
2. ``activation_patch(site="resid_pre")`` on IOI pairs of unequal lengths against
   ``transformer_lens.patching.get_act_patch_resid_pre`` at each ``--patch-prompts``; for each, the
   floating-point work counted by ``torch.utils.flop_counter`` divided by the time, as a fraction
   of the matrix-product peak measured on this machine just before (a large square ``matmul``).
3. ``feature_circuit`` edges with untrained random TopK dictionaries at several residual sites
   (the cost does not depend on training): one batched backward pass per chunk of receivers
   against one backward pass per receiving node (the old path, kept as the fallback).

Prints one line per measurement with the ratio, and the load average (the machine may be
shared: compare ratios, not absolute times).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import mechkit as mk


def _timed(fn, repeat: int = 1):
    best, out = float("inf"), None
    for _ in range(repeat):
        _sync()
        start = time.perf_counter()
        out = fn()
        _sync()
        best = min(best, time.perf_counter() - start)
    return best, out


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _load() -> str:
    return f"load {os.getloadavg()[0]:.1f}"


def matmul_peak(device: str, size: int) -> float:
    """FLOP/s of the best of a few ``size x size`` float32 products on ``device``."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    a @ b  # warm-up
    t, _ = _timed(lambda: a @ b, repeat=5)
    return 2 * size**3 / t


def counted_flops(fn) -> tuple[float, int]:
    """``(seconds, floating-point operations)`` of ``fn``: timed without the counter, counted
    with it (the counter slows the run)."""
    from torch.utils.flop_counter import FlopCounterMode

    t, _ = _timed(fn)
    with FlopCounterMode(display=False) as counter:
        fn()
    return t, counter.get_total_flops()


def edges(model, pairs, steps: int) -> None:
    print(f"\n## Edge attribution, {len(pairs)} prompts, {steps} steps ({_load()})")
    times = {}
    for method, average in (
        ("eap-ig-inputs", "sender-runs"),
        ("eap-ig-activations", "sender-runs"),
        ("eap-ig-activations", "all-runs"),
    ):
        t, graph = _timed(
            lambda m=method, a=average: mk.edge_attribution(
                model, pairs, method=m, steps=steps, ig_average=a, progress=False
            )
        )
        times[(method, average)] = t
        print(f"{graph.method:40s} {graph.layout.n_edges} edges {t:8.1f} s  ({_load()})")
    base = times[("eap-ig-inputs", "sender-runs")]
    for (method, average), t in times.items():
        if method != "eap-ig-inputs":
            print(f"ratio {method} ({average}) / eap-ig-inputs: {t / base:.1f}x")


def patching(model, counts: list[int], peak: float) -> None:
    import transformer_lens.patching as tl_patching

    from benchmarks.patching_speed import ioi_pairs

    print(f"\n## activation_patch resid_pre vs TransformerLens ({_load()})")
    for n in counts:
        pairs = ioi_pairs(model, n).to(model.cfg.device)
        metric = mk.LogitDiff.from_pairs(pairs)
        with torch.no_grad():
            _, cache = model.run_with_cache(pairs.clean_tokens)
        t_ours, f_ours = counted_flops(
            lambda p=pairs: mk.activation_patch(model, p, site="resid_pre", progress=False)
        )
        t_tl, f_tl = counted_flops(
            lambda p=pairs, c=cache, m=metric: tl_patching.get_act_patch_resid_pre(
                model, p.corrupt_tokens, c, m
            )
        )
        lengths = sorted(set(pairs.clean_lengths.tolist()))
        print(
            f"{n:3d} prompts (lengths {lengths}): mechkit {t_ours:7.2f} s "
            f"({f_ours / 1e9:7.1f} GFLOP, {f_ours / t_ours / peak:6.1%} of peak), "
            f"TransformerLens {t_tl:7.2f} s ({f_tl / 1e9:7.1f} GFLOP, "
            f"{f_tl / t_tl / peak:6.1%} of peak), ratio {t_tl / t_ours:5.1f}x  ({_load()})",
            flush=True,
        )


def feature_edges(model, pairs, n_dicts: int, latents: int, method: str, steps: int) -> None:
    import mechkit.sae.feature_edges as fe
    from mechkit.sae import SAEConfig, SparseDictionary

    layers = torch.linspace(0, model.cfg.n_layers - 2, n_dicts).round().long().tolist()
    saes = {}
    for i, layer in enumerate(layers):
        cfg = SAEConfig(
            architecture="topk", d_in=model.cfg.d_model, d_sae=4 * model.cfg.d_model, k=32,
            hook_name=f"blocks.{layer}.hook_resid_post",
        )  # fmt: skip
        saes[f"r{layer}"] = SparseDictionary.from_config(cfg, seed=i).to(model.cfg.device)
    print(
        f"\n## feature_circuit ({method}), {len(pairs)} pairs, {n_dicts} dictionaries x "
        f"{latents} latents ({_load()})"
    )

    def run():
        return mk.feature_circuit(
            model, saes, pairs, latents_per_dictionary=latents, method=method, steps=steps,
            progress=False,
        )  # fmt: skip

    t_new, new = _timed(run)
    real = fe._batched_grad
    fe._batched_grad = fe._grad_per_seed  # the old path: one backward pass per receiver
    try:
        t_old, old = _timed(run)
    finally:
        fe._batched_grad = real
    diff = float((new.scores - old.scores).abs().max())
    print(
        f"batched receivers {t_new:7.1f} s, one pass per receiver {t_old:7.1f} s, ratio "
        f"{t_old / t_new:4.1f}x, max |diff| {diff:.1e}  ({_load()})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--prompts", type=int, default=8, help="pairs for edges and features")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--patch-prompts", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--dictionaries", type=int, default=5)
    parser.add_argument("--latents", type=int, default=40)
    parser.add_argument("--only", nargs="+", default=["edges", "patching", "features"])
    parser.add_argument("--tiny", action="store_true", help="a smoke run on attn-only-2l")
    parser.add_argument("--layers", type=int, default=None, help="keep only the first blocks")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from benchmarks.patching_speed import ioi_pairs

    if args.tiny:
        model = mk.load_model("attn-only-2l", device=args.device)
        args.prompts, args.steps, args.patch_prompts = 2, 2, [1, 4]
        args.dictionaries, args.latents = 1, 4
    else:
        model = mk.load_model("smollm2-135m", device=args.device)
    if args.layers is not None and args.layers < model.cfg.n_layers:  # a quicker, shallower run
        model.blocks = model.blocks[: args.layers]
        model.cfg.n_layers = args.layers
        model.setup()
    device = str(model.cfg.device)
    peak = matmul_peak(device, 4096 if device.startswith("cuda") else 1024)
    print(
        f"{model.cfg.model_name} on {device}, torch threads {torch.get_num_threads()}, "
        f"matmul peak {peak / 1e9:.0f} GFLOP/s, {_load()}"
    )
    pairs = None
    if {"edges", "features"} & set(args.only):
        if args.tiny:
            g = torch.Generator().manual_seed(0)
            clean = torch.randint(1, 500, (args.prompts, 8), generator=g)
            corrupt = clean.clone()
            corrupt[:, 2:4] = torch.randint(1, 500, (args.prompts, 2), generator=g)
            answers = torch.randint(1, 500, (args.prompts,), generator=g)
            pairs = mk.PromptPairs.from_tokens(clean, corrupt, answers, answers + 1)
        else:
            pairs = ioi_pairs(model, args.prompts)
        pairs = pairs.to(model.cfg.device)
    if "edges" in args.only:
        edges(model, pairs, args.steps)
    if "patching" in args.only and not args.tiny:
        patching(model, args.patch_prompts, peak)
    if "features" in args.only and not model.cfg.attn_only:
        feature_edges(model, pairs, args.dictionaries, args.latents, "attribution", args.steps)
        feature_edges(model, pairs, args.dictionaries, args.latents, "ig", args.steps)


if __name__ == "__main__":
    main()
