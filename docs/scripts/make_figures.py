"""Write the figures of the technique pages as plotly JSON into ``docs/figures/``.

Each figure is the ``.plot()`` of a mechkit result, computed here with the public API on the
embedded SmolLM2 (or the toy ``attn-only-2l``), so a page shows what its example returns. The
build (``docs/hooks.py``) inlines a figure where a page says ``{{ figure("NAME") }}`` and ships
plotly.js from the installed plotly package: nothing is fetched. The JSON files are committed,
so ``make docs`` does not run models; rerun this script (12 minutes measured on 2 busy CPU
cores, most of it activation, path and attribution patching) after changing a method or its plot:

    python docs/scripts/make_figures.py            # every figure
    python docs/scripts/make_figures.py dla steering   # some
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import mechkit as mk
from mechkit.demo import IOI_PAIRS, POSITIVE_WORDS, STEERING_PAIRS, STEERING_PROMPTS

OUT = Path(__file__).resolve().parents[1] / "figures"
_models: dict[str, Any] = {}


def _model(name: str = "smollm2-135m") -> Any:
    if name not in _models:
        _models[name] = mk.load_model(name, device="cpu")
    return _models[name]


def _pairs() -> mk.PromptPairs:
    clean, corrupt, answers, wrongs = (list(x) for x in zip(*IOI_PAIRS, strict=True))
    return mk.PromptPairs.from_lists(_model(), clean, corrupt, answers, wrongs)


def logit_lens() -> Any:
    clean, _, answer, _ = IOI_PAIRS[0]
    return mk.logit_lens(_model(), clean, targets=[answer]).plot()


def dla() -> Any:
    return mk.direct_logit_attribution(_model(), _pairs()).plot()


def heads() -> Any:
    return mk.detect_heads(_model(), "induction").plot()


def activation_patching() -> Any:
    return mk.activation_patch(_model(), _pairs(), site="resid_pre", progress=False).normalized()


def path_patching() -> Any:
    # every head as a sender along its direct path to the logits (noising, Wang et al.)
    return mk.path_patch(_model(), _pairs(), senders="heads", progress=False).normalized()


def attribution() -> Any:
    return mk.compare_attribution(_model(), _pairs(), site="z", progress=False)


def edge_attribution() -> Any:
    graph = mk.edge_attribution(_model(), _pairs(), method="eap-ig-inputs", steps=5, progress=False)
    return graph.greedy(80).prune()


def sae() -> Any:
    model = _model()
    root = Path(mk.__file__).parent / "sae" / "trained" / "smollm2-135m-res12-topk"
    tokens = mk.corpus_tokens(model, seq_len=64, split="test", max_sequences=4)
    return mk.evaluate_sae(model, mk.load_sae(root), tokens, progress=False)


def steering() -> Any:
    model = _model()
    positives, negatives = (list(x) for x in zip(*STEERING_PAIRS, strict=True))
    vectors = {
        layer: mk.mean_difference_vector(model, positives, negatives, layer=layer, position="mean")
        for layer in (4, 8)
    }
    return mk.steering_sweep(
        model,
        vectors,
        layers=list(vectors),
        coefficients=[2.0, 4.0, 8.0],
        effect=mk.WordShare(
            STEERING_PROMPTS, POSITIVE_WORDS, samples_per_prompt=1, max_new_tokens=8
        ),
        cost_tokens=mk.corpus_tokens(model, seq_len=32, split="test", max_sequences=2),
        progress=False,
    )


def sweep() -> Any:
    from mechkit.patching.sweep import config_from_dict, run_sweep

    config = config_from_dict(
        {
            "model": "attn-only-2l",
            "prompts": {"generator": "repeated_tokens", "n": 8, "length": 6},
            "sweeps": [{"site": "z", "positions": "all"}],
            "device": "cpu",
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        run = run_sweep(config, out=tmp, progress=False)
        return next(iter(run.results.values())).normalized()


def input_attribution() -> Any:
    # integrated gradients (the defaults) of the predicted next token, the page's prompts
    prompts = ["The Eiffel Tower is in the city of", "The capital of France is"]
    return mk.attribute_inputs(_model(), prompts, progress=False)


FIGURES: dict[str, Callable[[], Any]] = {
    f.__name__: f
    for f in (
        logit_lens,
        dla,
        heads,
        activation_patching,
        path_patching,
        attribution,
        edge_attribution,
        sae,
        steering,
        sweep,
        input_attribution,
    )
}


def main(names: list[str]) -> None:
    torch.manual_seed(0)
    OUT.mkdir(parents=True, exist_ok=True)
    for name in names or list(FIGURES):
        start = time.perf_counter()
        needs_grad = name in ("attribution", "edge_attribution")
        with contextlib.nullcontext() if needs_grad else torch.no_grad():
            result = FIGURES[name]()
        fig = result if hasattr(result, "to_json") else result.plot()
        (OUT / f"{name}.json").write_text(fig.to_json(), encoding="utf-8")
        print(f"{name}: {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
