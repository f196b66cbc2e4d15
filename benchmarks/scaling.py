"""Scaling out, measured: the IOI sweep in one process and on Ray actors, and SAE training on
1 and 2 gloo ranks.

    python benchmarks/scaling.py                       # the IOI sweep at 64 pairs, all entries
    python benchmarks/scaling.py --pairs 16 --sites z  # a shorter one
    python benchmarks/scaling.py --part sae            # SAE tokens/s on 1 and 2 ranks

``sweep``: examples/sweep_ioi.yaml with ``--pairs`` prompt pairs, run by ``run_sweep`` in this
process, then on a local Ray cluster with ``--actors`` CPU actors (each loads the model once:
timed apart as the start-up). Reports cells/s, cells/s per actor, the overhead of one Ray task
(a no-op task on a warm actor, round trip), and the time the same sweep would take on 8 actors
(8 GPUs): ``cells / (8 * rate) + tasks * overhead / 8 + start-up``, with ``rate`` the per-actor
rate measured here (give ``--gpu-rate`` cells/s measured on one GPU for a GPU projection).

``sae``: ``train_sae`` (topk, d_in 576 as SmolLM2's residual, d_sae 4096, k 32) on random
activations, global batch 2048: one process, then 2 gloo ranks of 1024 rows each
(:func:`mechkit.distributed.spawn`); tokens/s of the training loop.

``--json PATH`` writes every figure. On a machine shared with other work the figures move with
the load: the script prints the load average next to them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from mechkit.distributed import RayExecutor, spawn
from mechkit.patching.sweep import load_config, run_sweep
from mechkit.sae import SAEConfig, TrainConfig, train_sae

ROOT = Path(__file__).resolve().parents[1]
SAE = SAEConfig(
    architecture="topk", d_in=576, d_sae=4096, k=32, hook_name="blocks.6.hook_resid_post"
)


def _noop(model, cache) -> None:
    return None


def sweep_part(args: argparse.Namespace) -> dict:
    config = load_config(ROOT / "examples" / "sweep_ioi.yaml")
    sweeps = tuple(e for e in config.sweeps if not args.sites or e.site in args.sites)
    config = dataclasses.replace(
        config,
        model=args.model,
        prompts=dataclasses.replace(config.prompts, n=args.pairs),
        sweeps=sweeps,
        device="cpu",
    )
    out: dict = {"pairs": args.pairs, "sites": [e.site for e in sweeps], "model": args.model}
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        single = run_sweep(config, out=Path(folder) / "single", progress=False)
        out["single_seconds"] = time.perf_counter() - start
        out["cells"] = single.cells_total
        print(f"single process: {single.cells_total} cells in {out['single_seconds']:.1f} s")
        with RayExecutor(actors=args.actors) as executor:
            start = time.perf_counter()
            list(executor.map(args.model, _noop, [()] * args.actors, device="cpu"))
            out["ray_startup_seconds"] = time.perf_counter() - start
            n = 50
            start = time.perf_counter()
            list(executor.map(args.model, _noop, [()] * n, device="cpu"))
            out["task_overhead_seconds"] = (time.perf_counter() - start) / n
            start = time.perf_counter()
            ray = run_sweep(config, out=Path(folder) / "ray", progress=False, executor=executor)
            out["ray_seconds"] = time.perf_counter() - start
        diff = max(
            float((ray.results[k].scores - single.results[k].scores).abs().max())
            for k in single.results
        )
        out["max_score_difference"] = diff
    out["actors"] = args.actors
    out["cells_per_second_single"] = out["cells"] / out["single_seconds"]
    out["cells_per_second_ray"] = out["cells"] / out["ray_seconds"]
    rate = out["cells_per_second_ray"] / args.actors
    out["cells_per_second_per_actor"] = rate
    units = len(sweeps) * -(-args.pairs // (config.batch_size or args.pairs))
    tasks = max(units, 2 * 8)  # the executor's split on 8 actors
    for label, per_actor in (("cpu", rate), ("gpu", args.gpu_rate)):
        if per_actor:
            out[f"projected_8_actor_seconds_{label}"] = (
                out["cells"] / (8 * per_actor) + tasks * out["task_overhead_seconds"] / 8
            )
    print(
        f"Ray, {args.actors} actors: start-up {out['ray_startup_seconds']:.1f} s, sweep "
        f"{out['ray_seconds']:.1f} s ({out['cells_per_second_ray']:.1f} cells/s, "
        f"{rate:.1f} per actor), task overhead {1000 * out['task_overhead_seconds']:.1f} ms; "
        f"largest score difference {diff:.2g}"
    )
    print(f"8 actors, projected: {out.get('projected_8_actor_seconds_cpu', 0):.1f} s (CPU rate)")
    return out


def _data() -> torch.Tensor:
    return torch.randn(16_384, SAE.d_in, generator=torch.Generator().manual_seed(0))


def _train(batch_size: int, tokens: int) -> float:
    cfg = TrainConfig(
        total_tokens=tokens, batch_size=batch_size, progress=False, calibration_batches=0
    )
    return train_sae(SAE, _data(), cfg).result.seconds


def _rank(rank: int, world: int, tokens: int, path: str) -> None:
    seconds = _train(2048 // world, tokens)
    if rank == 0:
        Path(path).write_text(json.dumps({"seconds": seconds}))


def sae_part(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    tokens = args.tokens
    one = _train(2048, tokens)
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / "two.json")
        spawn(_rank, 2, tokens, path)
        two = json.loads(Path(path).read_text())["seconds"]
    out = {"tokens": tokens, "tokens_per_second_1_rank": tokens / one}
    out["tokens_per_second_2_ranks"] = tokens / two
    print(
        f"SAE training, {tokens} tokens: 1 rank {tokens / one:.0f} tokens/s, "
        f"2 gloo ranks {tokens / two:.0f} tokens/s (1 thread each)"
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["sweep", "sae", "all"], default="all")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--sites", nargs="*", help="only these entries (resid_pre attn_out ...)")
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--gpu-rate", type=float, help="cells/s of one GPU actor, measured")
    parser.add_argument("--tokens", type=int, default=2**16)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    figures: dict = {"load_average": os.getloadavg(), "cpus": os.cpu_count()}
    print(f"load average {figures['load_average']}, {figures['cpus']} CPUs")
    if args.part in ("sweep", "all"):
        figures["sweep"] = sweep_part(args)
    if args.part in ("sae", "all"):
        figures["sae"] = sae_part(args)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
