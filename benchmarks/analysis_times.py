"""Time each residual-stream analysis on the embedded model (CPU unless CUDA is present).

    python benchmarks/analysis_times.py

Prints one line per analysis with its wall time; the model load (from the cache) is timed
separately. The inputs are the IOI prompts of the demo (4 prompts, ~15 tokens each).
"""

from __future__ import annotations

import time

import torch

import mechkit as mk
from mechkit.demo import IOI_PAIRS


def timed(label: str, fn) -> None:
    start = time.perf_counter()
    fn()
    print(f"{label:<44s} {time.perf_counter() - start:7.2f} s", flush=True)


def main() -> None:
    start = time.perf_counter()
    model = mk.load_model("smollm2-135m")
    print(f"{'load (cached)':<44s} {time.perf_counter() - start:7.2f} s")
    clean, corrupt, answers, wrongs = (list(x) for x in zip(*IOI_PAIRS, strict=True))
    pairs = mk.PromptPairs.from_lists(model, clean, corrupt, answers, wrongs, aligned=False)
    with torch.no_grad():
        timed("one forward pass (reference)", lambda: model(pairs.clean_tokens))
    timed("logit lens, top-5 + 1 target", lambda: mk.logit_lens(model, clean, targets=answers[:1]))
    timed("residual decomposition (final, all pos)", lambda: mk.decompose_resid(model, pairs))
    timed("direct logit attribution", lambda: mk.direct_logit_attribution(model, pairs))
    timed("neuron attribution (layer 20)", lambda: mk.neuron_attribution(model, pairs, 20))
    for kind in ("previous_token", "duplicate_token", "induction", "successor", "copying"):
        timed(f"detect_heads {kind}", lambda kind=kind: mk.detect_heads(model, kind))
    held_out = mk.corpus.corpus_tokens(model, seq_len=64, split="test", max_sequences=4)
    timed(
        "compare_lenses (logit lens, 256 tokens)", lambda: mk.lens.compare_lenses(model, held_out)
    )


if __name__ == "__main__":
    main()
