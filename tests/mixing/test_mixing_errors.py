"""Bad input: clear MechkitErrors with a hint, before any work."""

from __future__ import annotations

import pytest
import torch

import mechkit as mk
from tests.conftest import hook_count
from tests.mixing.models import tiny_model

TOKENS = torch.tensor([[1, 7, 3, 9]])


def test_unknown_method_suggests_the_close_name(toy):
    with pytest.raises(mk.InvalidArgumentError, match="Did you mean 'rollout'"):
        mk.context_mixing(toy, TOKENS, method="rolout")


def test_position_outside_the_prompt(toy):
    with pytest.raises(mk.ShapeError, match="inside every prompt"):
        mk.context_mixing(toy, TOKENS, positions=[4])
    mix = mk.context_mixing(toy, TOKENS)
    with pytest.raises(mk.ShapeError, match="inside the prompt"):
        mix.row(7)


def test_layer_out_of_range(toy):
    with pytest.raises(mk.InvalidArgumentError, match=r"layers in \[0, 2\)"):
        mk.context_mixing(toy, TOKENS, layers=[2])
    with pytest.raises(mk.InvalidArgumentError, match="kept layers"):
        mk.context_mixing(toy, TOKENS, layers=[0]).map(1)
    with pytest.raises(mk.InvalidArgumentError, match="keeps only"):
        mk.context_mixing(toy, TOKENS, method="flow", layers=[0])


def test_head_only_where_a_method_reads_one(toy):
    with pytest.raises(mk.InvalidArgumentError, match="head"):
        mk.context_mixing(toy, TOKENS, method="attention", head=4)
    with pytest.raises(mk.InvalidArgumentError, match="head=None"):
        mk.context_mixing(toy, TOKENS, method="alti", head=0)


def test_a_model_without_attention_weights_is_refused():
    with pytest.raises(mk.InvalidTypeError, match="HookedTransformer"):
        mk.context_mixing(torch.nn.Linear(2, 2), TOKENS)
    model = tiny_model(n_layers=1, attn_only=True)
    del model.hook_dict["blocks.0.attn.hook_pattern"]  # as if attention were fused away
    with pytest.raises(mk.UnsupportedModelError, match="fused or absent"):
        mk.context_mixing(model, TOKENS, method="alti")


def test_value_zeroing_refuses_when_its_hook_never_runs():
    # a model whose attention bypasses hook_v (as a fused kernel would) must not score zeros
    model = tiny_model(n_layers=1, attn_only=True)
    model.blocks[0].attn.hook_v = torch.nn.Identity()  # hook_dict still names the old point
    with pytest.raises(mk.UnsupportedModelError, match="never ran"):
        mk.context_mixing(model, TOKENS, method="value_zeroing")
    assert hook_count(model) == 0


def test_decompx_refuses_parallel_blocks():
    model = tiny_model(parallel_attn_mlp=True)
    with pytest.raises(mk.UnsupportedModelError, match="parallel_attn_mlp"):
        mk.context_mixing(model, TOKENS, method="decompx")


def test_answers_must_match_the_prompts(toy):
    with pytest.raises(mk.ShapeError, match="one per prompt"):
        mk.context_mixing(toy, TOKENS, method="alti_logit", answer=[1, 2])
    with pytest.raises(mk.InvalidArgumentError, match="answer ids"):
        mk.context_mixing(toy, TOKENS, method="alti_logit", answer=10_000)


def test_agreement_needs_methods(toy):
    with pytest.raises(mk.InvalidArgumentError, match="at least one method"):
        mk.mixing_agreement(toy, TOKENS, methods=[])
