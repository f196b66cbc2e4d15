"""Per-file test times from pytest's JUnit XML, for one run or a before/after pair.

    .venv/bin/python -m pytest --junitxml=after.xml
    .venv/bin/python benchmarks/test_times.py after.xml               # one run
    .venv/bin/python benchmarks/test_times.py before.xml after.xml    # side by side
    .venv/bin/python benchmarks/test_times.py after.xml --write-durations tests/durations.json

``--write-durations`` records each file's time for the suite's scheduler: the root conftest.py
starts the longest files first, so that two workers finish together (see tests/durations.json).

Each test's time is pytest's total for it (setup, call and teardown), so a session or module
fixture is charged to the first test that needs it. Files are sorted by their largest time.
"""

from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path


def per_file(path: Path) -> dict[str, tuple[float, int, int]]:
    """``file -> (seconds, tests, failed or errored)`` from one JUnit XML file."""
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0, 0])
    for case in ET.parse(path).getroot().iter("testcase"):
        module = case.get("classname", "")
        # classname is "tests.sub.test_file" or "tests.sub.test_file.TestClass"
        parts = module.split(".")
        while parts and not parts[-1].startswith("test_"):
            parts.pop()
        name = "/".join(parts) + ".py" if parts else module
        entry = totals[name]
        entry[0] += float(case.get("time", 0) or 0)
        entry[1] += 1
        entry[2] += any(child.tag in ("failure", "error") for child in case)
    return {k: (v[0], int(v[1]), int(v[2])) for k, v in totals.items()}


def file_path(module: str) -> str:
    """The file a JUnit classname names: "tests.x.test_y" (maybe with a class) or, for a
    doctest, the dotted module "mechkit.x" (a module file or a package's __init__.py)."""
    parts = module.split(".")
    while parts and parts[0] == "tests" and not parts[-1].startswith("test_"):
        parts.pop()
    path = "/".join(parts)
    if parts and parts[0] != "tests" and Path(path).is_dir():
        return path + "/__init__.py"
    return path + ".py"


def node_id(module: str, name: str) -> str:
    """pytest's node id of a JUnit test case (file, then class if any, then the name; without
    the ``@group`` that ``--dist loadgroup`` appends, as xdist splits it off)."""
    if name.rfind("@") > name.rfind("]"):
        name = name.rsplit("@", 1)[0]
    path = file_path(module)
    dotted = path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
    inner = module.removeprefix(dotted).strip(".")
    return "::".join([path, *([inner] if inner else []), name])


def durations(path: Path, least: float = 3.0) -> dict[str, dict[str, float]]:
    """From one JUnit XML file: ``{"files": file -> seconds, "tests": node id -> seconds}``,
    the longest first, tests only from ``least`` seconds up (rounded to 0.1 s)."""
    files: dict[str, float] = defaultdict(float)
    tests: dict[str, float] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        module, seconds = case.get("classname", ""), float(case.get("time", 0) or 0)
        files[file_path(module)] += seconds
        if seconds >= least:
            tests[node_id(module, case.get("name", ""))] = seconds

    def ordered(table: dict[str, float]) -> dict[str, float]:
        return {k: round(v, 1) for k, v in sorted(table.items(), key=lambda kv: -kv[1])}

    return {"files": ordered(files), "tests": ordered(tests)}


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}:{seconds % 60:04.1f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="one or two JUnit XML files")
    parser.add_argument(
        "--write-durations",
        type=Path,
        metavar="JSON",
        help="also write the (last) run's seconds per file there, for the scheduler",
    )
    args = parser.parse_args(argv)
    if args.write_durations is not None:
        text = json.dumps(durations(args.runs[-1]), indent=1) + "\n"
        args.write_durations.write_text(text)
    if len(args.runs) > 2:
        parser.error("give one run, or a before and an after run")
    runs = [per_file(path) for path in args.runs]
    files = sorted(set().union(*runs), key=lambda f: -max(r.get(f, (0,))[0] for r in runs))
    width = max(len(f) for f in files)
    labels = [p.stem for p in args.runs]
    header = f"{'file':<{width}}" + "".join(f" {label[:16]:>16} {'tests':>5}" for label in labels)
    print(header + ("  change" if len(runs) == 2 else ""))
    for name in files:
        row = f"{name:<{width}}"
        for run in runs:
            seconds, count, bad = run.get(name, (0.0, 0, 0))
            mark = f" ({bad} failed)" if bad else ""
            row += f" {seconds:>15.1f}s {count:>5}{mark}"
        if len(runs) == 2:
            before, after = runs[0].get(name, (0.0,))[0], runs[1].get(name, (0.0,))[0]
            row += f"  {after - before:+.1f}s"
        print(row)
    row = f"{'total':<{width}}"
    for run in runs:
        seconds = sum(v[0] for v in run.values())
        row += f" {seconds:>15.1f}s {sum(v[1] for v in run.values()):>5}"
    print(
        row
        + "".join(
            f"   ({label}: {_minutes(sum(v[0] for v in run.values()))})"
            for label, run in zip(labels, runs, strict=True)
        )
    )


if __name__ == "__main__":
    main()
