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
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            from mechkit.demo import run_demo

            run_demo(args.out, args.model)
    except MechkitError as exc:
        print(f"mechkit: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
