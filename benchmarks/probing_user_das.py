"""DAS on a task defined in a few lines, on SmolLM2-135M (CPU): the pronoun of a name.

Run: ``OMP_NUM_THREADS=1 PYTHONPATH=$PWD nice python benchmarks/probing_user_das.py [out.json]``.

The high-level model: "After the meeting, {name} said that" -> " she" for a female name, " he"
for a male one; the variable is the name's gender. Interchange: the base's answer should follow
the source's name's gender. Whole-site patching at the name and the last token over layers
first (where is the gender causal?), then DAS (k = 1, ``STEPS`` Adam steps) at the first layer
where patching the name works and at the first where patching the last token works, with the
illusion check.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from probing_ioi_das import sweep  # noqa: E402

import mechkit as mk  # noqa: E402
from mechkit.probing import FEMALE_NAMES, MALE_NAMES, interchange_pairs  # noqa: E402

OUT = sys.argv[1] if len(sys.argv) > 1 else "probing_user_das.json"
LAYERS = [0, 6, 12, 18, 24]
STEPS, LR, BATCH = 80, 1e-2, 8
figures: dict = {"load": [], "layers": LAYERS, "steps": STEPS, "lr": LR, "batch_size": BATCH}


def save() -> None:
    figures["load"].append(os.getloadavg()[0])
    with open(OUT, "w") as f:
        json.dump(figures, f, indent=1)


def main() -> None:
    t0 = time.time()
    model = mk.load_model("smollm2-135m", device="cpu")
    one = lambda n: len(model.tokenizer.encode(" " + n, add_special_tokens=False)) == 1  # noqa: E731
    names = [(n, "f") for n in FEMALE_NAMES if one(n)] + [(n, "m") for n in MALE_NAMES if one(n)]

    def make(n: int, seed: int):
        pairs = interchange_pairs(
            names,
            lambda e: f"After the meeting, {e[0]} said that",  # render
            lambda e, gender: " she" if gender == "f" else " he",  # the high-level model
            lambda e: e[1],  # the variable: the name's gender
            n=n, seed=seed,
        )  # fmt: skip
        first = model.to_tokens(pairs.base[0])[0].tolist()
        name_at = first.index(
            model.tokenizer.encode(" " + pairs.base[0].split()[3], add_special_tokens=False)[0]
        )
        pairs.positions.update({"name": name_at, "END": -1})
        return pairs

    pairs = make(32, 0)
    figures["sweep"] = sweep(model, pairs, "pronoun", LAYERS)
    figures["example"] = {"base": pairs.base[0], "source": pairs.source[0],
                          "label": pairs.labels[0]}  # fmt: skip
    save()
    none = figures["sweep"]["iia_none"]
    causal = [s for s in figures["sweep"]["sites"] if s["iia_full"] - none > 0.2]
    chosen = [s for s in causal if s["position"] == "name"][:1]
    chosen += [s for s in causal if s["position"] == "END"][:1]
    train = make(64, 1)
    figures["das"] = []
    for site in chosen:
        t = time.time()
        result = mk.das(model, train, hook_name=f"blocks.{site['layer']}.hook_resid_post",
                        position=site["position"], k=1, steps=STEPS, lr=LR,
                        batch_size=BATCH, test_fraction=0.3, progress=True)  # fmt: skip
        report = result.illusion
        row = {"layer": site["layer"], "position": site["position"],
               "iia_train": result.iia_train, "iia_test": result.iia_test,
               "iia_none": result.iia_none, "iia_full": result.iia_full,
               "illusion": None if report is None else report.to_dict(),
               "loss_first_10": round(float(result.losses[:10].mean()), 4),
               "loss_last_10": round(float(result.losses[-10:].mean()), 4),
               "seconds": round(time.time() - t, 1)}  # fmt: skip
        figures["das"].append(row)
        print(row, flush=True)
        save()
    figures["total_seconds"] = round(time.time() - t0, 1)
    save()


if __name__ == "__main__":
    main()
