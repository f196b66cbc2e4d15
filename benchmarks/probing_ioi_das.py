"""DAS on IOI swept over sites and positions, on SmolLM2-135M (CPU): the figures of the note.

Run: ``OMP_NUM_THREADS=1 PYTHONPATH=$PWD nice python benchmarks/probing_ioi_das.py [out.json]``.

The task (Wang et al. 2022): "When {IO} and {S} went to the {place}, {S} gave a {thing} to" ->
" {IO}", one template with single-token words so every prompt has the same token positions
(:func:`mechkit.probing.ioi_swap_pairs`). Two interchanges from the IOI literature:

- ``repeated``: the source repeats the other name; the high-level model's counterfactual
  answer is the base's S (the name that is no longer the non-repeated one);
- ``io``: the source has a new name C in the IO slot; the counterfactual answer is C.

1. whole-site patching (the residual stream after each of a set of layers, at IO, S1, S2 and
   END): IIA of the source's whole activation patched into the base, against the unchanged
   run's, to find where the name information is causal;
2. DAS (k = 1) at the causal sites (END at the first layer where patching it works, the name
   position mid-way) and at one site with no causal role, with the illusion check's verdict.

Patching in step 1 reruns only the layers after the site (``start_at_layer``); one site is
checked against :func:`mechkit.probing.interchange` (the whole space) first.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

import mechkit as mk
from mechkit.probing import das, interchange, ioi_swap_pairs

OUT = sys.argv[1] if len(sys.argv) > 1 else "probing_ioi_das.json"
N_PAIRS, N_DAS = 32, 40
LAYERS = [0, 6, 12, 18, 24, 29]
figures: dict = {"load": [], "settings": {"pairs": N_PAIRS, "layers": LAYERS}}


def save() -> None:
    figures["load"].append(os.getloadavg()[0])
    with open(OUT, "w") as f:
        json.dump(figures, f, indent=1)


def ids(model, words):
    return torch.tensor([[mk.tokenize_answer(model, w) for w in row] for row in words])


def pick(logits, choices):
    """The chosen answer's id among each row's choices."""
    return choices.gather(-1, logits.gather(-1, choices).argmax(-1, keepdim=True))[:, 0]


def sweep(model, pairs, swap: str, layers=LAYERS) -> dict:
    """IIA of whole-site patching at each layer's resid_post and each named position."""
    tokens = lambda texts: torch.tensor([model.to_tokens(t, prepend_bos=None)[0].tolist()  # noqa: E731
                                         for t in texts])  # fmt: skip
    base, source = tokens(pairs.base), tokens(pairs.source)
    choices, labels = ids(model, pairs.choices), ids(model, [[w] for w in pairs.labels])[:, 0]
    answers = ids(model, [[w] for w in pairs.answers])[:, 0]
    hooks = [f"blocks.{layer}.hook_resid_post" for layer in layers]
    with torch.no_grad():
        logits, base_cache = model.run_with_cache(base, names_filter=hooks)
        _, source_cache = model.run_with_cache(source, names_filter=hooks)
    chosen = pick(logits[:, -1], choices)
    out = {"task_accuracy": float((chosen == answers).double().mean()),
           "iia_none": float((chosen == labels).double().mean()), "sites": []}  # fmt: skip
    for layer, hook in zip(layers, hooks, strict=True):
        for name, pos in pairs.positions.items():
            edited = base_cache[hook].clone()
            edited[:, pos] = source_cache[hook][:, pos]
            if torch.equal(edited, base_cache[hook]):  # the runs agree up to here: no change
                out["sites"].append({"layer": layer, "position": name,
                                     "iia_full": out["iia_none"], "identical": True})  # fmt: skip
                continue
            with torch.no_grad():
                patched = model(edited, start_at_layer=layer + 1)[:, -1]
            iia = float((pick(patched, choices) == labels).double().mean())
            out["sites"].append({"layer": layer, "position": name, "iia_full": iia})
            print(swap, layer, name, round(iia, 3), flush=True)
    return out


def main() -> None:
    torch.manual_seed(0)
    t0 = time.time()
    model = mk.load_model("smollm2-135m", device="cpu")
    # step 1's shortcut against mechkit's interchange on 8 pairs (the whole space at L12, S2)
    check = ioi_swap_pairs(model, 8, swap="repeated", seed=1)
    ours = interchange(
        model,
        check.base,
        check.source,
        torch.eye(model.cfg.d_model),
        hook_name="blocks.12.hook_resid_post",
        position=check.positions["S2"],
    )
    toks = torch.tensor([model.to_tokens(t)[0].tolist() for t in check.base])
    src = torch.tensor([model.to_tokens(t)[0].tolist() for t in check.source])
    with torch.no_grad():
        _, bc = model.run_with_cache(toks, names_filter="blocks.12.hook_resid_post")
        _, sc = model.run_with_cache(src, names_filter="blocks.12.hook_resid_post")
        edited = bc["blocks.12.hook_resid_post"].clone()
        s2 = check.positions["S2"]
        edited[:, s2] = sc["blocks.12.hook_resid_post"][:, s2]
        shortcut = model(edited, start_at_layer=13)[:, -1]
    figures["shortcut_vs_interchange_max_abs_logit_diff"] = float((ours - shortcut).abs().max())
    save()
    for swap in ("repeated", "io"):
        pairs = ioi_swap_pairs(model, N_PAIRS, swap=swap)
        figures[swap] = sweep(model, pairs, swap)
        figures[swap]["example"] = {
            "base": pairs.base[0],
            "source": pairs.source[0],
            "label": pairs.labels[0],
            "positions": pairs.positions,
        }
        figures[swap]["sweep_seconds"] = round(time.time() - t0, 1)
        save()
    # DAS at the causal sites and one with no causal role
    for swap in ("repeated", "io"):
        info = figures[swap]
        none = info["iia_none"]
        causal = [s for s in info["sites"] if s["iia_full"] - none > 0.2]
        idle = [s for s in info["sites"] if s["iia_full"] - none <= 0.1]
        chosen = []
        end = [s for s in causal if s["position"] == "END"]
        if end:
            chosen.append(end[0])  # the first layer where END carries the answer
        name_pos = "S2" if swap == "repeated" else "IO"
        at_name = [s for s in causal if s["position"] == name_pos]
        if at_name:
            chosen.append(at_name[len(at_name) // 2])
        if swap == "io" and idle:
            mid = [s for s in idle if s["position"] in ("S1", "S2")] or idle
            chosen.append(mid[len(mid) // 2])
        pairs = ioi_swap_pairs(model, N_DAS, swap=swap, seed=2)
        info["das"] = []
        for site in chosen:
            t = time.time()
            result = das(model, pairs.base, pairs.source, pairs.labels,
                         hook_name=f"blocks.{site['layer']}.hook_resid_post",
                         position=pairs.positions[site["position"]], choices=pairs.choices,
                         k=1, steps=20, lr=5e-2, batch_size=8, test_fraction=0.5)  # fmt: skip
            report = result.illusion
            row = {"layer": site["layer"], "position": site["position"], "k": result.k,
                   "iia_train": result.iia_train, "iia_test": result.iia_test,
                   "iia_none": result.iia_none, "iia_full": result.iia_full,
                   "illusion": None if report is None else report.to_dict(),
                   "seconds": round(time.time() - t, 1)}  # fmt: skip
            info["das"].append(row)
            print(swap, row, flush=True)
            save()
    figures["total_seconds"] = round(time.time() - t0, 1)
    save()


if __name__ == "__main__":
    main()
