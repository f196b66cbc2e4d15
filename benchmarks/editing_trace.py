"""The causal trace of the editing note on SmolLM2-135M (CPU): every built-in fact the model
knows at top-1, the MLP outputs restored over windows of ``--windows`` layers (10: the paper's),
``--samples`` noise samples. Writes ``OUT/trace_w{window}.json`` (the MLP's indirect effect by
layer and token class, the peak, the total effect) and the trace as safetensors, one window at a
time.

    OMP_NUM_THREADS=1 nice python benchmarks/editing_trace.py OUT [--samples 3] [--windows 10 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import mechkit as mk
from mechkit.editing import known_facts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--windows", type=int, nargs="+", default=[10, 1])
    parser.add_argument("--facts", type=int, default=None, help="at most this many (None: all)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = mk.load_model("smollm2-135m")
    # traced: the old object only (some new objects are several tokens)
    facts = [dataclasses.replace(f, new_target=None) for f in known_facts(model)][: args.facts]
    for window in args.windows:
        t, c, load = time.time(), time.process_time(), os.getloadavg()[0]
        trace = mk.causal_trace(model, facts, kinds=("mlp",), samples=args.samples,
                                window=window, progress=False)  # fmt: skip
        trace.save(args.out / f"trace_w{window}.safetensors")
        effect = trace.indirect_effect[0]  # (layer, token class)
        note = {
            "facts": len(facts), "samples": args.samples, "window": window,
            "total_effect": trace.total_effect,
            "clean_prob": float(trace.clean_prob.mean()),
            "corrupt_prob": float(trace.corrupt_prob.mean()),
            "peak": trace.peak("mlp"), "token_classes": list(trace.token_classes),
            "by_layer": {c: effect[:, i].tolist() for i, c in enumerate(trace.token_classes)},
            "seconds": {"wall": round(time.time() - t), "cpu": round(time.process_time() - c)},
            "load": [load, os.getloadavg()[0]],
        }  # fmt: skip
        (args.out / f"trace_w{window}.json").write_text(json.dumps(note, indent=1))
        print(window, note["peak"], note["seconds"], flush=True)


if __name__ == "__main__":
    main()
