"""The figures of the editing note on SmolLM2-135M (CPU): how many built-in facts it knows, the
causal trace, and ROME (corpus covariance and C = I) and MEMIT on 20+ edits, evaluated as
CounterFact. Writes ``OUT/editing_note.json`` after each stage, the trace and its figure.

    OMP_NUM_THREADS=1 python benchmarks/editing_smollm2.py OUT [--facts 16] [--samples 5]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import time
from pathlib import Path

import torch

import mechkit as mk
from mechkit.editing import RomeConfig, WeightEdit, evaluate_edits, known_facts, memit, rome
from mechkit.editing.covariance import key_covariances
from mechkit.editing.rome import rome_update
from mechkit.errors import MultiTokenAnswerError


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--facts", type=int, default=16, help="facts traced")
    parser.add_argument("--samples", type=int, default=5, help="noise samples per fact")
    parser.add_argument("--edits", type=int, default=20)
    parser.add_argument("--cov-tokens", type=int, default=8192)
    parser.add_argument("--fluency-tokens", type=int, default=10)
    parser.add_argument("--prefixes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--layer", type=int, default=None, help="ROME layer (None: the peak)")
    parser.add_argument("--no-trace", action="store_true", help="only the facts and the edits")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    note: dict = {"threads": torch.get_num_threads()}

    def save(stage: str, start: float) -> None:
        note.setdefault("seconds", {})[stage] = round(time.time() - start, 1)
        (args.out / "editing_note.json").write_text(json.dumps(note, indent=1))
        print(stage, note["seconds"][stage], flush=True)

    t = time.time()
    model = mk.load_model("smollm2-135m")
    facts = mk.editing.builtin_facts()
    known = known_facts(model, facts)
    old = args.out / "editing_note.json"
    known5 = (
        json.loads(old.read_text())["facts"]["known_top5"]
        if old.is_file()
        else len(known_facts(model, facts, top_k=5))
    )
    note["facts"] = {
        "builtin": len(facts), "known_top1": len(known), "known_top5": known5,
        "by_relation_builtin": collections.Counter(f.relation for f in facts),
        "by_relation_top1": collections.Counter(f.relation for f in known),
    }  # fmt: skip
    save("facts", t)

    if not args.no_trace:
        trace = run_trace(args, model, known, note, save)
    note["edits"] = {}
    layer = int(trace.indirect_effect[1, :, 2].argmax()) if args.layer is None else args.layer
    run_edits(args, model, known, layer, note, save)


def run_trace(args, model, known, note, save):
    """The causal trace of a spread of relations."""
    t = time.time()
    by_rel: dict[str, list] = collections.defaultdict(list)
    for f in known:
        by_rel[f.relation].append(f)
    traced = []
    while len(traced) < min(args.facts, len(known)):
        for rel in list(by_rel):
            if by_rel[rel] and len(traced) < args.facts:
                traced.append(by_rel[rel].pop(0))
    saved = args.out / "trace.safetensors"
    if saved.is_file():  # a rerun: keep the trace already computed
        trace = mk.TraceResult.load(saved)
    else:
        trace = mk.causal_trace(model, traced, samples=args.samples, window=10, progress=False)
        trace.save(saved)
    trace.plot().write_html(args.out / "trace.html")
    note["trace"] = {
        "facts": len(traced), "samples": args.samples, "window": 10,
        "total_effect": trace.total_effect,
        "clean_prob": float(trace.clean_prob.mean()),
        "corrupt_prob": float(trace.corrupt_prob.mean()),
        "peak": {k: trace.peak(k) for k in trace.kinds},
        "mlp_last_subject_by_layer": trace.indirect_effect[1, :, 2].tolist(),
        "attn_last_by_layer": trace.indirect_effect[2, :, 5].tolist(),
        "hidden_last_subject_by_layer": trace.indirect_effect[0, :, 2].tolist(),
    }  # fmt: skip
    save("trace", t)
    return trace


def run_edits(args, model, known, layer, note, save):
    """ROME (corpus covariance and identity) and MEMIT on known facts with one-token objects."""
    requests = []
    for f in known:
        try:
            mk.editing.tokenize_fact(model, f)
        except MultiTokenAnswerError:
            continue
        requests.append(f)
    requests = requests[: args.edits]
    layers = [x for x in range(layer - 2, layer + 1) if x >= 0]  # MEMIT's range ends there
    note["edits"].update({"n": len(requests), "rome_layer": layer, "memit_layers": layers})
    config = RomeConfig(n_prefixes=args.prefixes, steps=args.steps)
    note["edits"]["config"] = dataclasses.asdict(config)

    t = time.time()
    C = key_covariances(model, layers, n_tokens=args.cov_tokens, progress=False)
    save("covariance", t)

    t = time.time()
    ident, corpus = [], []
    name = f"blocks.{layer}.mlp.W_out"
    W = model.blocks[layer].mlp.W_out.detach()
    for f in requests:
        e = rome(model, f, layer=layer, covariance="identity", config=config)
        ident.append(e)
        k, v = e.keys[f"L{layer}"], e.values[f"L{layer}"]  # the same k*, v* for any C
        corpus.append(WeightEdit({name: rome_update(W, k, v, C[layer])}, "ROME", e.requests))
    note["edits"]["rome_norm_identity"] = sum(e.norm() for e in ident) / len(ident)
    note["edits"]["rome_norm_corpus"] = sum(e.norm() for e in corpus) / len(corpus)
    save("rome", t)

    t = time.time()
    before = None
    for label, edits in (("rome_corpus", corpus), ("rome_identity", ident)):
        ev = evaluate_edits(model, requests, edits, fluency_tokens=args.fluency_tokens,
                            before=before, progress=False)  # fmt: skip
        before = ev.before
        note[label] = ev.summary()
        ev.to_dataframe().to_csv(args.out / f"{label}.csv", index=False)
        save(f"eval_{label}", t)

    # MEMIT's targets at its last layer (the ROME layer) are ROME's v* - W k*: not optimised again
    targets = torch.stack([e.values[f"L{layer}"] - W.T @ e.keys[f"L{layer}"] for e in ident])
    for label, cov in (("memit_corpus", C), ("memit_identity", "identity")):
        t = time.time()
        e = memit(model, requests, layers=layers, covariance=cov, config=config,
                  targets=targets, progress=False)  # fmt: skip
        e.save(args.out / f"{label}.safetensors")
        ev = evaluate_edits(model, requests, e, fluency_tokens=args.fluency_tokens,
                            before=before, progress=False)  # fmt: skip
        note[label] = ev.summary()
        note[label]["norm"] = e.norm()
        ev.to_dataframe().to_csv(args.out / f"{label}.csv", index=False)
        save(label, t)


if __name__ == "__main__":
    main()
