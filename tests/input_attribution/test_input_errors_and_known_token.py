"""Bad input gives a clear MechkitError and leaves no hook; a hand-built model whose answer
depends on one known token has that token ranked first by every method; the result's views."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

import mechkit as mk
from mechkit.input_attribution import METHODS, InputAttribution
from tests.conftest import hook_count

KEY, ANSWER, D_VOCAB = 7, 3, 12


def known_token_model() -> HookedTransformer:
    """One attention head. Every token embeds as its one-hot plus a constant dimension; the
    query (from the constant) matches only the key of token KEY, whose value writes onto the
    residual direction read as ANSWER's logit. So ANSWER's logit at the last position is 6
    times the attention paid to KEY: KEY is the one token that matters."""
    d = D_VOCAB + 1
    cfg = HookedTransformerConfig(
        n_layers=1,
        d_model=d,
        n_ctx=16,
        d_head=2,
        n_heads=1,
        d_vocab=D_VOCAB,
        attn_only=True,
        normalization_type=None,
        positional_embedding_type="standard",
    )
    model = HookedTransformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.W_E[:, :D_VOCAB] = torch.eye(D_VOCAB)
        model.W_E[:, D_VOCAB] = 1.0  # the constant dimension
        attn = model.blocks[0].attn
        attn.W_Q[0, D_VOCAB, 0] = 4.0  # query: the constant
        attn.W_K[0, KEY, 0] = 4.0  # key: 16 for token KEY, 0 for the others
        attn.W_V[0, KEY, 1] = 1.0  # value: is this token KEY?
        attn.W_O[0, 1, ANSWER] = 6.0  # onto ANSWER's direction
        model.W_U[:D_VOCAB] = torch.eye(D_VOCAB)
    model.eval()
    return model


def test_hand_built_model_depends_on_the_key_token():
    model = known_token_model()
    with torch.no_grad():
        with_key = model(torch.tensor([[1, 2, KEY, 4, 5, 6]]))[0, -1, ANSWER]
        without = model(torch.tensor([[1, 2, 8, 4, 5, 6]]))[0, -1, ANSWER]
    assert with_key > 5.9 and abs(float(without)) < 1e-6


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_ranks_the_key_token_first(method):
    model = known_token_model()
    prompts = [[1, 2, KEY, 4, 5, 6], [KEY, 9, 10, 4, 2]]
    extra = {"baseline": "zero"} if method == "integrated_gradients" else {}
    r = mk.attribute_inputs(
        model, prompts, ANSWER, method=method, kind="logit", progress=False, **extra
    )
    for i, p in enumerate(prompts):
        assert int(r.scores[i, : len(p)].argmax()) == p.index(KEY)
    assert hook_count(model) == 0


def test_bad_inputs_raise_clear_errors_and_leave_no_hook(toy):
    with pytest.raises(mk.EmptyDatasetError):
        mk.attribute_inputs(toy, [], 5, progress=False)
    with pytest.raises(mk.EmptyDatasetError):
        mk.attribute_inputs(toy, [[1, 2], []], 5, progress=False)
    with pytest.raises(mk.InvalidArgumentError, match="Did you mean 'integrated_gradients'"):
        mk.attribute_inputs(toy, [[1, 2, 3]], 5, method="integrated_gradient", progress=False)
    with pytest.raises(mk.InvalidArgumentError, match="Did you mean 'gausslegendre'"):
        mk.attribute_inputs(toy, [[1, 2, 3]], 5, quadrature="gauslegendre", progress=False)
    with pytest.raises(mk.InvalidArgumentError, match="n_samples"):
        mk.attribute_inputs(toy, [[1, 2, 3]], 5, method="occlusion", n_samples=10, progress=False)
    with pytest.raises(mk.PromptLengthError, match="baseline prompt"):
        mk.attribute_inputs(toy, [[1, 2, 3]], 5, baseline=[[1, 2]], progress=False)
    with pytest.raises(mk.InvalidTokenError):
        mk.attribute_inputs(toy, [[1, 2, 3]], 999, progress=False)
    with pytest.raises(mk.InvalidArgumentError, match="max_features"):
        mk.attribute_inputs(toy, [list(range(1, 16))], 5, method="shapley", progress=False)

    def broken(logits):
        raise RuntimeError("a target that fails inside the forward pass")

    with pytest.raises(RuntimeError, match="fails inside"):
        mk.attribute_inputs(toy, [[1, 2, 3]], broken, progress=False)
    assert hook_count(toy) == 0


def test_multi_token_target_is_refused(smollm2):
    with pytest.raises(mk.MultiTokenAnswerError, match="single token"):
        mk.attribute_inputs(smollm2, "The Eiffel Tower is in", " Parisville", progress=False)


def test_out_of_memory_splits_the_perturbed_batch(toy, monkeypatch):
    """More perturbed prompts than fit: a pass that runs out of memory is split in halves and
    the scores are the same; a tiny memory budget runs one row per pass."""
    prompt = [1, 7, 3, 9, 4, 12, 5, 8]
    whole = mk.attribute_inputs(
        toy, [prompt], 11, method="kernel_shap", n_samples=60, progress=False
    )
    tiny = mk.attribute_inputs(
        toy, [prompt], 11, method="kernel_shap", n_samples=60, memory_budget=1, progress=False
    )
    assert torch.allclose(tiny.scores, whole.scores, atol=1e-5)
    forward = type(toy).forward
    sizes = []

    def limited(self, tokens, *args, **kwargs):
        sizes.append(tokens.shape[0])
        if tokens.shape[0] > 8:
            raise RuntimeError("CUDA out of memory (simulated)")
        return forward(self, tokens, *args, **kwargs)

    monkeypatch.setattr(type(toy), "forward", limited)
    split = mk.attribute_inputs(
        toy, [prompt], 11, method="kernel_shap", n_samples=60, progress=False
    )
    assert torch.allclose(split.scores, whole.scores, atol=1e-5)
    assert max(sizes) > 8 and 0 < min(sizes) <= 8
    assert hook_count(toy) == 0


def test_result_views(toy, tmp_path):
    r = mk.attribute_inputs(toy, [[1, 2, 3, 4], [5, 6]], 11, method="occlusion", progress=False)
    frame = r.to_dataframe()
    assert len(frame) == 6 and set(frame["prompt"]) == {0, 1}
    html = r.html()
    assert "rgba(214,39,40" in html or "rgba(31,119,180" in html  # red or blue backgrounds
    assert r._repr_html_() == html
    page = r.save_html(tmp_path / "a.html")
    assert html in page.read_text()
    back = InputAttribution.load(r.save(tmp_path / "saved"))
    assert torch.equal(back.scores.nan_to_num(), r.scores.nan_to_num())
    assert back.labels == r.labels and back.method == "occlusion"
    assert type(r.plot()).__name__ == "Figure"
    (tmp_path / "saved" / "attribution.json").write_text("[1, 2]")
    with pytest.raises(mk.FileFormatError):
        InputAttribution.load(tmp_path / "saved")


def test_word_aggregation_with_a_tokenizer(toy):
    """Sub-word tokens grouped into words, with a stand-in tokenizer (toy has none)."""

    class Pieces:
        texts = {1: "The", 2: " E", 3: "iff", 4: "el", 5: " Tower", 6: ","}

        def decode(self, ids):
            return "".join(self.texts[i] for i in ids)

    r = mk.attribute_inputs(toy, [[1, 2, 3, 4, 5, 6]], 11, method="occlusion", progress=False)
    from mechkit.input_attribution.runs import word_starts

    class WithTokenizer:
        tokenizer = Pieces()

    starts = word_starts(WithTokenizer(), [1, 2, 3, 4, 5, 6])
    assert starts == [True, True, False, False, True, True]
    # regroup the toy's scores by these words, as to_words does with a tokenizer
    import dataclasses

    words = dataclasses.replace(
        r, word_ids=[[0, 1, 1, 1, 2, 3]], labels=[["The", " E", "iff", "el", " Tower", ","]]
    ).to_words("sum")
    assert words.labels == [["The", " Eiffel", " Tower", ","]]
    assert torch.isclose(words.scores[0, 1], r.scores[0, 1:4].sum())
    biggest = dataclasses.replace(r, word_ids=[[0, 1, 1, 1, 2, 3]]).to_words("max")
    part = r.scores[0, 1:4]
    assert biggest.scores[0, 1] == part[part.abs().argmax()]
