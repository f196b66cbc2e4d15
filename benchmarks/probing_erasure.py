"""A fair LEACE-vs-random erasure comparison for Python syntax roles on SmolLM2-135M (CPU).

Run: ``OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/probing_erasure.py [out.json]``.

Last session's comparison was unfair twice over: LEACE was fitted on 447 examples for 576
dimensions (it overfitted), and every eraser, LEACE or random, was applied at the attention
sink (the first token, activations up to ~26,000), where any edit fitted on ordinary tokens is
thousands large and breaks the model. Here:

1. the syntax roles (keyword, identifier, string, number, operator) of tokens of ``N_LINES``
   lines of the standard library (:func:`mechkit.probing.python_syntax`), never at position 0;
   LEACE is fitted on the examples of the first half of the lines and checked on the other
   half (a linear probe trained and scored on held-out lines' erased activations), as well as
   in-sample (:func:`mechkit.probing.amnesic_probe`'s probe);
2. the LM loss on held-out standard-library code (files the examples do not come from), with
   the concept erased at every position but the first, against random erasers of the same
   rank, isotropic (uniform random projections) and whitened (LEACE's form with random
   directions), ``N_SEEDS`` seeds each, also erased off the first token;
3. the largest activation at the first token and elsewhere, and the largest edit each eraser
   makes off the first token.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

import mechkit as mk
from mechkit.probing import ConceptEraser, collect_activations, fit_probe, lm_loss, python_syntax
from mechkit.sae.activations import stdlib_documents

OUT = sys.argv[1] if len(sys.argv) > 1 else "probing_erasure.json"
N_LINES, N_SEEDS, LAYER = 1200, 3, 15
SEQ, N_TEXTS = 64, 32
figures: dict = {"load": [], "layer": LAYER, "n_lines": N_LINES, "seeds": N_SEEDS}


def save() -> None:
    figures["load"].append(os.getloadavg()[0])
    with open(OUT, "w") as f:
        json.dump(figures, f, indent=1)


def code_windows(model) -> list[list[int]]:
    """``N_TEXTS`` windows of ``SEQ`` tokens of standard-library files the syntax examples do
    not use (python_syntax reads the first 40 held-out files)."""
    tokens: list[int] = []
    for doc in stdlib_documents("test")[60:]:
        tokens += model.tokenizer.encode(doc, add_special_tokens=False)
        if len(tokens) > SEQ * N_TEXTS * 4:
            break
    bos = [model.tokenizer.bos_token_id] if model.cfg.default_prepend_bos else []
    step = len(tokens) // N_TEXTS
    return [bos + tokens[i * step : i * step + SEQ - len(bos)] for i in range(N_TEXTS)]


def held_out_probe(x, y, seed: int = 0) -> float:
    return fit_probe(x, y, l2=1e-3, seed=seed).test_score


def main() -> None:
    t0 = time.time()
    torch.manual_seed(0)
    model = mk.load_model("smollm2-135m", device="cpu")
    data = python_syntax(model, N_LINES)
    keep = [i for i, p in enumerate(data.positions) if p != 0]  # never the first token
    data = data[keep]
    lines = list(dict.fromkeys(data.texts))
    first_half = set(lines[: len(lines) // 2])
    fit_rows = [i for i, t in enumerate(data.texts) if t in first_half]
    check_rows = [i for i, t in enumerate(data.texts) if t not in first_half]
    counts = {c: int((data.label_ids == i).sum()) for i, c in enumerate(data.classes)}
    figures["dataset"] = {"examples": len(data), "lines": len(lines), "classes": counts,
                          "fit_examples": len(fit_rows), "check_examples": len(check_rows),
                          "d_model": model.cfg.d_model,
                          "bos": bool(model.cfg.default_prepend_bos)}  # fmt: skip
    hook = f"blocks.{LAYER}.hook_resid_pre"
    x = collect_activations(model, data, [hook])[hook].double()
    y = data.label_ids
    figures["collect_seconds"] = round(time.time() - t0, 1)
    save()
    fit_x, fit_y = x[fit_rows], y[fit_rows]
    check_x, check_y = x[check_rows], y[check_rows]
    leace = ConceptEraser.leace(fit_x, fit_y).at(hook)
    erasers = {"leace": leace}
    for seed in range(N_SEEDS):
        erasers[f"isotropic{seed}"] = ConceptEraser.random(
            x.shape[1], leace.rank, bias=leace.bias, seed=seed
        ).at(hook)
        erasers[f"whitened{seed}"] = ConceptEraser.random(
            x.shape[1], leace.rank, like=fit_x, seed=seed
        ).at(hook)
    majority = float(torch.bincount(check_y).max() / len(check_y))
    figures["probe"] = {"majority_held_out": majority, "rank": leace.rank,
                        "clean_held_out": held_out_probe(check_x, check_y),
                        "leace_in_sample": held_out_probe(leace(fit_x), fit_y)}  # fmt: skip
    for name, eraser in erasers.items():
        if name == "leace" or name.endswith("0"):
            figures["probe"][f"{name}_held_out"] = held_out_probe(eraser(check_x), check_y)
    print(figures["probe"], flush=True)
    save()

    texts = code_windows(model)
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.tensor(texts), names_filter=hook)
    acts = cache[hook].double()  # (batch, pos, d)
    figures["activation_max"] = {"first_token": float(acts[:, 0].abs().max()),
                                 "other_tokens": float(acts[:, 1:].abs().max())}  # fmt: skip
    off_sink = list(range(1, SEQ))
    loss = {"clean": lm_loss(model, texts)}
    edit = {}
    for name, eraser in erasers.items():
        with mk.erase(model, eraser, positions=off_sink):
            loss[name] = lm_loss(model, texts)
        edit[name] = float((eraser(acts[:, 1:]) - acts[:, 1:]).norm(dim=-1).max())
        print(name, round(loss[name] - loss["clean"], 4), round(edit[name], 1), flush=True)
        figures["loss"], figures["edit_max_off_sink"] = loss, edit
        save()
    figures["total_seconds"] = round(time.time() - t0, 1)
    save()


if __name__ == "__main__":
    main()
