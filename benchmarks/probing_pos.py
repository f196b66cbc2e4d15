"""Part of speech of words from Python's documentation, probed by layer on SmolLM2-135M (CPU).

Run: ``OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/probing_pos.py [out.json]`` (needs
``pip install 'mechkit[pos]'``: spaCy's English tagger labels the words).

Probe accuracy, control-task accuracy (a random label per word type, Hewitt & Liang 2019) and
selectivity at every third layer, whole word types held out (``split="type"``), with a fixed L2
weight (no cross-validation grid: the CPU is shared). Words at the first token are left out:
SmolLM2 prepends no BOS, so the first token is the attention sink, whose activations are
hundreds of times larger than the others' and swamp the probes' standardisation.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter

import torch

import mechkit as mk
from mechkit.probing import part_of_speech

OUT = sys.argv[1] if len(sys.argv) > 1 else "probing_pos.json"
N_SENTENCES = 300
LAYERS = [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 29]
L2 = 1e-2
figures: dict = {"load": [], "layers": LAYERS, "l2": L2}


def save() -> None:
    figures["load"].append(os.getloadavg()[0])
    with open(OUT, "w") as f:
        json.dump(figures, f, indent=1)


def main() -> None:
    t0 = time.time()
    torch.manual_seed(0)
    model = mk.load_model("smollm2-135m", device="cpu")
    data = part_of_speech(model, N_SENTENCES)
    first = sum(p == 0 for p in data.positions)
    data = data[[i for i, p in enumerate(data.positions) if p != 0]]  # not the sink
    figures["dataset"] = {"examples": len(data), "left_out_first_token": first,
                          "sentences": len(set(data.texts)),
                          "word_types": len(set(data.types)),
                          "classes": dict(sorted(Counter(data.labels).items())),
                          "seconds": round(time.time() - t0, 1)}  # fmt: skip
    save()
    result = mk.train_probe(model, data, layers=LAYERS, l2=L2, split="type")
    table = result.to_dataframe().round(3)
    figures["probe"] = {"majority": result.majority, "table": table.to_dict(orient="list"),
                        "seconds": round(time.time() - t0, 1)}  # fmt: skip
    print(table.to_string(), flush=True)
    figures["total_seconds"] = round(time.time() - t0, 1)
    save()


if __name__ == "__main__":
    main()
