"""Command line: ``mechkit demo``, ``mechkit tuned-lens``, ``mechkit sweep``, ``mechkit
reproduce`` (also ``python -m mechkit ...``)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import textwrap
import time
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from mechkit.corpus import corpus_tokens
from mechkit.demo import run_demo
from mechkit.errors import InvalidArgumentError, MechkitError, SweepConfigError, check_choice
from mechkit.lens import TunedLensConfig, compare_lenses, train_tuned_lens
from mechkit.models import load_model
from mechkit.patching.sweep import config_help, load_config, run_sweep


def main(argv: list[str] | None = None) -> int:
    """Run the ``mechkit`` command line on ``argv`` (None: ``sys.argv``); the exit code. A
    mechkit error is printed as one line on stderr, code 2, without a traceback.

    Example:
        >>> main(["demo", "--model", "no-such-model", "--out", "unused"])  # error on stderr
        [mechkit demo] loading no-such-model ...
        2
    """
    parser = argparse.ArgumentParser(prog="mechkit", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run the main analyses and write an HTML report")
    demo.add_argument("--out", default="reports", help="output folder (default: reports)")
    demo.add_argument("--model", default="smollm2-135m", help="model name or path")
    demo.add_argument(
        "--quick",
        action="store_true",
        help="every section on fewer prompts and settings (a check, not a report)",
    )
    lens = commands.add_parser(
        "tuned-lens",
        help="train a tuned lens on the offline corpus (resumable), then compare it with the "
        "logit lens on held-out text",
    )
    lens.add_argument("--model", default="smollm2-135m", help="model name or path")
    lens.add_argument("--out", required=True, help="folder for checkpoints, the lens and tables")
    lens.add_argument("--steps", type=int, default=200)
    lens.add_argument("--batch-size", type=int, default=4)
    lens.add_argument("--seq-len", type=int, default=64)
    lens.add_argument("--lr", type=float, default=1e-3)
    lens.add_argument("--eval-sequences", type=int, default=32)
    _add_sweep_parser(commands)
    reproduce = commands.add_parser(
        "reproduce",
        help="run a paper reproduction's command line (see `mechkit reproduce NAME --help`)",
        description="Run the command line of a paper reproduction registered under the "
        f"entry-point group {REPRODUCTIONS!r}; the arguments after NAME go to it. Installed: "
        f"{', '.join(_reproductions()) or 'none'}.",
    )
    reproduce.add_argument("name", help="the reproduction, e.g. ioi, induction, greater_than")
    reproduce.add_argument("args", nargs=argparse.REMAINDER, help="its own arguments")
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            run_demo(args.out, args.model, quick=args.quick)
        elif args.command == "tuned-lens":
            _tuned_lens(args)
        elif args.command == "sweep":
            return _sweep(args)
        elif args.command == "reproduce":
            return _reproduce(args.name, args.args)
    except MechkitError as exc:
        print(f"mechkit: error: {exc}", file=sys.stderr)
        return 2
    return 0


REPRODUCTIONS = "mechkit.reproductions"


def _reproductions() -> dict[str, Any]:
    """The registered reproductions' entry points by name (nothing is imported)."""
    return {point.name: point for point in entry_points(group=REPRODUCTIONS)}


def _reproduce(name: str, argv: list[str]) -> int:
    """Load reproduction ``name``'s ``main`` through its entry point and run it on ``argv``."""
    points = _reproductions()
    if not points:
        raise InvalidArgumentError(
            f"Expected a paper reproduction registered under the entry-point group "
            f"{REPRODUCTIONS!r}; got {name!r}, and none is registered. Hint: the reproductions "
            "ship in mechkit's wheel as mechkit_circuits; in a checkout run `pip install -e .` "
            "to register them, or `python -m circuits.NAME`."
        )
    check_choice("the reproduction", name, sorted(points))
    code = points[name].load()(argv)
    return 0 if code is None else int(code)


def _tuned_lens(args: argparse.Namespace) -> None:
    model = load_model(args.model)
    config = TunedLensConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.steps // 10
    )
    train = corpus_tokens(model, seq_len=args.seq_len, split="train")
    start = time.perf_counter()
    lens = train_tuned_lens(model, train, config, checkpoint_dir=args.out)
    seconds, n_seq = time.perf_counter() - start, args.steps * args.batch_size
    print(f"trained in {seconds:.0f} s on {n_seq} sequences of {args.seq_len} tokens")
    held_out = corpus_tokens(
        model, seq_len=args.seq_len, split="test", max_sequences=args.eval_sequences
    )
    table = compare_lenses(model, held_out, lens)
    df = table.to_dataframe()
    out = Path(args.out)
    df.to_csv(out / "kl_by_layer.csv", index=False)
    table.plot().write_html(out / "kl_by_layer.html", include_plotlyjs="directory")
    print(df.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


def _add_sweep_parser(commands: argparse._SubParsersAction) -> None:
    sweep = commands.add_parser(
        "sweep",
        help="run a resumable activation-patching sweep described by a YAML config",
        description=textwrap.fill(
            "Run the activation-patching sweeps a YAML config describes. Every finished cell is "
            "appended to OUT/results.jsonl at once; run the same command again after a kill or "
            "crash and it resumes where it stopped, computing no cell twice. When an entry is "
            "complete, OUT/NAME.csv, NAME.html and NAME.png hold its table and heatmap; "
            "OUT/run.json holds the config, mechkit's version and the status. A config whose "
            "keys (other than device, memory_budget, format, out, executor, ray_address, "
            "actors) differ from the one in OUT is "
            "refused: pass --restart to discard the old results, or another --out. A sweep "
            "deletes or overwrites only files it wrote, as run.json records them (name, size, "
            "SHA-256); a foreign or edited file in its way stops it with an error naming it.",
            width=98,
        ),
        epilog=config_help()
        + "\n\nexample: examples/sweep_ioi.yaml (smollm2-135m, IOI prompts, runs offline)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sweep.add_argument("config", help="the YAML config file")
    sweep.add_argument("--out", help="output folder (overrides the config's out)")
    sweep.add_argument(
        "--restart",
        action="store_true",
        help="discard the results a sweep wrote in the output folder (never other files)",
    )
    sweep.add_argument("--no-progress", action="store_true", help="no progress bar")
    sweep.add_argument(
        "--ray",
        nargs="?",
        const="",
        metavar="ADDRESS",
        help="run the cells on a Ray cluster's actors, each loading the model once (needs pip "
        "install 'mechkit[ray]'); ADDRESS: a running cluster (auto, head:6379, "
        "ray://head:10001), none: start a local one. Overrides the config's executor.",
    )
    sweep.add_argument(
        "--actors", type=int, help="with --ray: model copies (default: one per GPU, else per CPU)"
    )


def _sweep(args: argparse.Namespace) -> int:
    def say(message: str) -> None:
        print(f"[mechkit sweep] {message}", file=sys.stderr, flush=True)

    config = load_config(args.config)  # every key checked before the model loads
    if args.ray is not None or args.actors is not None:
        config = dataclasses.replace(
            config,
            executor="ray" if args.ray is not None else config.executor,
            ray_address=args.ray or config.ray_address,
            actors=args.actors or config.actors,
        )
    out = args.out or config.out or str(Path("runs") / Path(args.config).stem)
    start = time.perf_counter()
    try:
        run = run_sweep(
            config, out=out, restart=args.restart, progress=not args.no_progress, log=say
        )
    except KeyboardInterrupt:
        say(f"interrupted; run the same command again to resume ({out})")
        return 130
    except SweepConfigError as exc:  # a key checked against the model: name the file
        if exc.source is not None:
            raise
        raise type(exc)(exc.path, exc.detail, args.config) from None
    print(
        f"sweep complete: {run.cells_total} cells ({run.cells_computed} computed now) in "
        f"{time.perf_counter() - start:.1f} s; results in {run.out}"
    )
    for name, result in run.results.items():
        top = ", ".join(
            " ".join(f"{k}={v}" for k, v in where.items()) + f": {score:.3g}"
            for where, score in result.top(3)
        )
        files = ", ".join(path.name for path in run.files[name].values())
        print(f"  {name}: {files}; top cells {top}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
