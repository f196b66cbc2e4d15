"""The figures of the probing/erasure/DAS note, on SmolLM2-135M (CPU).

Run: ``OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/probing_note.py [out.json]``.

1. probe accuracy and selectivity by layer for two properties (name gender, Python syntax roles);
2. the LM loss with the property erased by LEACE against random erasers of the same rank;
3. agreement of mechkit's LEACE with EleutherAI's concept-erasure on the same activations;
4. DAS on IOI (the position of the indirect object, a subspace of the residual stream at the
   last token) with the illusion check's verdict.
"""

from __future__ import annotations

import json
import sys
import time

import torch

import mechkit as mk
from mechkit.corpus import corpus_tokens
from mechkit.probing import (
    ConceptEraser,
    amnesic_probe,
    collect_activations,
    name_gender,
    python_syntax,
)

OUT = sys.argv[1] if len(sys.argv) > 1 else "probing_note.json"
LAYERS = [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 29]
GRID = (1e-3, 1e-2, 1e-1)
figures: dict = {}


def save() -> None:
    with open(OUT, "w") as f:
        json.dump(figures, f, indent=1)


def probes(model, datasets) -> None:
    for data in datasets:
        t = time.time()
        result = mk.train_probe(model, data, layers=LAYERS, l2_grid=GRID, folds=3)
        figures[f"probe_{data.name}"] = {
            "n": len(data), "classes": list(result.classes), "majority": result.majority,
            "table": result.to_dataframe().round(3).to_dict(orient="list"),
            "seconds": round(time.time() - t, 1),
        }  # fmt: skip
        print(result.to_dataframe().round(3).to_string(), flush=True)
        save()


def erasure(model, datasets, layer: int) -> None:
    texts = corpus_tokens(model, seq_len=64, split="test", max_sequences=48).tolist()
    for data in datasets:
        t = time.time()
        eraser = mk.fit_leace(model, data, layer=layer)
        result = amnesic_probe(model, data, eraser, texts=texts, n_random=3)
        hook = eraser.hook_name
        x = collect_activations(model, data, [hook])[hook].double()
        from concept_erasure import LeaceFitter

        z = torch.nn.functional.one_hot(data.label_ids).double()
        ref = LeaceFitter.fit(x, z, shrinkage=False, constrain_cov_trace=False).eraser
        ours = eraser(x)
        theirs = ref(x)
        erased_z = ours - ours.mean(0)
        cross = erased_z.T @ (z - z.mean(0)) / (len(z) - 1)
        figures[f"erasure_{data.name}"] = {
            "layer": layer, "rank": eraser.rank,
            "loss_clean": result.loss_clean, "loss_leace": result.loss_erased,
            "loss_random": result.loss_random.tolist(),
            "probe_accuracy": result.probe_accuracy,
            "probe_accuracy_erased": result.probe_accuracy_erased,
            "max_abs_diff_vs_concept_erasure": float((ours - theirs).abs().max()),
            "max_abs_activation": float(x.abs().max()),
            "max_cross_covariance": float(cross.abs().max()),
            "seconds": round(time.time() - t, 1),
        }  # fmt: skip
        print(figures[f"erasure_{data.name}"], flush=True)
        save()


def ioi_das(model, layers) -> None:
    pairs = mk.probing.ioi_position_pairs(model, 96)
    base, source, labels, choices, io = (pairs.base, pairs.source, pairs.labels,
                                         pairs.choices, pairs.answers)  # fmt: skip
    ids = torch.tensor([[mk.tokenize_answer(model, c) for c in row] for row in choices])
    # the unchanged model's logits at each base's last token (k = 0: no intervention)
    logits = mk.probing.interchange(model, base, base, torch.zeros(0, model.cfg.d_model),
                                    hook_name="blocks.0.hook_resid_pre")  # fmt: skip
    io_ids = torch.tensor([mk.tokenize_answer(model, v) for v in io])
    picked = ids[torch.arange(len(ids)), logits.gather(-1, ids).argmax(-1)]
    figures["ioi_model_accuracy"] = float((picked == io_ids).double().mean())
    print("IOI accuracy (IO over S):", figures["ioi_model_accuracy"], flush=True)
    for layer in layers:
        t = time.time()
        result = mk.das(
            model, base, source, labels, hook_name=f"blocks.{layer}.hook_resid_post",
            choices=choices, k=1, steps=40, lr=2e-2, batch_size=16,
        )  # fmt: skip
        report = result.illusion
        figures[f"das_ioi_L{layer}"] = {
            "k": result.k, "iia_train": result.iia_train, "iia_test": result.iia_test,
            "iia_none": result.iia_none, "iia_full": result.iia_full,
            "illusion": report.to_dict(), "seconds": round(time.time() - t, 1),
        }  # fmt: skip
        print(layer, result, report, flush=True)
        save()


def main() -> None:
    torch.manual_seed(0)
    model = mk.load_model("smollm2-135m", device="cpu")
    gender, syntax = name_gender(model), python_syntax(model, 60)
    figures["datasets"] = {"name_gender": len(gender), "python_syntax": len(syntax)}
    probes(model, [gender, syntax])
    erasure(model, [gender, syntax], layer=15)
    ioi_das(model, [int(a) for a in sys.argv[2:]] or [16])
    _ = ConceptEraser
    save()


if __name__ == "__main__":
    main()
