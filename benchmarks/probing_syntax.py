"""Python syntax roles on SmolLM2-135M (CPU): probes by layer after the labelling fix, and a fair
LEACE-vs-random comparison for the note.

Run: ``OMP_NUM_THREADS=1 PYTHONPATH=$PWD nice python benchmarks/probing_syntax.py [out.json]``.

1. probe accuracy, control accuracy and selectivity by layer (word types held out);
2. at one layer, the LM loss (held-out corpus text) unchanged, with the syntax roles erased by
   LEACE, with random erasers of the same rank drawn like LEACE (random directions of the
   whitened space: ``amnesic_probe``'s default control), and with isotropic random erasers
   (uniformly random orthogonal projections: the old control); the same for name gender;
3. why the isotropic control is unfair: the largest activation on the corpus text at that
   layer, and the largest change each eraser makes there, at the first token (the attention
   sink) and elsewhere.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

import mechkit as mk
from mechkit.corpus import corpus_tokens
from mechkit.probing import (
    ConceptEraser,
    amnesic_probe,
    collect_activations,
    lm_loss,
    name_gender,
    python_syntax,
)

OUT = sys.argv[1] if len(sys.argv) > 1 else "probing_syntax.json"
LAYERS = [0, 8, 16, 24]
L2 = 1e-2  # fixed: no cross-validation grid (the CPU is shared)
N_RANDOM = 2
ERASE_AT = 15
figures: dict = {"load": [], "layers": LAYERS, "erase_at": ERASE_AT}


def save() -> None:
    figures["load"].append(os.getloadavg()[0])
    with open(OUT, "w") as f:
        json.dump(figures, f, indent=1)


def change(eraser, acts):
    """The largest norm of the edit at the first token and at the others."""
    delta = (eraser(acts.double()) - acts.double()).norm(dim=-1)  # (batch, pos)
    return {"first_token": float(delta[:, 0].max()), "other_tokens": float(delta[:, 1:].max())}


def main() -> None:
    t0 = time.time()
    torch.manual_seed(0)
    model = mk.load_model("smollm2-135m", device="cpu")
    syntax = python_syntax(model, 60)
    counts = {c: int((syntax.label_ids == i).sum()) for i, c in enumerate(syntax.classes)}
    figures["syntax_dataset"] = {"n": len(syntax), "classes": counts}
    try:  # whole word types held out, so the control task cannot be memorised
        result = mk.train_probe(model, syntax, layers=LAYERS, l2=L2, split="type")
        figures["split"] = "type"
    except mk.MechkitError as exc:
        figures["split"] = f"random (type split refused: {exc})"
        result = mk.train_probe(model, syntax, layers=LAYERS, l2=L2)
    figures["probe_syntax"] = {"majority": result.majority,
                               "table": result.to_dataframe().round(3).to_dict(orient="list"),
                               "seconds": round(time.time() - t0, 1)}  # fmt: skip
    print(result.to_dataframe().round(3).to_string(), flush=True)
    save()
    texts = corpus_tokens(model, seq_len=64, split="test", max_sequences=24)
    hook = f"blocks.{ERASE_AT}.hook_resid_pre"
    with torch.no_grad():
        _, cache = model.run_with_cache(texts, names_filter=hook)
    acts = cache[hook]  # (batch, pos, d_model)
    figures["corpus_activation_max"] = {"first_token": float(acts[:, 0].abs().max()),
                                        "other_tokens": float(acts[:, 1:].abs().max())}  # fmt: skip
    for data in (syntax, name_gender(model)):
        t = time.time()
        eraser = mk.fit_leace(model, data, layer=ERASE_AT)
        amnesic = amnesic_probe(model, data, eraser, texts=texts.tolist(), n_random=N_RANDOM)
        x = collect_activations(model, data, [hook])[hook].double()
        row = {"rank": eraser.rank, "loss_clean": amnesic.loss_clean,
               "loss_leace": amnesic.loss_erased,
               "loss_random_whitened": amnesic.loss_random.tolist(),
               "probe_accuracy": amnesic.probe_accuracy,
               "probe_accuracy_erased": amnesic.probe_accuracy_erased,
               "edit_leace": change(eraser, acts), "edit_random_whitened": [],
               "loss_random_isotropic": [], "edit_random_isotropic": []}  # fmt: skip
        for i in range(N_RANDOM):
            fair = ConceptEraser.random(x.shape[1], eraser.rank, like=x, bias=eraser.bias, seed=i)
            row["edit_random_whitened"].append(change(fair, acts))
            iso = ConceptEraser.random(x.shape[1], eraser.rank, bias=eraser.bias, seed=i).at(hook)
            row["edit_random_isotropic"].append(change(iso, acts))
            with mk.erase(model, iso):
                row["loss_random_isotropic"].append(lm_loss(model, texts.tolist()))
        row["seconds"] = round(time.time() - t, 1)
        figures[f"erasure_{data.name}"] = row
        print(data.name, row, flush=True)
        save()
    figures["total_seconds"] = round(time.time() - t0, 1)
    save()


if __name__ == "__main__":
    main()
