"""Each context-mixing method's time on a 256-token SmolLM2 input, and the agreement table.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/context_mixing_speed.py --tokens 256
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/context_mixing_speed.py --agreement

Prints one line per method: seconds for ``mk.context_mixing(model, tokens, method=...)`` on one
prompt of ``--tokens`` tokens (every layer kept, float16), with flow computed for the last
position only (its cost is one max-flow per key over ``layers x pos^2`` edges). ``--skip``
leaves methods out (e.g. ``--skip decompx`` on a slow machine). ``--agreement`` prints the
Spearman table of :func:`mechkit.mixing_agreement` on IOI and factual prompts instead.
``--json PATH`` also writes the figures.
"""

from __future__ import annotations

import argparse
import json
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
        start = time.perf_counter()
        model(tokens)
        figures["forward_s"] = time.perf_counter() - start
        print(f"one forward pass, {tokens.shape[1]} tokens: {figures['forward_s']:.2f} s")
        for method in mk.mixing.METHODS:
            if method in args.skip:
                continue
            positions = -1 if method == "flow" else None
            start = time.perf_counter()
            mk.context_mixing(model, tokens, method=method, positions=positions, progress=False)
            seconds = time.perf_counter() - start
            figures[method] = seconds
            print(f"{method:15s} {seconds:8.2f} s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()
