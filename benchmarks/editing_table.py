"""The editing table of the note on SmolLM2-135M (CPU): ROME with the corpus covariance and with
C = I side by side, and MEMIT with all edits at once over a layer range (corpus and identity),
evaluated as CounterFact (efficacy, paraphrase, neighbourhood, fluency) before and after.

Requests: the built-in facts SmolLM2 knows at top-1 whose old and new objects are one token; the
new object is the next object of the same relation (CounterFact style). ROME optimises each
``v*`` once (``C`` does not enter it); the corpus edit uses the same ``k*``, ``v*`` with ``C``
from :mod:`mechkit.corpus`. MEMIT's targets at its last layer (ROME's layer) are ROME's ``v* - W
k*``. Each ROME edit is scored as it is made; ``--rome-until`` stops making them at a time, and
MEMIT then edits the facts done. Writes ``OUT/editing_table.json`` after each stage (so a run cut
short keeps what finished) and one CSV per method.

    OMP_NUM_THREADS=1 nice python benchmarks/editing_table.py OUT [--edits 20] [--layer 4]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import torch

import mechkit as mk
from mechkit.editing import RomeConfig, WeightEdit, evaluate_edits, known_facts, memit, rome
from mechkit.editing.covariance import key_covariances
from mechkit.editing.evaluation import EditEvaluation
from mechkit.editing.rome import rome_update
from mechkit.errors import MultiTokenAnswerError


def cat(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One fact's scores after another, joined."""
    return {m: torch.cat([p[m] for p in parts]) for m in parts[0]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--edits", type=int, default=20)
    parser.add_argument("--layer", type=int, default=4, help="ROME's layer, MEMIT's last")
    parser.add_argument("--memit-layers", type=int, default=3, help="MEMIT's range ends at --layer")
    parser.add_argument("--cov-tokens", type=int, default=20096)
    parser.add_argument("--fluency-tokens", type=int, default=10)
    parser.add_argument("--prefixes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rome-until", default=None, help='UTC "HH:MM": no new ROME edit after')
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    note: dict = {"threads": torch.get_num_threads(), "load_start": os.getloadavg()}
    path = args.out / "editing_table.json"

    def save(stage: str, start: float, cpu: float) -> None:
        note.setdefault("seconds", {})[stage] = {
            "wall": round(time.time() - start, 1), "cpu": round(time.process_time() - cpu, 1),
            "load": os.getloadavg()[0],
        }  # fmt: skip
        path.write_text(json.dumps(note, indent=1))
        print(stage, note["seconds"][stage], flush=True)

    t, c = time.time(), time.process_time()
    model = mk.load_model("smollm2-135m")
    requests = []
    for f in known_facts(model):
        try:
            mk.editing.tokenize_fact(model, f)  # the old and the new object: one token each
        except MultiTokenAnswerError:
            continue
        requests.append(f)
    note["known_one_token"] = len(requests)
    requests = requests[: args.edits]
    layer = args.layer
    layers = list(range(max(0, layer - args.memit_layers + 1), layer + 1))
    config = RomeConfig(n_prefixes=args.prefixes, steps=args.steps)
    note.update(
        n_edits=len(requests), rome_layer=layer, memit_layers=layers,
        config=dataclasses.asdict(config), cov_tokens=args.cov_tokens,
        fluency_tokens=args.fluency_tokens,
        requests=[f"{f.text}:{f.target} ->{f.new_target}" for f in requests],
    )  # fmt: skip
    C = key_covariances(model, layers, n_tokens=args.cov_tokens, progress=False)
    save("setup", t, c)

    # ROME, one fact at a time (C = I and the corpus C share k*, v*), each scored at once so a
    # run cut short (--rome-until, UTC "HH:MM") keeps every fact it finished
    name = f"blocks.{layer}.mlp.W_out"
    W = model.blocks[layer].mlp.W_out.detach()
    ident, per_edit, done = [], [], []
    parts: dict[str, list] = {"before": [], "rome_corpus": [], "rome_identity": []}
    for f in requests:
        if args.rome_until and time.strftime("%H:%M", time.gmtime()) >= args.rome_until:
            break
        t, c = time.time(), time.process_time()
        e = rome(model, f, layer=layer, covariance="identity", config=config)
        per_edit.append((time.time() - t, time.process_time() - c, e.record["losses"]["steps"]))
        k, v = e.keys[f"L{layer}"], e.values[f"L{layer}"]
        corpus = WeightEdit({name: rome_update(W, k, v, C[layer])}, "ROME", e.requests)
        ev = evaluate_edits(model, [f], [corpus], fluency_tokens=args.fluency_tokens,
                            progress=False)  # fmt: skip
        ev2 = evaluate_edits(model, [f], [e], fluency_tokens=args.fluency_tokens,
                             before=ev.before, progress=False)  # fmt: skip
        ident.append(e)
        done.append(f)
        parts["before"].append(ev.before)
        parts["rome_corpus"].append(ev.after)
        parts["rome_identity"].append(ev2.after)
        note["rome_norm"] = {"identity": sum(x.norm() for x in ident) / len(ident), "W_out":
                             float(W.norm())}  # fmt: skip
        note.setdefault("rome_norm_corpus", []).append(corpus.norm())
        note["rome_per_edit"] = {
            "wall_mean": sum(p[0] for p in per_edit) / len(per_edit),
            "cpu_mean": sum(p[1] for p in per_edit) / len(per_edit),
            "steps_mean": sum(p[2] for p in per_edit) / len(per_edit),
            "final_nll_mean": sum(x.record["losses"]["nll"] for x in ident) / len(ident),
        }
        before = cat(parts["before"])
        for label in ("rome_corpus", "rome_identity"):
            table = EditEvaluation(tuple(note["requests"][: len(done)]), before,
                                   cat(parts[label]), "ROME")  # fmt: skip
            note[label] = table.summary()
            note[label]["n"] = len(done)
            table.to_dataframe().to_csv(args.out / f"{label}.csv", index=False)
        save(f"rome_{len(done)}", t, c)
    requests = done

    targets = torch.stack([e.values[f"L{layer}"] - W.T @ e.keys[f"L{layer}"] for e in ident])
    for label, cov in (("memit_corpus", C), ("memit_identity", "identity")):
        t, c = time.time(), time.process_time()
        e = memit(model, requests, layers=layers, covariance=cov, config=config,
                  targets=targets, progress=False)  # fmt: skip
        ev = evaluate_edits(model, requests, e, fluency_tokens=args.fluency_tokens,
                            before=before, progress=False)  # fmt: skip
        note[label] = ev.summary()
        note[label]["n"] = len(requests)
        note[label]["norm"] = e.norm()
        note[label]["lambda"] = e.record["lambda"]
        ev.to_dataframe().to_csv(args.out / f"{label}.csv", index=False)
        save(label, t, c)
    note["load_end"] = os.getloadavg()
    path.write_text(json.dumps(note, indent=1))


if __name__ == "__main__":
    main()
