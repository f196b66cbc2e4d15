"""The successor-heads reproduction: the succession score against hand-built heads whose answer is
known, against ``mk.detect_heads(model, "successor")``, and the dataset against the tokenizer."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

import mechkit as mk
from circuits import successor_heads as sh


def _shift_model() -> HookedTransformer:
    """One attention-only layer over 10 tokens, no norms: head 0's OV circuit maps token i to
    i + 1, head 1's maps it to i - 1, head 2's to i itself (a copying head)."""
    cfg = HookedTransformerConfig(
        n_layers=1, d_model=10, d_head=10, n_heads=3, n_ctx=8, d_vocab=10, attn_only=True,
        normalization_type=None, act_fn=None, positional_embedding_type="standard", seed=0,
    )  # fmt: skip
    model = HookedTransformer(cfg)
    eye = torch.eye(10)
    up = torch.roll(eye, 1, dims=1)  # e_i -> e_{i+1}
    with torch.no_grad():
        model.W_E.copy_(eye)
        model.W_U.copy_(eye)
        attn = model.blocks[0].attn
        attn.W_V.copy_(eye.expand(3, 10, 10))
        attn.W_O.copy_(torch.stack([up, up.T, eye]))
        model.b_U.zero_()
    return model


def test_succession_score_of_hand_built_heads():
    model = _shift_model()
    data = sh.SuccessionDataset.from_ids([[0, 1, 2, 3, 4], [5, 6, 7, 8]])
    scores = sh.succession_scores(model, data)
    assert scores.tolist() == [[1.0, 0.0, 0.0]]  # successor, predecessor, copying
    # an item whose successor is outside the dataset (4 -> 5 is not its own sequence's next)
    # is not scored: only 0->1, ..., 3->4 and 5->6, ..., 7->8 count
    logits = sh.ov_logits(model, 0, torch.tensor([2]), torch.arange(10))
    assert int(logits[0, 0].argmax()) == 3 and int(logits[1, 0].argmax()) == 1
    # the paper's score ranks against every dataset token, detect_heads against the own
    # sequence: a head mapping 3 -> 5 wins against the whole dataset only if 5 were next
    detected = mk.detect_heads(
        model, "successor", tokens=[list(r) for r in data.ids], progress=False
    ).scores
    torch.testing.assert_close(detected, scores)


def test_within_sequence_score_equals_detect_heads():
    model = mk.load_model("attn-only-2l")
    generator = torch.Generator().manual_seed(0)
    ids = torch.randperm(model.cfg.d_vocab, generator=generator)[:30].tolist()
    data = sh.SuccessionDataset.from_ids([ids[:8], ids[8:15], ids[15:30]])
    ours = sh.succession_scores(model, data, within_sequence=True)
    theirs = mk.detect_heads(
        model, "successor", tokens=[list(r) for r in data.ids], effective_embedding=True,
        progress=False,
    ).scores  # fmt: skip
    torch.testing.assert_close(ours, theirs)
    # against the whole dataset a head can only do worse than against its own sequence
    assert bool((sh.succession_scores(model, data) <= ours + 1e-6).all())


def test_mean_ablation_hooks_set_only_the_chosen_heads():
    model = mk.load_model("attn-only-2l")
    tokens = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    lengths = torch.tensor([4, 3])
    means = sh._head_means(model, tokens, lengths)
    site = mk.Site("z", layer=1)
    with torch.no_grad(), mk.capture(model, site) as clean:
        model(tokens)
    # the mean over real tokens only: the padding position of prompt 2 left out
    z = clean[site]
    torch.testing.assert_close(means[1], torch.cat([z[0], z[1, :3]]).mean(0))
    with torch.no_grad(), mk.intervene(model, *sh._ablate([(1, 2)], means)):
        with mk.capture(model, site) as acts:
            model(tokens)
    torch.testing.assert_close(acts[site][:, :, 2], means[1][2].expand(2, 4, -1))
    torch.testing.assert_close(acts[site][:, :, [0, 1, 3]], z[:, :, [0, 1, 3]])


@pytest.mark.slow
def test_dataset_and_prompts_are_single_tokens(smollm2):
    data = sh.succession_dataset(smollm2)
    assert {"days", "months", "letters", "number words"} <= set(data.names)
    for words, ids in zip(data.words, data.ids, strict=True):
        for word, token in zip(words, ids, strict=True):
            assert smollm2.to_string(torch.tensor([token])) == word
    texts, answers, names = sh.incrementation_prompts(data)
    i = texts.index("Monday, Tuesday, Wednesday,")
    assert smollm2.to_string(torch.tensor([answers[i]])) == " Thursday" and names[i] == "days"


def test_any_spelling_counts_the_successor_in_another_spelling():
    model = _shift_model()
    # two spellings of one sequence: ids 0-4 and 5-9; head 0 maps 3 -> 4 (same spelling) but
    # 4 -> 5, which is the other spelling's first item: no hit in either score
    data = sh.SuccessionDataset(
        ("s", "s"), ("a", "b"), (("0", "1", "2"), ("5", "6", "7")), ((0, 1, 2), (5, 6, 7))
    )
    assert sh.succession_scores(model, data, any_spelling=True).tolist() == [[1.0, 0.0, 0.0]]
    # a sequence whose "successor" is written in the other spelling: 0 -> 1 read from row b
    shifted = sh.SuccessionDataset(
        ("s", "s"), ("a", "b"), (("0", "2", "4"), ("x", "1", "y")), ((0, 2, 4), (9, 1, 8))
    )
    # head 0 maps 0 -> 1, which is item 1 of the other spelling of the same sequence
    strict = sh.succession_scores(model, shifted)
    loose = sh.succession_scores(model, shifted, any_spelling=True)
    assert float(strict[0, 0]) == 0.0 and float(loose[0, 0]) == 0.25


def test_effective_embedding_and_ov_circuit_include_gemma_post_norms():
    # Gemma normalizes the attention and MLP outputs before adding them to the residual: the
    # effective embedding is the residual after block 0 with the attention output zeroed, and
    # the OV logits carry ln1_post's weights
    cfg = HookedTransformerConfig(
        n_layers=1, d_model=16, n_heads=2, d_head=8, d_mlp=32, n_ctx=8, d_vocab=20,
        act_fn="gelu", normalization_type="RMS", positional_embedding_type="rotary",
        use_normalization_before_and_after=True, seed=3,
    )  # fmt: skip
    model = HookedTransformer(cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".w"):  # weights away from 1, so that leaving them out shows
                param.uniform_(0.2, 3.0, generator=torch.Generator().manual_seed(len(name)))
    ids = torch.arange(5)
    zero_attn = [("blocks.0.hook_attn_out", lambda act, hook: torch.zeros_like(act))]
    with torch.no_grad():
        _, cache = model.run_with_cache(ids[:, None], return_type=None)
        resid = model.run_with_hooks(ids[:, None], fwd_hooks=zero_attn, return_type=None,
                                     stop_at_layer=1)  # fmt: skip
    torch.testing.assert_close(sh.effective_embeddings(model, ids), resid[:, 0])
    # each head alone on its own effective embedding (a one-token prompt attends to itself),
    # biases zeroed: the real output after ln1_post, read through the final norm's weights and
    # the unembedding, is the OV logits times a positive scale per head and token
    with torch.no_grad():
        model.blocks[0].attn.b_V.zero_()
        model.blocks[0].attn.b_O.zero_()
    ov = sh.ov_logits(model, 0, ids, torch.arange(20))
    for head in range(2):

        def only(act, hook, head=head):
            act = act.clone()
            act[:, :, 1 - head] = 0
            return act

        def effective(act, hook):
            return sh.effective_embeddings(model, ids)[:, None]

        hooks = [("blocks.0.hook_resid_pre", effective), ("blocks.0.attn.hook_z", only)]
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            _, cache = model.run_with_cache(ids[:, None], return_type=None)
        with torch.no_grad():
            real = (cache["blocks.0.hook_attn_out"][:, 0] * model.ln_final.w) @ model.W_U
        ratio = ov[head] / real
        assert float(ratio.min()) > 0
        torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-4, atol=0)
