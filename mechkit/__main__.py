"""Command line: ``mechkit demo`` (also ``python -m mechkit demo``)."""

from __future__ import annotations

import argparse
import sys

from mechkit.errors import MechkitError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mechkit", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run the main analyses and write an HTML report")
    demo.add_argument("--out", default="reports", help="output folder (default: reports)")
    demo.add_argument("--model", default="smollm2-135m", help="model name or path")
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
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            from mechkit.demo import run_demo

            run_demo(args.out, args.model)
        elif args.command == "tuned-lens":
            _tuned_lens(args)
    except MechkitError as exc:
        print(f"mechkit: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _tuned_lens(args: argparse.Namespace) -> None:
    import time
    from pathlib import Path

    import mechkit as mk

    model = mk.load_model(args.model)
    config = mk.TunedLensConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.steps // 10
    )
    train = mk.corpus_tokens(model, seq_len=args.seq_len, split="train")
    start = time.perf_counter()
    lens = mk.train_tuned_lens(model, train, config, checkpoint_dir=args.out)
    seconds, n_seq = time.perf_counter() - start, args.steps * args.batch_size
    print(f"trained in {seconds:.0f} s on {n_seq} sequences of {args.seq_len} tokens")
    held_out = mk.corpus_tokens(
        model, seq_len=args.seq_len, split="test", max_sequences=args.eval_sequences
    )
    table = mk.compare_lenses(model, held_out, lens)
    df = table.to_dataframe()
    out = Path(args.out)
    df.to_csv(out / "kl_by_layer.csv", index=False)
    table.plot().write_html(out / "kl_by_layer.html", include_plotlyjs="directory")
    print(df.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    sys.exit(main())
