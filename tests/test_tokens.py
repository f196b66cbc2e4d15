"""The one place prompts given to a method are resolved (:func:`mechkit.tokens.token_batch`,
:meth:`PromptPairs.check_fits`): every method refuses an empty list of prompts, token ids outside
the vocabulary and prompts longer than the model's context the same way. Each case was once a
silent wrong answer (a (1, 0) batch) or a raw torch error."""

from __future__ import annotations

import pytest
import torch

import mechkit as mk
from mechkit.errors import ContextLengthError, EmptyDatasetError, InvalidTokenError
from tests.conftest import per_prompt_metric as _metric


def _empty_calls(toy, toy_sae):
    none = torch.zeros(0, 6, dtype=torch.long)
    return {
        "activation_patch []": lambda: mk.activation_patch(toy, [], [], _metric, progress=False),
        "activation_patch (0, pos)": lambda: mk.activation_patch(
            toy, none, none, _metric, progress=False
        ),
        "attribution_patch": lambda: mk.attribution_patch(toy, [], [], _metric),
        "path_patch": lambda: mk.path_patch(toy, [], [], _metric, progress=False),
        "edge_attribution": lambda: mk.edge_attribution(toy, [], [], _metric, progress=False),
        "feature_circuit": lambda: mk.feature_circuit(
            toy, toy_sae, [], [], _metric, progress=False
        ),
        "attribute_latents": lambda: mk.attribute_latents(toy, toy_sae, [], [], _metric),
        "patch_latents": lambda: mk.patch_latents(toy, toy_sae, [], [], _metric, progress=False),
        "logit_lens": lambda: mk.logit_lens(toy, []),
        "decompose_resid": lambda: mk.decompose_resid(toy, []),
    }


EMPTY_FUNCTIONS = [
    "activation_patch []",
    "activation_patch (0, pos)",
    "attribution_patch",
    "path_patch",
    "edge_attribution",
    "feature_circuit",
    "attribute_latents",
    "patch_latents",
    "logit_lens",
    "decompose_resid",
]


@pytest.mark.parametrize("name", EMPTY_FUNCTIONS)
def test_empty_prompt_list_is_refused_not_run_as_a_1_by_0_batch(toy, toy_sae, name):
    with pytest.raises(EmptyDatasetError, match="at least one prompt"):
        _empty_calls(toy, toy_sae)[name]()


# ------------------------------------------------------------------------------- token ids


@pytest.mark.parametrize("bad", [-1, 500, 10_000])
def test_token_ids_outside_the_vocabulary_raise_invalid_token_error(toy, toy_tokens, bad):
    clean, corrupt = toy_tokens
    assert toy.cfg.d_vocab == 500  # the ids above straddle the toy's vocabulary
    broken = clean.clone()
    broken[1, 3] = bad
    with pytest.raises(InvalidTokenError, match=rf"got {bad} at index \(1, 3\)"):
        mk.activation_patch(toy, broken, corrupt, _metric, progress=False)
    with pytest.raises(InvalidTokenError):
        mk.edge_attribution(toy, clean, broken, _metric, progress=False)
    with pytest.raises(InvalidTokenError):
        mk.logit_lens(toy, broken)


def test_pairs_from_tokens_with_answer_ids_outside_the_vocabulary_raise(toy, toy_tokens):
    clean, corrupt = toy_tokens
    pairs = mk.PromptPairs.from_tokens(clean, corrupt, [3, 4, 500], [8, 8, 8])
    with pytest.raises(InvalidTokenError, match="answer ids"):
        mk.activation_patch(toy, pairs, progress=False)
    with pytest.raises(InvalidTokenError, match="answer ids"):
        mk.edge_attribution(toy, pairs, progress=False)


def test_logit_diff_with_an_answer_id_outside_the_vocabulary_raises(toy, toy_tokens):
    clean, _ = toy_tokens
    metric = mk.LogitDiff(torch.tensor([3, -2, 4]), torch.tensor([8, 8, 8]))
    with pytest.raises(InvalidTokenError, match="got -2 for prompt 1"):
        metric(toy(clean))


def test_float_token_tensor_is_refused_not_truncated(toy, toy_tokens):
    clean, corrupt = toy_tokens
    with pytest.raises(InvalidTokenError, match="integer token ids"):
        mk.activation_patch(toy, clean + 0.5, corrupt, _metric, progress=False)


# ------------------------------------------------------------------------------- context length


def test_token_prompts_longer_than_n_ctx_raise_context_length_error(toy):
    n_ctx = toy.cfg.n_ctx
    long = torch.ones(2, n_ctx + 1, dtype=torch.long)
    with pytest.raises(ContextLengthError, match=f"n_ctx={n_ctx}"):
        mk.activation_patch(toy, long, long.clone(), _metric, progress=False)
    with pytest.raises(ContextLengthError):
        mk.edge_attribution(toy, long, long.clone(), _metric, progress=False)
    pairs = mk.PromptPairs.from_tokens(long, long.clone(), [1, 1], [2, 2])
    with pytest.raises(ContextLengthError, match=f"{n_ctx + 1} tokens"):
        mk.path_patch(toy, pairs, progress=False)
    # exactly n_ctx tokens is fine
    ok = torch.ones(1, n_ctx, dtype=torch.long)
    assert mk.logit_lens(toy, ok).layer_labels


def test_predict_next_tokens_refuses_a_prompt_longer_than_n_ctx(smollm2, monkeypatch):
    """A context of 8 stands in for SmolLM2's 8192 (the check reads model.cfg.n_ctx)."""
    from mechkit.predictions import predict_next_tokens

    monkeypatch.setattr(smollm2.cfg, "n_ctx", 8)
    with pytest.raises(ContextLengthError, match="n_ctx=8"):
        predict_next_tokens(smollm2, ["one two three four five six seven eight nine ten"])
    assert predict_next_tokens(smollm2, ["one two"]).tokens
