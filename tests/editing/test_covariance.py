"""The key covariance against a naive average of outer products; its warning and cache."""

from __future__ import annotations

import pytest
import torch

import mechkit as mk
from mechkit.editing import key_covariance
from mechkit.editing.covariance import covariance_path


def test_covariance_is_the_mean_outer_product_of_mlp_keys(tiny):
    tokens = torch.randint(
        0, tiny.cfg.d_vocab, (700, 8), generator=torch.Generator().manual_seed(0)
    )
    C = key_covariance(tiny, 1, tokens=tokens, batch_size=300, progress=False)
    _, cache = tiny.run_with_cache(tokens[:50])
    keys = torch.cat([cache["blocks.1.mlp.hook_post"].reshape(-1, 64)])
    # the naive sum over every token, in pieces of 50 sequences
    total = torch.zeros(64, 64, dtype=torch.float64)
    for start in range(0, 700, 50):
        _, cache = tiny.run_with_cache(tokens[start : start + 50])
        keys = cache["blocks.1.mlp.hook_post"].reshape(-1, 64).double()
        total += keys.T @ keys
    assert torch.allclose(C.double(), total / tokens.numel(), rtol=1e-4, atol=1e-6)


def test_few_tokens_warn_with_the_count(tiny):
    tokens = torch.randint(0, tiny.cfg.d_vocab, (4, 8))
    with pytest.warns(UserWarning, match=r"on 32 tokens, fewer than 10 x d_mlp = 640.*singular"):
        key_covariance(tiny, 0, tokens=tokens, progress=False)


def test_corpus_estimate_is_cached(smollm2):
    path = covariance_path(smollm2, 0, 256)
    path.unlink(missing_ok=True)
    with pytest.warns(UserWarning, match="256 tokens"):
        C = key_covariance(smollm2, 0, n_tokens=256, seq_len=128, progress=False)
    assert path.is_file() and C.shape == (1536, 1536)
    assert torch.allclose(C, C.T, atol=1e-6) and torch.linalg.eigvalsh(C.double()).min() > -1e-6
    again = key_covariance(smollm2, 0, n_tokens=256, seq_len=128, progress=False)  # no warning
    assert torch.equal(again, C)
    with pytest.raises(mk.InvalidArgumentError, match="layer in 0..29"):
        key_covariance(smollm2, 30)
