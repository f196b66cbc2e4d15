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


def faithfulness(model) -> None:
    print("## Faithfulness on SmolLM2, 24 prompts (logprob of the predicted next token)")
    options = {
        "integrated_gradients": {"n_steps": 32},
        "kernel_shap": {"n_samples": 200},
        "lime": {"n_samples": 200},
    }
    t0 = time.perf_counter()
    c = mk.compare_input_attributions(model, FAITH_PROMPTS, options=options, progress=False)
    frame = c.to_dataframe()
    print(frame.round(3).to_string())
    print("Spearman between methods (mean over prompts):")
    print(c.correlations.numpy().round(2))
    print(f"({time.perf_counter() - t0:.0f} s)")


def speed(model) -> None:
    from captum.attr import IntegratedGradients, KernelShap, Lime

    print("## Speed on SmolLM2, one 30-token prompt")
    tokens = prompt_tokens(model, PROMPTS[0])
    answer = int(model(tokens)[0, -1].argmax())
    x = model.W_E[tokens].detach()
    pad = model.tokenizer.pad_token_id
    base = model.W_E[torch.full_like(tokens, pad)].detach()

    def forward(emb):
        logits = model.run_with_hooks(
            tokens.expand(emb.shape[0], -1), fwd_hooks=[("hook_embed", lambda a, hook: emb)]
        )
        return logits[:, -1].float().log_softmax(-1)[:, answer]

    def timed(fn):
        t0 = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t0

    steps = 32
    theirs, t_captum = timed(
        lambda: IntegratedGradients(forward).attribute(
            x, baselines=base, n_steps=steps, method="gausslegendre", internal_batch_size=steps
        )
    )
    ours, t_ours = timed(
        lambda: mk.attribute_inputs(
            model, tokens, answer, n_steps=steps, quadrature="gausslegendre", progress=False
        )
    )
    diff = float((ours.scores[0] - theirs.sum(-1)[0]).abs().max())
    print(
        f"IG {steps} steps: captum {t_captum:.1f} s, mechkit {t_ours:.1f} s, "
        f"ratio {t_captum / t_ours:.2f}x; max |difference| {diff:.2e} "
        f"(max |attribution| {float(theirs.sum(-1).abs().max()):.3f})"
    )

    ids = tokens[0]
    n = len(ids)

    def masked(mask):  # captum's perturbation: a 0/1 mask over tokens, deletion like ours
        rows = [
            [int(t) for t, k in zip(ids.tolist(), row, strict=True) if k] or [pad]
            for row in mask.tolist()
        ]
        width = max(len(r) for r in rows)
        batch = torch.full((len(rows), width), pad)
        for k, r in enumerate(rows):
            batch[k, : len(r)] = torch.tensor(r)
        ends = torch.tensor([len(r) for r in rows])
        with torch.no_grad():
            logits = model(batch)
        return logits[torch.arange(len(rows)), ends - 1].float().log_softmax(-1)[:, answer]

    samples = 500
    ones = torch.ones(1, n)
    for name, cls in (("KernelSHAP", KernelShap), ("LIME", Lime)):
        _, t_default = timed(
            lambda cls=cls: cls(lambda m: masked(m)).attribute(ones, baselines=0, n_samples=samples)
        )
        _, t_fast = timed(
            lambda cls=cls: cls(lambda m: masked(m)).attribute(
                ones, baselines=0, n_samples=samples, perturbations_per_eval=50
            )
        )
        method = "kernel_shap" if name == "KernelSHAP" else "lime"
        _, t_mine = timed(
            lambda method=method: mk.attribute_inputs(
                model, tokens, answer, method=method, n_samples=samples, progress=False
            )
        )
        print(
            f"{name} {samples} samples: captum default {t_default:.1f} s, captum 50 per pass "
            f"{t_fast:.1f} s, mechkit {t_mine:.1f} s; ratios {t_default / t_mine:.1f}x and "
            f"{t_fast / t_mine:.1f}x"
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
    if part in ("speed", "all"):
        speed(model)
    if part in ("faithfulness", "all"):
        faithfulness(model)


if __name__ == "__main__":
    main()
