"""Steering-vector builders against computations written out here with run_with_cache and numpy,
and the SteeringVector algebra against plain tensor arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mechkit as mk
from mechkit.steering.vectors import (
    SteeringVector,
    actadd_vector,
    activations_at,
    mean_difference_vector,
    pca_vector,
    probe_vector,
)
from tests.conftest import DAMAGES, damage, hook_count

POSITIVES = [
    "I absolutely love this wonderful film",
    "What a joy",
    "The meal was delicious and the staff were kind",
    "Great fun",
]
NEGATIVES = [
    "I hate it",
    "What a dreadful, miserable waste of an evening",
    "The meal was awful",
    "Terrible service and cold food everywhere",
]


def _tokens(model, text: str, prepend_bos: bool = False) -> list[int]:
    ids = model.tokenizer.encode(text, add_special_tokens=False)
    return [model.tokenizer.bos_token_id, *ids] if prepend_bos else ids


@torch.no_grad()
def _by_hand(model, prompts, hook: str, position) -> np.ndarray:
    """One unbatched run_with_cache per prompt; the row at ``position`` (or the mean)."""
    rows = []
    for prompt in prompts:
        _, cache = model.run_with_cache(torch.tensor([_tokens(model, prompt)]))
        h = cache[hook][0].numpy().astype(np.float64)  # (pos, d_model)
        rows.append(h.mean(0) if position == "mean" else h[position])
    return np.stack(rows)


@pytest.mark.parametrize(
    ("positive", "negative", "prepend_bos"),
    [("I love you so much", "I hate", False), ("Love", "Hatred is all I feel", True)],
)
@torch.no_grad()
def test_actadd_aligns_positions_with_space_padding_at_the_end(
    smollm2, positive, negative, prepend_bos
):
    vec = actadd_vector(smollm2, positive, negative, layer=6, prepend_bos=prepend_bos)
    assert hook_count(smollm2) == 0
    space = smollm2.tokenizer.encode(" ", add_special_tokens=False)
    assert len(space) == 1 and smollm2.tokenizer.decode(space) == " "

    pos_ids, neg_ids = (
        _tokens(smollm2, positive, prepend_bos),
        _tokens(smollm2, negative, prepend_bos),
    )
    width = max(len(pos_ids), len(neg_ids))
    assert min(len(pos_ids), len(neg_ids)) < width  # the case really pads
    padded = [ids + space * (width - len(ids)) for ids in (pos_ids, neg_ids)]
    assert vec.metadata["positive_tokens"] == padded[0]
    assert vec.metadata["negative_tokens"] == padded[1]
    assert vec.metadata["pad_token_id"] == space[0]
    assert (vec.metadata["positive"], vec.metadata["negative"]) == (positive, negative)

    acts = []
    for ids in padded:  # each prompt on its own, no batching
        _, cache = smollm2.run_with_cache(torch.tensor([ids]))
        acts.append(cache["blocks.6.hook_resid_pre"][0])
    expected = acts[0] - acts[1]  # (pos, d_model)
    assert vec.vector.shape == (width, smollm2.cfg.d_model) and vec.per_position
    # batched vs unbatched float32 runs differ by ~1e-4 where the residual has entries ~1e2
    assert (vec.vector - expected).abs().max() < 1e-3
    assert (vec.method, vec.layer, vec.site) == ("actadd", 6, "resid_pre")
    assert vec.hook_name == "blocks.6.hook_resid_pre"
    if prepend_bos:  # identical BOS rows cancel exactly
        assert vec.vector[0].abs().max() < 1e-5
    # padding at the front instead would not match: the alignment is really tested
    front = [space * (width - len(ids)) + ids for ids in (pos_ids, neg_ids)]
    _, c0 = smollm2.run_with_cache(torch.tensor([front[0]]))
    _, c1 = smollm2.run_with_cache(torch.tensor([front[1]]))
    wrong = c0["blocks.6.hook_resid_pre"][0] - c1["blocks.6.hook_resid_pre"][0]
    assert (vec.vector - wrong).abs().max() > 1e-1


@pytest.fixture(scope="module")
def differences(smollm2) -> np.ndarray:
    """(pairs, d_model) differences at resid_pre of layer 8, last token, computed by hand."""
    hook = "blocks.8.hook_resid_pre"
    return _by_hand(smollm2, POSITIVES, hook, -1) - _by_hand(smollm2, NEGATIVES, hook, -1)


def test_mean_difference_matches_numpy_across_unequal_lengths_and_batches(smollm2, differences):
    vec = mean_difference_vector(smollm2, POSITIVES, NEGATIVES, layer=8, batch_size=3)
    assert hook_count(smollm2) == 0
    assert vec.vector.shape == (smollm2.cfg.d_model,) and vec.vector.dtype == torch.float32
    assert np.abs(vec.vector.numpy() - differences.mean(0)).max() < 1e-4
    assert vec.metadata["positives"] == POSITIVES and vec.metadata["n_pairs"] == 4
    assert (vec.method, vec.layer) == ("mean_difference", 8)


@pytest.mark.parametrize("position", [0, 1, -2, "mean"])
def test_positions_index_each_prompts_real_tokens(smollm2, position):
    hook = "blocks.3.hook_resid_post"
    expected = _by_hand(smollm2, POSITIVES, hook, position)
    got = activations_at(
        smollm2, POSITIVES, layer=3, site="resid_post", position=position, batch_size=4
    )
    assert got.shape == (4, smollm2.cfg.d_model)
    # float32 rounding relative to the values: the first token's residual reaches the thousands
    # (SmolLM2's attention sink), where one rounding step is 5e-4
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-4)
    assert hook_count(smollm2) == 0


def test_pca_matches_numpy_svd_of_centred_differences(smollm2, differences):
    vec = pca_vector(smollm2, POSITIVES, NEGATIVES, layer=-22)  # layer 8, counted from the end
    assert vec.layer == 8
    centred = differences - differences.mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    first = vt[0] * np.sign(vt[0] @ differences.mean(0))  # sign along the mean difference
    assert abs(vec.norm - 1.0) < 1e-5
    assert np.abs(vec.vector.numpy() - first).max() < 1e-4
    assert float(vec.vector.double().numpy() @ differences.mean(0)) > 0
    ratio = s[0] ** 2 / (s**2).sum()
    assert abs(vec.metadata["explained_variance_ratio"] - ratio) < 1e-4


def test_probe_separates_two_prompt_families(smollm2):
    recipes = [
        "Preheat the oven and whisk the eggs with sugar",
        "Chop the onions and fry them in butter",
        "Simmer the tomato sauce for twenty minutes",
        "Knead the dough and let it rise overnight",
        "Season the soup with salt and fresh basil",
        "Grill the fish and squeeze lemon on top",
    ]
    code = [
        "def main(args): return parse(args)",
        "for i in range(10): print(i)",
        "import numpy as np; x = np.zeros(3)",
        "class Parser(object): pass",
        "if x is None: raise ValueError('x')",
        "while True: queue.get().run()",
    ]
    vec = probe_vector(smollm2, recipes, code, layer=10, steps=200)
    assert hook_count(smollm2) == 0
    assert vec.metadata["train_accuracy"] == 1.0 and vec.metadata["standardized"] is True
    assert abs(vec.norm - 1.0) < 1e-5 and vec.method == "probe"
    acts = activations_at(smollm2, recipes + code, layer=10)
    mean_diff = acts[:6].mean(0) - acts[6:].mean(0)
    assert torch.nn.functional.cosine_similarity(vec.vector, mean_diff, dim=0) > 0.1
    scores = acts @ vec.vector  # the probe's direction alone, without its bias, also separates
    assert scores[:6].min() > scores[6:].max()
    again = probe_vector(smollm2, recipes, code, layer=10, steps=200)
    assert torch.equal(vec.vector, again.vector)  # deterministic under the same seed


def test_save_load_round_trip(smollm2, tmp_path):
    vec = actadd_vector(smollm2, "Love", "Hate", layer=2, site="resid_mid")
    path = tmp_path / "sub" / "love.safetensors"
    vec.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["love.safetensors"]  # no temp file left
    back = SteeringVector.load(path)
    assert torch.equal(back.vector, vec.vector)
    assert (back.layer, back.site, back.method) == (2, "resid_mid", "actadd")
    assert back.metadata == vec.metadata
    assert back.hook_name == "blocks.2.hook_resid_mid"


def test_load_rejects_a_file_that_is_not_a_steering_vector(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"weights": torch.zeros(3)}, str(path))
    with pytest.raises(mk.FileFormatError, match="vector"):
        SteeringVector.load(path)


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_steering_vector_file_raises_file_format_error(how, tmp_path):
    path = tmp_path / "v.safetensors"
    SteeringVector(torch.ones(8), layer=2, metadata={"note": "x"}).save(path)
    damage(path, how)
    with pytest.raises(mk.FileFormatError, match="v.safetensors") as err:
        SteeringVector.load(path)
    assert "Hint" in str(err.value)


@pytest.mark.parametrize(
    ("field", "value"), [("layer", "two"), ("site", "attn_out"), ("metadata", "{not json")]
)
def test_steering_vector_file_with_bad_fields_raises_file_format_error(field, value, tmp_path):
    from safetensors.torch import save_file

    header = {"layer": "2", "site": "resid_pre", "method": "pca", "metadata": "{}", field: value}
    path = tmp_path / "v.safetensors"
    save_file({"vector": torch.ones(8)}, str(path), metadata=header)
    with pytest.raises(mk.FileFormatError, match="v.safetensors"):
        SteeringVector.load(path)


def test_arithmetic_against_plain_tensors():
    gen = torch.Generator().manual_seed(0)
    a = SteeringVector(torch.randn(8, generator=gen), layer=3, method="pca")
    b = SteeringVector(torch.randn(8, generator=gen), layer=3, method="probe")
    assert torch.allclose((a + b).vector, a.vector + b.vector)
    assert (a + b).method == "sum" and (a + b).layer == 3
    assert torch.allclose((a - b).vector, a.vector - b.vector)
    assert torch.allclose((2.5 * a).vector, 2.5 * a.vector)
    assert torch.allclose((a * 2).vector, (a / 0.5).vector)
    assert torch.allclose((-a).vector, -a.vector)
    assert abs(a.unit().norm - 1.0) < 1e-6
    assert abs((3 * a).norm - 3 * a.norm) < 1e-5
    assert not a.per_position and "method='pca'" in repr(a) and "layer=3" in repr(a)

    projected = a.project_out(b)
    assert abs(float(projected.vector @ b.vector)) < 1e-5
    assert torch.allclose(projected.vector + (a.vector @ b.vector) / b.norm**2 * b.vector, a.vector)
    assert projected.project_out(b.vector).vector.allclose(projected.vector, atol=1e-6)


def test_per_position_vectors_pad_with_zeros_and_project_per_row():
    gen = torch.Generator().manual_seed(1)
    long = SteeringVector(torch.randn(3, 8, generator=gen), layer=0, method="actadd")
    short = SteeringVector(torch.randn(1, 8, generator=gen), layer=0, method="actadd")
    total = long + short
    assert total.vector.shape == (3, 8) and total.per_position
    assert torch.allclose(total.vector[0], long.vector[0] + short.vector[0])
    assert torch.equal(total.vector[1:], long.vector[1:])
    assert torch.allclose((short - long).vector[1:], -long.vector[1:])

    direction = torch.randn(8, generator=gen)
    projected = long.project_out(direction)
    assert (projected.vector @ direction).abs().max() < 1e-5  # every row
    rows = torch.randn(3, 8, generator=gen)
    rows[1] = 0  # a zero row removes nothing
    per_row = long.project_out(rows)
    assert ((per_row.vector * rows).sum(-1)).abs().max() < 1e-5
    assert torch.equal(per_row.vector[1], long.vector[1])


def test_combining_mismatched_vectors_raises():
    a = SteeringVector(torch.ones(8), layer=3)
    with pytest.raises(mk.MechkitError, match="same layer and site"):
        a + SteeringVector(torch.ones(8), layer=4)
    with pytest.raises(mk.MechkitError, match="same layer and site"):
        a - SteeringVector(torch.ones(8), layer=3, site="resid_post")
    with pytest.raises(mk.ShapeError, match="d_model"):
        a + SteeringVector(torch.ones(9), layer=3)
    with pytest.raises(mk.ShapeError):
        a.project_out(torch.ones(9))
    with pytest.raises(mk.MechkitError, match="non-zero"):
        a.project_out(torch.zeros(8))
    with pytest.raises(TypeError):
        a * a


def test_bad_inputs_raise_clear_errors(smollm2):
    with pytest.raises(mk.ShapeError, match="2 positives and 1 negatives"):
        mean_difference_vector(smollm2, ["a b", "c d"], ["e f"], layer=1)
    with pytest.raises(mk.InvalidSiteError, match=r"\[0, 30\)"):
        mean_difference_vector(smollm2, ["a"], ["b"], layer=30)
    with pytest.raises(mk.InvalidSiteError, match=r"\[0, 30\)"):
        actadd_vector(smollm2, "a", "b", layer=-31)
    with pytest.raises(mk.InvalidSiteError, match="resid_pre"):
        pca_vector(smollm2, ["a", "b"], ["c", "d"], layer=1, site="attn_out")
    with pytest.raises(mk.InvalidSiteError, match="resid_pre"):
        SteeringVector(torch.ones(8), layer=1, site="resid")
    with pytest.raises(mk.InvalidSiteError):
        SteeringVector(torch.ones(8), layer=-1)
    with pytest.raises(mk.ShapeError, match=r"\(d_model,\)"):
        SteeringVector(torch.ones(2, 3, 8), layer=1)
    with pytest.raises(mk.EmptyDatasetError):
        mean_difference_vector(smollm2, [], [], layer=1)
    with pytest.raises(mk.ShapeError, match="single string"):
        probe_vector(smollm2, "I love it", ["I hate it"], layer=1)
    with pytest.raises(mk.EmptyDatasetError, match="at least 2 pairs"):
        pca_vector(smollm2, ["a"], ["b"], layer=1)
    with pytest.raises(mk.PromptLengthError, match="tokens"):
        activations_at(smollm2, ["Hi", "a much longer prompt"], layer=1, position=4)
    with pytest.raises(mk.UnknownKindError, match="'mean'"):
        activations_at(smollm2, ["Hi"], layer=1, position="last")
    assert hook_count(smollm2) == 0


# ----------------------------------------------------------------------------------------------
# Issue 15: a Site wherever a layer and site are asked for
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def test_builders_take_a_site_for_layer_and_site(smollm2):
    site = mk.Site("resid_post", layer=3)
    by_ints = activations_at(smollm2, POSITIVES[:2], layer=3, site="resid_post")
    assert torch.equal(activations_at(smollm2, POSITIVES[:2], site=site), by_ints)
    assert torch.equal(activations_at(smollm2, POSITIVES[:2], layer=site), by_ints)
    vec = mean_difference_vector(smollm2, POSITIVES[:2], NEGATIVES[:2], site=site)
    old = mean_difference_vector(smollm2, POSITIVES[:2], NEGATIVES[:2], layer=3, site="resid_post")
    assert (vec.layer, vec.site) == (3, "resid_post") and torch.equal(vec.vector, old.vector)
    add = actadd_vector(smollm2, "Love", "Hate", site=mk.Site("resid_pre", layer=-1))
    assert add.layer == smollm2.cfg.n_layers - 1 and add.site == "resid_pre"
    with pytest.raises(mk.InvalidArgumentError, match="layer"):
        activations_at(smollm2, ["Hi"], layer=4, site=site)  # disagrees with the Site's layer
    with pytest.raises(mk.InvalidSiteError, match="residual"):
        activations_at(smollm2, ["Hi"], site=mk.Site("z", layer=1))
    with pytest.raises(mk.InvalidSiteError, match="head, position or neuron"):
        activations_at(smollm2, ["Hi"], site=mk.Site("resid_pre", layer=1, position=0))
    with pytest.raises(mk.InvalidSiteError, match="Expected a layer"):
        activations_at(smollm2, ["Hi"])


@torch.no_grad()
def test_steer_places_a_plain_tensor_at_a_site(toy):
    tokens = torch.tensor([[1, 2, 3]])
    direction = torch.randn(toy.cfg.d_model, generator=torch.Generator().manual_seed(0))
    vec = SteeringVector(direction, layer=1, site="resid_post")
    with mk.steer(toy, vec, coefficient=3.0):
        by_vector = toy(tokens)
    with mk.steer(toy, direction, coefficient=3.0, site=mk.Site("resid_post", layer=-1)):
        by_site = toy(tokens)
    hook = ("blocks.1.hook_resid_post", lambda act, hook: act + 3.0 * direction)
    assert torch.equal(by_site, by_vector)
    assert torch.allclose(by_site, toy.run_with_hooks(tokens, fwd_hooks=[hook]), atol=1e-5)
    with pytest.raises(mk.InvalidSiteError, match="residual-stream"):
        with mk.steer(toy, direction, site=mk.Site("attn_out", layer=0)):
            pass
    assert hook_count(toy) == 0
