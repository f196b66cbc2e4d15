"""EAP-IG on the activations, the current code against the code before the block-batched points
(commit ``d87761b~1``), with EAP-IG on the inputs for reference, in one run.

    python benchmarks/eap_ig_speed.py                 # smollm2-135m, all 30 layers, 8 IOI pairs
    python benchmarks/eap_ig_speed.py --layers 4      # a quick cut: the first 4 blocks

Each timing runs once, in its own subprocess that loads the model first (loading is not timed):
the current code from this checkout, the old code from a git worktree of ``--old-commit``
(created with ``git worktree add`` when missing) through ``PYTHONPATH``. The pairs are
``circuits.ioi.ioi_dataset(model, n, seed=0)``, handed to every subprocess as token ids. Prints
one table: seconds, the ratio to the current code, and the largest absolute difference of the
scores from the current ``eap-ig-activations`` scores (old vs new must agree to float
tolerance: both use the sender-runs estimator). The machine may be shared: the load average
(``os.getloadavg()``) is printed at the start and the end, and each run's CPU seconds beside its
wall seconds; compare ratios, not seconds. Runs use one torch thread by default (``--threads``):
on a loaded two-core machine two threads wait on each other and run several times slower.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} ({os.cpu_count()} CPUs)"


def _model(layers: int | None):
    import mechkit as mk

    model = mk.load_model("smollm2-135m")
    if layers is not None and layers < model.cfg.n_layers:  # a quicker, shallower cut
        model.blocks = model.blocks[:layers]
        model.cfg.n_layers = layers
        model.setup()
    return model


def worker(args: argparse.Namespace) -> None:
    """One timing, in the code on ``sys.path`` (API common to old and new: ``load_model``,
    ``PromptPairs.from_tokens``, ``edge_attribution(model, pairs, method=, steps=)``)."""
    import torch
    from safetensors.torch import save_file

    import mechkit as mk

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    data = json.loads(Path(args.pairs).read_text())
    model = _model(args.layers)
    pairs = mk.PromptPairs.from_tokens(
        data["clean"], data["corrupt"], data["answer"], data["wrong"]
    )
    start, cpu = time.perf_counter(), time.process_time()
    graph = mk.edge_attribution(model, pairs, method=args.method, steps=args.steps, progress=False)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    # files are data, never code: the scores as safetensors, the rest as JSON (no pickle)
    save_file({"scores": graph.scores.contiguous()}, args.out)
    Path(args.out).with_suffix(".json").write_text(json.dumps({
        "seconds": seconds, "cpu": cpu, "method": graph.method,
        "edges": int(graph.layout.n_edges), "code": str(Path(mk.__file__).parent.parent),
    }))  # fmt: skip


def _old_checkout(commit: str, path: Path) -> Path:
    if not (path / "mechkit").is_dir():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), commit],
                       check=True)  # fmt: skip
    return path


def _pairs_file(layers: int | None, n: int, folder: Path) -> Path:
    """The IOI pairs as token ids (unpadded), so every code version builds the same pairs."""
    sys.path.insert(0, str(ROOT))
    from circuits.ioi import ioi_dataset

    model = _model(layers)
    pairs = ioi_dataset(model, n=n, seed=0).pairs
    lengths = pairs.clean_mask.sum(1).tolist()
    data = {
        "clean": [row[:k] for row, k in zip(pairs.clean_tokens.tolist(), lengths, strict=True)],
        "corrupt": [row[:k] for row, k in zip(pairs.corrupt_tokens.tolist(), lengths, strict=True)],
        "answer": pairs.answer.tolist(),
        "wrong": pairs.wrong.tolist(),
    }
    out = folder / "pairs.json"
    out.write_text(json.dumps(data))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=None, help="keep only the first N blocks")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per run (1: on a shared machine, more threads wait "
                        "on each other)")  # fmt: skip
    parser.add_argument("--old-commit", default="d87761b~1")
    parser.add_argument("--old-path", default="/tmp/eapig-old")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--pairs", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    print(f"start: {_load()}; the machine is shared with other jobs", flush=True)
    old = _old_checkout(args.old_commit, Path(args.old_path))
    folder = Path(tempfile.mkdtemp(prefix="eap_ig_speed_"))
    pairs = _pairs_file(args.layers, args.prompts, folder)
    runs = [
        ("eap-ig-activations", "current", ROOT),
        ("eap-ig-activations", args.old_commit, old),
        ("eap-ig-inputs", "current", ROOT),
    ]
    results = []
    for method, label, code in runs:
        out = folder / f"{len(results)}.safetensors"
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--method",
                   method, "--steps", str(args.steps), "--pairs", str(pairs),
                   "--threads", str(args.threads),
                   "--out", str(out)]  # fmt: skip
        if args.layers is not None:
            command += ["--layers", str(args.layers)]
        env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": str(args.threads)}
        before = _load()
        subprocess.run(command, check=True, env=env, cwd=code)
        record = json.loads(out.with_suffix(".json").read_text())
        record["scores"] = load_file(out)["scores"]
        results.append((method, label, record, before))
    new_scores = results[0][2]["scores"]
    base = results[0][2]["seconds"]
    n_layers = args.layers if args.layers is not None else "all"
    print(f"\nsmollm2-135m, {n_layers} layers, {results[0][2]['edges']} edges, "
          f"{args.prompts} IOI pairs, {args.steps} steps")  # fmt: skip
    print(f"{'method':20s} {'code':10s} {'seconds':>9s} {'/ current':>10s} {'CPU s':>8s}"
          "  load at its start  (code imported from)")  # fmt: skip
    for method, label, result, before in results:
        print(
            f"{method:20s} {label:10s} {result['seconds']:9.1f} "
            f"{result['seconds'] / base:9.2f}x {result['cpu']:8.1f}  {before.split(' (')[0]}  "
            f"({result['code']})"
        )
    old_scores = results[1][2]["scores"]
    diff = float((old_scores - new_scores).abs().max())
    print(f"eap-ig-activations, {args.old_commit} vs current: max |score diff| {diff:.2e}, "
          f"largest |score| {float(old_scores.abs().max()):.2e}, speed-up "
          f"{results[1][2]['seconds'] / base:.2f}x")  # fmt: skip
    print(f"end: {_load()}; the machine is shared with other jobs")


if __name__ == "__main__":
    main()
