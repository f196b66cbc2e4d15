"""Steering hooks add exactly where asked, survive padding, and never outlive their scope."""

from __future__ import annotations

import pytest
import torch

import mechkit as mk
from tests.conftest import hook_count

PROMPTS = ["I think the movie was", "The food at the new restaurant on the corner was"]


@pytest.fixture(scope="module")
def vector(smollm2):
    generator = torch.Generator().manual_seed(0)
    return mk.SteeringVector(torch.randn(smollm2.cfg.d_model, generator=generator) * 3, layer=6)


@torch.no_grad()
def test_added_at_all_positions_equals_a_hand_written_hook(smollm2, vector):
    tokens = smollm2.to_tokens(PROMPTS[:1])
    with mk.steer(smollm2, vector, coefficient=2.0):
        steered = smollm2(tokens)
    hand = smollm2.run_with_hooks(
        tokens,
        fwd_hooks=[("blocks.6.hook_resid_pre", lambda act, hook: act + 2.0 * vector.vector)],
    )
    assert torch.allclose(steered, hand, atol=1e-5)
    assert hook_count(smollm2) == 0


@torch.no_grad()
def test_given_positions_and_per_position_vectors(smollm2, vector):
    tokens = smollm2.to_tokens(PROMPTS[:1])
    seen = {}

    def record(act, hook):
        seen["act"] = act.clone()

    with smollm2.hooks(fwd_hooks=[("blocks.6.hook_resid_pre", record)]):
        smollm2(tokens)
    base = seen["act"]
    # the recording hook runs after the steering hook on the same point: it sees the sum
    steering = mk.steering.Steering(vector, 1.5, positions=(1, 3))
    with (
        mk.steer(smollm2, steering),
        smollm2.hooks(fwd_hooks=[("blocks.6.hook_resid_pre", record)]),
    ):
        smollm2(tokens)
    delta = seen["act"] - base
    changed = delta.abs().sum(-1)[0] > 0
    assert changed.nonzero().flatten().tolist() == [1, 3]
    assert torch.allclose(delta[0, 1], 1.5 * vector.vector, atol=1e-4)
    rows = torch.randn(2, smollm2.cfg.d_model)
    per_position = mk.SteeringVector(rows, layer=6, method="actadd")
    with (
        mk.steer(smollm2, per_position, coefficient=2.0),
        smollm2.hooks(fwd_hooks=[("blocks.6.hook_resid_pre", record)]),
    ):
        smollm2(tokens)
    delta = seen["act"] - base
    assert torch.allclose(delta[0, :2], 2.0 * rows, atol=1e-4)
    assert delta[0, 2:].abs().max() == 0


@torch.no_grad()
def test_batched_left_padded_generation_equals_one_prompt_at_a_time(smollm2, vector):
    steering = [mk.steering.Steering(vector, 4.0, positions="prompt")]
    both = mk.generate(smollm2, PROMPTS, steering=steering, max_new_tokens=6, temperature=0)
    for i, prompt in enumerate(PROMPTS):
        alone = mk.generate(smollm2, [prompt], steering=steering, max_new_tokens=6, temperature=0)
        assert torch.equal(alone.tokens[0], both.tokens[i]), (prompt, alone.texts, both.texts)
    plain = mk.generate(smollm2, PROMPTS, max_new_tokens=6, temperature=0)
    assert plain.texts != both.texts  # the vector changes what is written
    assert hook_count(smollm2) == 0


@torch.no_grad()
def test_prompt_and_generated_positions_split_at_the_prompt_end(smollm2, vector):
    only_generated = mk.steering.Steering(vector, 8.0, positions="generated")
    plain = mk.generate(smollm2, PROMPTS[:1], max_new_tokens=1, temperature=0)
    first = mk.generate(
        smollm2, PROMPTS[:1], steering=only_generated, max_new_tokens=1, temperature=0
    )
    # the first new token is predicted from prompt positions only: unchanged
    assert torch.equal(plain.tokens, first.tokens)
    later = mk.generate(
        smollm2, PROMPTS[:1], steering=only_generated, max_new_tokens=8, temperature=0
    )
    unsteered = mk.generate(smollm2, PROMPTS[:1], max_new_tokens=8, temperature=0)
    assert not torch.equal(later.tokens, unsteered.tokens)


def test_no_hook_left_when_generation_raises(smollm2, vector, monkeypatch):
    calls = {"n": 0}
    real = torch.multinomial

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("sampling failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "multinomial", failing)
    with pytest.raises(RuntimeError, match="sampling failed"):
        mk.generate(smollm2, PROMPTS, steering=vector, max_new_tokens=5)
    assert hook_count(smollm2) == 0
    with pytest.raises(ValueError), mk.steer(smollm2, vector):
        raise ValueError("user code")
    assert hook_count(smollm2) == 0


@torch.no_grad()
def test_directional_ablation_removes_the_direction_everywhere(smollm2, vector):
    tokens = smollm2.to_tokens(PROMPTS)
    unit = vector.vector / vector.vector.norm()
    names = [f"blocks.{layer}.hook_resid_post" for layer in range(smollm2.cfg.n_layers)]
    with mk.steering.ablate_direction(smollm2, vector):
        _, cache = smollm2.run_with_cache(tokens, names_filter=lambda n: n in names)
    for name in names:
        act = cache[name]
        assert (act @ unit).abs().max() < 1e-3 * act.norm(dim=-1).max(), name
    assert hook_count(smollm2) == 0


def test_bad_steering_is_refused_before_running(smollm2, vector):
    with pytest.raises(mk.MechkitError, match="positions"):
        mk.steering.Steering(vector, 1.0, positions="everywhere")
    wrong_width = mk.SteeringVector(torch.ones(10), layer=3)
    with pytest.raises(mk.ShapeError, match="width"), mk.steer(smollm2, wrong_width):
        pass
    far = mk.SteeringVector(torch.ones(smollm2.cfg.d_model), layer=2)
    object.__setattr__(far, "layer", 99)
    with pytest.raises(mk.MechkitError), mk.steer(smollm2, far):
        pass
    assert hook_count(smollm2) == 0


@torch.no_grad()
def test_unsteered_greedy_generation_equals_transformer_lens_generate(smollm2):
    ours = mk.generate(smollm2, PROMPTS[1], max_new_tokens=8, temperature=0)
    theirs = smollm2.generate(
        PROMPTS[1], max_new_tokens=8, do_sample=False, verbose=False, return_type="tokens"
    )
    assert ours.tokens[0].tolist() == theirs[0, -8:].tolist()


@pytest.mark.parametrize("coefficient", [float("inf"), 1e38])
def test_generate_with_non_finite_logits_raises_instead_of_emitting_token_0(
    smollm2, vector, coefficient
):
    """Greedy decoding once took argmax of NaN logits: token 0, silently, at every step."""
    with pytest.raises(mk.NonFiniteError, match=r"step 0 .*steering coefficient"):
        mk.generate(
            smollm2,
            PROMPTS[:1],
            steering=mk.steering.Steering(vector, coefficient),
            max_new_tokens=2,
            temperature=0,
        )
    assert hook_count(smollm2) == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_new_tokens": -3}, "max_new_tokens"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 2.5}, "max_new_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": 0}, "top_k"),
    ],
)
def test_generate_bad_max_new_tokens_temperature_or_top_k_is_refused(smollm2, kwargs, match):
    with pytest.raises(mk.InvalidArgumentError, match=match):
        mk.generate(smollm2, PROMPTS[:1], **kwargs)


def test_generate_past_the_context_raises_context_length_error(smollm2, monkeypatch):
    """Generation past n_ctx once failed deep inside attention with a tensor-size error. A
    small n_ctx on the config stands for a short context (SmolLM2's own, 8192, would take
    thousands of steps to reach on the old code)."""
    monkeypatch.setattr(smollm2.cfg, "n_ctx", 16)
    n_prompt = len(smollm2.tokenizer.encode(PROMPTS[0], add_special_tokens=False))
    n_prompt += int(bool(smollm2.cfg.default_prepend_bos))
    assert n_prompt < 16
    with pytest.raises(mk.ContextLengthError, match="fewer new tokens") as err:
        mk.generate(smollm2, PROMPTS[:1], max_new_tokens=16 - n_prompt + 1, temperature=0)
    assert f"max_new_tokens <= {16 - n_prompt}" in str(err.value)
    assert len(mk.generate(smollm2, PROMPTS[:1], max_new_tokens=16 - n_prompt).tokens[0]) == (
        16 - n_prompt
    )
    with pytest.raises(mk.EmptyDatasetError):
        mk.generate(smollm2, [])


def _project_out(unit: torch.Tensor):
    def hook(act, hook):
        return act - (act @ unit)[..., None] * unit

    return hook


@torch.no_grad()
def test_ablate_direction_accepts_sites_as_layers(toy):
    """A Site in ``layers`` ablates at that residual site only, an int at every residual site of
    its layer (checked against hand-written TransformerLens hooks); the two mix."""
    tokens = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    direction = torch.randn(toy.cfg.d_model, generator=torch.Generator().manual_seed(0))
    unit = direction / direction.norm()
    cases = {
        (mk.Site("resid_post", layer=1),): ["blocks.1.hook_resid_post"],
        (mk.Site("resid_pre", layer=-1), 0): [
            "blocks.1.hook_resid_pre",
            "blocks.0.hook_resid_pre",
            "blocks.0.hook_resid_post",
        ],
    }
    for layers, hook_names in cases.items():
        with mk.steering.ablate_direction(toy, direction, layers=list(layers)):
            ablated = toy(tokens)
        hand = toy.run_with_hooks(tokens, fwd_hooks=[(n, _project_out(unit)) for n in hook_names])
        torch.testing.assert_close(ablated, hand)
    with mk.steering.ablate_direction(toy, direction, layers=mk.Site("resid_pre", layer=1)):
        one = toy(tokens)
    hand = toy.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_resid_pre", _project_out(unit))])
    torch.testing.assert_close(one, hand)
    assert hook_count(toy) == 0


def test_ablate_direction_refuses_layers_the_model_lacks(toy):
    direction = torch.ones(toy.cfg.d_model)
    for layers, error in [
        ([5], mk.InvalidSiteError),  # was silently ignored: nothing ablated
        ([mk.Site("resid_post", layer=5)], mk.InvalidSiteError),
        ([mk.Site("attn_out", layer=0)], mk.InvalidSiteError),  # not the residual stream
        ([mk.Site("resid_pre", layer=0, position=1)], mk.InvalidSiteError),
        (["resid_pre"], mk.InvalidTypeError),
    ]:
        with pytest.raises(error), mk.steering.ablate_direction(toy, direction, layers=layers):
            pass
    assert hook_count(toy) == 0
