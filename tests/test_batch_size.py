"""Arguments every method checks the same way: ``batch_size`` (a positive integer or None,
through :func:`mechkit.errors.check_batch_size`) and the shape of what a metric returns (a
scalar or one value per prompt, through :func:`mechkit.metrics.check_metric_value`). Each case
was once a silent wrong answer or a hang."""

from __future__ import annotations

import threading

import pytest
import torch

import mechkit as mk
from mechkit.errors import InvalidArgumentError
from tests.conftest import per_prompt_metric as _metric


@pytest.fixture(scope="module")
def toy_graph(toy, toy_tokens):
    clean, corrupt = toy_tokens
    return mk.edge_attribution(toy, clean, corrupt, _metric, progress=False).top_edges(5)


def _batch_size_calls(toy, toy_tokens, toy_sae, toy_graph):
    clean, corrupt = toy_tokens
    texts = ["a b", "c d"]
    return {
        "activation_patch": lambda b: mk.activation_patch(
            toy, clean, corrupt, _metric, batch_size=b, progress=False
        ),
        "path_patch": lambda b: mk.path_patch(
            toy, clean, corrupt, _metric, batch_size=b, progress=False
        ),
        "attribution_patch": lambda b: mk.attribution_patch(
            toy, clean, corrupt, _metric, batch_size=b
        ),
        "edge_attribution": lambda b: mk.edge_attribution(
            toy, clean, corrupt, _metric, batch_size=b, progress=False
        ),
        "evaluate_circuit": lambda b: mk.evaluate_circuit(
            toy, toy_graph, clean, corrupt, _metric, batch_size=b
        ),
        "faithfulness_curve": lambda b: mk.faithfulness_curve(
            toy, toy_graph, clean, corrupt, _metric, sizes=[2], batch_size=b
        ),
        "feature_circuit": lambda b: mk.feature_circuit(
            toy, toy_sae, clean, corrupt, _metric, batch_size=b, progress=False
        ),
        "evaluate_feature_circuit": lambda b: mk.evaluate_feature_circuit(
            toy, toy_sae, ["r0.err"], clean, corrupt, _metric, batch_size=b
        ),
        "activations_at": lambda b: mk.steering.activations_at(toy, texts, layer=0, batch_size=b),
        "mean_difference_vector": lambda b: mk.steering.mean_difference_vector(
            toy, texts[:1], texts[1:], layer=0, batch_size=b
        ),
        "pca_vector": lambda b: mk.steering.pca_vector(
            toy, texts, texts[::-1], layer=0, batch_size=b
        ),
        "probe_vector": lambda b: mk.steering.probe_vector(
            toy, texts, texts[::-1], layer=0, batch_size=b
        ),
        "detect_heads": lambda b: mk.detect_heads(toy, "previous_token", batch_size=b),
        "collect_features": lambda b: mk.sae.collect_features(
            toy, toy_sae, clean, [0], batch_size=b, progress=False
        ),
        "evaluate_sae": lambda b: mk.evaluate_sae(
            toy, toy_sae, clean, batch_size=b, progress=False
        ),
        "compare_lenses": lambda b: mk.lens.compare_lenses(
            toy, clean, batch_size=b, progress=False
        ),
        "patch_latents": lambda b: mk.patch_latents(
            toy, toy_sae, clean, corrupt, _metric, batch_size=b, progress=False
        ),
        "attribute_latents": lambda b: mk.attribute_latents(
            toy, toy_sae, clean, corrupt, _metric, batch_size=b
        ),
        **_family_calls(toy),
    }


def _family_calls(toy):
    """The method families of issues 17-21: input attribution, context mixing, probing."""
    prompt = [[1, 2, 3, 4, 5]]
    attr = mk.attribute_inputs(toy, prompt, 6, method="occlusion", progress=False)
    data = mk.ProbingDataset([[1, 2, 3, 4]] * 4 + [[5, 6, 7, 8]] * 4, [-1] * 8, [0] * 4 + [1] * 4)
    base, source = [[i, 7, 9] for i in range(1, 9)], [[i, 7, 9] for i in range(21, 29)]
    return {
        "attribute_inputs": lambda b: mk.attribute_inputs(
            toy, prompt, 6, method="occlusion", batch_size=b, progress=False
        ),
        "comprehensiveness": lambda b: mk.comprehensiveness(toy, attr, batch_size=b),
        "sufficiency": lambda b: mk.sufficiency(toy, attr, batch_size=b),
        "aopc_curves": lambda b: mk.aopc_curves(toy, attr, n_random=1, batch_size=b),
        "sensitivity_n": lambda b: mk.sensitivity_n(toy, attr, [1], n_samples=2, batch_size=b),
        "compare_input_attributions": lambda b: mk.compare_input_attributions(
            toy, prompt, 6, methods=["occlusion"], n_random=1, batch_size=b, progress=False
        ),
        "context_mixing": lambda b: mk.context_mixing(
            toy, prompt, method="value_zeroing", batch_size=b, progress=False
        ),
        "train_probe": lambda b: mk.train_probe(toy, data, layers=[1], folds=2, batch_size=b),
        "fit_leace": lambda b: mk.fit_leace(toy, data, layer=1, batch_size=b),
        "das": lambda b: mk.das(
            toy, base, source, [9] * 8, hook_name="blocks.1.hook_resid_post", steps=1, batch_size=b
        ),
    }


BATCH_SIZE_FUNCTIONS = [
    "activation_patch",
    "path_patch",
    "attribution_patch",
    "edge_attribution",
    "evaluate_circuit",
    "faithfulness_curve",
    "feature_circuit",
    "evaluate_feature_circuit",
    "activations_at",
    "mean_difference_vector",
    "pca_vector",
    "probe_vector",
    "detect_heads",
    "collect_features",
    "evaluate_sae",
    "compare_lenses",
    "patch_latents",
    "attribute_latents",
    "attribute_inputs",
    "comprehensiveness",
    "sufficiency",
    "aopc_curves",
    "sensitivity_n",
    "compare_input_attributions",
    "context_mixing",
    "train_probe",
    "fit_leace",
    "das",
]


def _within(seconds: float, call):
    """Run ``call`` in a thread; fail (instead of hanging the suite) if it does not return."""
    outcome: dict[str, object] = {}

    def target():
        try:
            outcome["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():  # where every thread stands, for whoever debugs the hang
        import sys
        import traceback

        stacks = "\n".join(
            f"thread {ident}:\n" + "".join(traceback.format_stack(frame))
            for ident, frame in sys._current_frames().items()
        )
        pytest.fail(f"did not return within {seconds} s (hang); the threads:\n{stacks}")
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome.get("value")


@pytest.mark.parametrize("value", [0, -1, 1.5, True])
@pytest.mark.parametrize("name", BATCH_SIZE_FUNCTIONS)
def test_batch_size_zero_negative_float_or_bool_is_refused_everywhere(
    toy, toy_tokens, toy_sae, toy_graph, name, value
):
    call = _batch_size_calls(toy, toy_tokens, toy_sae, toy_graph)[name]
    with pytest.raises(InvalidArgumentError, match="batch_size"):
        _within(60, lambda: call(value))


def test_every_public_function_with_batch_size_is_in_the_batch_size_test():
    """The list above is the package's: a new function taking batch_size must join it."""
    import inspect

    have = set()
    for name in mk.__all__:
        obj = getattr(mk, name)
        if inspect.isfunction(obj) and "batch_size" in inspect.signature(obj).parameters:
            have.add(name)
    assert have - {"feature_browser", "train_tuned_lens"} <= set(BATCH_SIZE_FUNCTIONS), have


def test_edge_attribution_batch_size_minus_one_does_not_hang(toy, toy_tokens):
    clean, corrupt = toy_tokens
    with pytest.raises(InvalidArgumentError, match="positive integer"):
        _within(
            60,
            lambda: mk.edge_attribution(
                toy, clean, corrupt, _metric, batch_size=-1, progress=False
            ),
        )


def test_batch_size_zero_is_not_read_as_all_prompts(toy, toy_tokens):
    clean, corrupt = toy_tokens
    with pytest.raises(InvalidArgumentError):
        mk.attribution_patch(toy, clean, corrupt, _metric, batch_size=0)
    with pytest.raises(InvalidArgumentError):
        mk.edge_attribution(toy, clean, corrupt, _metric, batch_size=0, progress=False)


# ------------------------------------------------------------------------------- metric shape


@pytest.mark.parametrize(
    "method", ["activation_patch", "attribution_patch", "path_patch", "attribute_latents"]
)
def test_metric_vector_of_the_wrong_length_is_refused_by_every_method(
    toy, toy_tokens, toy_sae, method
):
    """A metric giving n + 1 values for n prompts was averaged as if per prompt."""
    clean, corrupt = toy_tokens

    def too_many(logits):
        return torch.cat([_metric(logits), _metric(logits)[:1]])

    calls = {
        "activation_patch": lambda: mk.activation_patch(
            toy, clean, corrupt, too_many, progress=False
        ),
        "attribution_patch": lambda: mk.attribution_patch(toy, clean, corrupt, too_many),
        "path_patch": lambda: mk.path_patch(toy, clean, corrupt, too_many, progress=False),
        "attribute_latents": lambda: mk.attribute_latents(toy, toy_sae, clean, corrupt, too_many),
    }
    with pytest.raises(
        mk.ShapeError, match=r"one value per prompt, shape \(3,\); got shape \(4,\)"
    ):
        calls[method]()
