"""gemma3-270m: TransformerLens's Gemma 3 against transformers on the same GGUF file."""

from __future__ import annotations

import pytest
import torch

import mechkit as mk
from mechkit.models.conversion import one_gguf_parse

PROMPTS = [
    "The capital of France is",
    "When Mary and John went to the store, John gave a drink to",
    # longer than the 512-token sliding window of the local layers (about 560 tokens: each
    # position's logits over the 262k vocabulary cost a megabyte, twice over)
    " ".join(f"item {i} costs {i * 7 % 13} coins;" for i in range(60)),
]


@pytest.fixture(scope="module")
def gemma_and_hf(session_cache):
    """mechkit's model and transformers' reference, from one parse of the GGUF file (its
    262k-token vocabulary costs tens of seconds per parse; mechkit's conversion on an empty
    cache reuses this block's reader)."""
    from transformers import AutoModelForCausalLM

    with one_gguf_parse():
        gemma = mk.load_model("gemma3-270m", device="cpu")
        folder, name = mk.model_info(gemma).location.rsplit("/", 1)
        hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return gemma, hf.eval()


@pytest.fixture(scope="module")
def gemma(gemma_and_hf):
    return gemma_and_hf[0]


@torch.no_grad()
def test_gemma3_logits_match_hugging_face(gemma_and_hf):
    gemma, hf = gemma_and_hf
    lengths = []
    for prompt in PROMPTS:
        tokens = gemma.to_tokens(prompt)  # BOS first, as the Gemma tokenizer does
        assert tokens[0, 0] == gemma.tokenizer.bos_token_id
        lengths.append(tokens.shape[1])
        ours, theirs = gemma(tokens), hf(tokens).logits
        # float32 with different kernels: 1.2e-3 at logits of ~20 measured on one CPU; an
        # implementation error moves logits by tenths or more. assert_close's test
        # (|a - b| <= atol + rtol |b|) written out: assert_close took 13 s on these tensors
        assert ours.shape == theirs.shape and bool(ours.isfinite().all())
        diff = (ours - theirs).abs()
        assert bool((diff <= 1e-3 + 1e-4 * theirs.abs()).all()), float(diff.max())
        assert ours[0, -1].argmax() == theirs[0, -1].argmax()
    assert max(lengths) > 512


def test_gemma3_config(gemma):
    cfg = gemma.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_key_value_heads) == (18, 640, 4, 1)
    assert cfg.default_prepend_bos and cfg.n_ctx == 2048
    assert mk.model_info(gemma).processing.fold_ln
