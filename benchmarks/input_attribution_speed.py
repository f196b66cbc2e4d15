"""Input attribution on SmolLM2-135M: mechkit beside captum, and the numbers of the docs page.

Three parts, each printing a table (``--part`` picks one; all by default):

- ``completeness``: the integrated-gradients completeness gap ``|sum IG - (F(x) - F(x'))|``
  per baseline and quadrature rule at several step counts (log-probability of the next token of
  30-token prompts), which chose the defaults;
- ``speed``: the same attributions timed with mechkit and with captum (``IntegratedGradients``
  on a function from input embeddings to the target through the same model, captum's best
  batching at equal steps; ``KernelShap`` and ``Lime`` at 500 samples with captum's defaults
  and with 50 perturbations per pass), in one run, with the ratios and the largest difference
  between the two IGs;
- ``faithfulness``: comprehensiveness, sufficiency and AOPC of every method on 24 prompts.

Run: ``OMP_NUM_THREADS=2 python benchmarks/input_attribution_speed.py [--part speed]``.
"""

from __future__ import annotations

import argparse
import time

import torch

import mechkit as mk

PROMPTS = [
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
    "It is named after the engineer Gustave Eiffel, whose company designed and built the",
    "When Mary and John went to the store after a long day at work in the city, they bought "
    "some bread, milk and eggs for dinner, and then John gave the bag to",
]

N_PROMPTS = 1

FAITH_PROMPTS = [
    "The capital of France is",
    "The Eiffel Tower is in the city of",
    "When Mary and John went to the store, John gave a drink to",
    "The opposite of hot is",
    "Two plus two equals",
    "The sun rises in the",
    "She put the milk back in the",
    "Monday, Tuesday, Wednesday,",
    "The cat sat on the",
    "Water freezes at zero degrees",
    "The largest planet in our solar system is",
    "He opened the door with a",
    "The first president of the United States was George",
    "In the morning I drink a cup of",
    "The Great Wall is in",
    "A, B, C, D,",
    "The color of the sky on a clear day is",
    "Python is a programming",
    "The chef cooked the pasta in a large",
    "Birds can fly because they have",
    "The author of Romeo and Juliet is William",
    "One, two, three, four,",
    "The Amazon rainforest is in South",
    "To unlock the door she needed the",
]


def prompt_tokens(model, text: str, n: int = 30) -> torch.Tensor:
    ids = model.to_tokens(text, prepend_bos=False)[0, :n]
    return ids[None]


def completeness(model) -> None:
    print("## IG completeness gap on SmolLM2 (logprob of the next token, 30-token prompts)")
    print("| baseline | rule | steps | mean abs gap (nats) | mean relative gap | s |")
    print("|---|---|---|---|---|---|")
    for baseline in ("pad", "zero", "mean"):
        for rule in ("adaptive", "gausslegendre"):
            for steps in (32, 64):
                gaps, rel, t0 = [], [], time.perf_counter()
                for text in PROMPTS[:N_PROMPTS]:
                    r = mk.attribute_inputs(
                        model, prompt_tokens(model, text), baseline=baseline, n_steps=steps,
                        quadrature=rule, progress=False,
                    )  # fmt: skip
                    gap = float(r.extras["completeness_gap"][0])
                    delta = float(r.extras["target_value"][0] - r.extras["baseline_value"][0])
                    gaps.append(abs(gap))
                    rel.append(abs(gap) / max(abs(delta), 1e-9))
                dt = (time.perf_counter() - t0) / N_PROMPTS
                print(
                    f"| {baseline} | {rule} | {steps} | {sum(gaps) / len(gaps):.4g} | "
                    f"{sum(rel) / len(rel):.2%} | {dt:.1f} |",
                    flush=True,
                )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=["completeness", "speed", "faithfulness", "all"])
    args = parser.parse_args()
    torch.manual_seed(0)
    model = mk.load_model("smollm2-135m")
    part = args.part or "all"
    if part in ("completeness", "all"):
        completeness(model)


if __name__ == "__main__":
    main()
