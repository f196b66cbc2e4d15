"""Each context-mixing method's time on a 256-token SmolLM2 input, and the agreement table.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/context_mixing_speed.py --tokens 256
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/context_mixing_speed.py --agreement

Prints one line per method: seconds for ``mk.context_mixing(model, tokens, method=...)`` on one
prompt of ``--tokens`` tokens (every layer kept, float16), with flow and ``decompx_logit``
computed for the last position only (flow: one max-flow per key; decompx_logit: one backward
pass per query). Each line gives the wall time and the process's CPU time: on a shared machine
(the load average printed before and after) the CPU time, at one thread, is the figure to
compare. ``--skip`` leaves methods out (e.g. ``--skip decompx`` on a slow machine).
``--agreement`` prints the Spearman table of :func:`mechkit.mixing_agreement` on IOI and
factual prompts instead. ``--json PATH`` also writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

import mechkit as mk

TEXT = (
    "The history of the city begins in the early middle ages, when a small market grew on the "
    "bank of the river. Merchants from the north brought wool and timber, and the town's "
    "council built a stone bridge that still stands. In the centuries that followed, the city "
    "became known for its printers, its university and its long winters. "
)

PROMPTS = [
    "When Mary and John went to the store, John gave a drink to",
    "When Tom and Anna went to the park, Anna gave a ball to",
    "After Sarah and David had lunch, David handed the bill to",
    "The Eiffel Tower is located in the city of",
    "The capital of Germany is the city of",
    "Then, Lisa and Mark walked to the school. Mark gave a book to",
]


def long_prompt(model: mk.core.Model, n_tokens: int) -> torch.Tensor:
    ids = model.to_tokens(TEXT * 20, prepend_bos=False)[0]
    return ids[:n_tokens][None]  # (1, n_tokens)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--skip", nargs="*", default=[])
    parser.add_argument("--agreement", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model = mk.load_model("smollm2-135m", device="cpu")
    figures: dict[str, object] = {"threads": torch.get_num_threads()}
    if args.agreement:
        agree = mk.mixing_agreement(model, PROMPTS, progress=False)
        print(agree.to_dataframe().to_string(index=False, float_format="%.3f"))
        figures["agreement"] = agree.to_dataframe().to_dict(orient="list")
    else:
        tokens = long_prompt(model, args.tokens)
        print("load:", os.getloadavg(), flush=True)
        start, cpu = time.perf_counter(), time.process_time()
        model(tokens)
        figures["forward"] = (time.perf_counter() - start, time.process_time() - cpu)
        print(f"one forward pass, {tokens.shape[1]} tokens: {figures['forward'][1]:.2f} s cpu")
        for method in mk.mixing.METHODS:
            if method in args.skip:
                continue
            positions = -1 if method in ("flow", "decompx_logit") else None
            start, cpu = time.perf_counter(), time.process_time()
            mk.context_mixing(model, tokens, method=method, positions=positions, progress=False)
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu
            figures[method] = (wall, cpu)
            print(f"{method:15s} {cpu:8.2f} s cpu {wall:8.2f} s wall", flush=True)
        print("load:", os.getloadavg(), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()
