"""DAS on IOI swept over sites and positions, on SmolLM2-135M (CPU): the figures of the note.

Run: ``OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/probing_ioi_das.py sweep [out.json]``
(whole-site patching), then ``... das LAYER POSITION K STEPS LR [SWAP] [out.json]`` (one DAS
run: its progress bar gives the cost of a step; the training curve, held-out IIA and the
illusion check go to the JSON).

The task (Wang et al. 2022): "When {IO} and {S} went to the {place}, {S} gave a {thing} to" ->
" {IO}", one template with single-token words so every prompt has the same token positions
(:func:`mechkit.probing.ioi_swap_pairs`). Three interchanges from the IOI literature:

- ``repeated``: the source repeats the other name; the high-level model's counterfactual
  answer is the base's S (the name that is no longer the non-repeated one);
- ``io``: the source has a new name C in the IO slot; the counterfactual answer is C;
- ``position``: the source has two new names and its indirect object in the other slot; the
  variable is the IO's position alone (no name is shared), the counterfactual answer the base's S.

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

N_PAIRS, N_DAS = 32, 200
LAYERS = [*range(0, 30, 2), 29]
OUT = "probing_ioi_das.json"
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


def check_shortcut(model) -> None:
    """Step 1's shortcut against mechkit's interchange on 8 pairs (the whole space at L12, S2)."""
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


def run_sweep(model, t0: float) -> None:
    check_shortcut(model)
    for swap in ("position", "repeated", "io"):
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


def run_das(model, layer: int, position: str, k: int, steps: int, lr: float, swap: str) -> None:
    """One DAS run (its progress bar on stderr gives the cost of a step), its curve and checks."""
    pairs = ioi_swap_pairs(model, N_DAS, swap=swap, seed=2)
    hook = f"blocks.{layer}.hook_resid_post"
    common = dict(hook_name=hook, position=position, k=k, lr=lr, batch_size=16,
                  test_fraction=0.3)  # fmt: skip
    t = time.time()
    result = das(model, pairs, steps=steps, progress=True, **common)
    report = result.illusion
    losses = result.losses
    window = max(steps // 20, 1)
    curve = [round(float(losses[i : i + window].mean()), 4) for i in range(0, steps, window)]
    figures["das"] = {"swap": swap, "layer": layer, "position": position, "k": result.k,
                      "steps": steps, "lr": lr, "batch_size": 16,
                      "n_train": result.metadata["n_train"], "n_test": result.metadata["n_test"],
                      "iia_train": result.iia_train, "iia_test": result.iia_test,
                      "iia_none": result.iia_none, "iia_full": result.iia_full,
                      "illusion": None if report is None else report.to_dict(),
                      "loss_curve_every": window, "loss_curve": curve,
                      "seconds": round(time.time() - t, 1)}  # fmt: skip
    print(figures["das"], flush=True)
    save()


def main() -> None:
    global OUT
    torch.manual_seed(0)
    t0 = time.time()
    model = mk.load_model("smollm2-135m", device="cpu")
    args = sys.argv[1:]
    if args and args[0] == "das":
        layer, position, k, steps, lr = (
            int(args[1]),
            args[2],
            int(args[3]),
            int(args[4]),
            float(args[5]),
        )
        swap = args[6] if len(args) > 6 else "position"
        OUT = args[7] if len(args) > 7 else f"probing_ioi_das_L{layer}_{position}_k{k}.json"
        run_das(model, layer, position, k, steps, lr, swap)
    else:
        OUT = args[1] if len(args) > 1 else OUT
        run_sweep(model, t0)
    figures["total_seconds"] = round(time.time() - t0, 1)
    save()


if __name__ == "__main__":
    main()
