"""On a CUDA GPU, the batched paths give the CPU's numbers: activation patching (length buckets,
answer-only last block), EAP-IG on activations (both estimators) and feature-circuit edges.

Marked ``cuda`` and skipped without a GPU; ``benchmarks/gpu_check.sh`` runs them with
``pytest -m cuda``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

import mechkit as mk
from mechkit.sae import SAEConfig, SparseDictionary

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def models():
    cfg = HookedTransformerConfig(
        n_layers=3, d_model=32, n_heads=4, d_head=8, d_mlp=64, d_vocab=50, n_ctx=16,
        act_fn="gelu", normalization_type="LN", seed=0, device="cpu",
    )  # fmt: skip
    cpu = HookedTransformer(cfg)
    gpu = copy.deepcopy(cpu).to("cuda")
    gpu.cfg.device = "cuda"
    return cpu, gpu


@pytest.fixture(scope="module")
def pairs():
    g = torch.Generator().manual_seed(1)
    clean, corrupt = [], []
    for length in (6, 9, 6, 8, 9):
        row = torch.randint(1, 50, (length,), generator=g)
        bad = row.clone()
        bad[1:3] = torch.randint(1, 50, (2,), generator=g)
        clean.append(row.tolist())
        corrupt.append(bad.tolist())
    answers = torch.randint(1, 50, (5,), generator=g)
    return mk.PromptPairs.from_tokens(clean, corrupt, answers, (answers + 1) % 50)


def test_activation_patching_on_cuda_equals_cpu(models, pairs):
    cpu, gpu = models
    for site in ("resid_pre", "z", "mlp_out"):
        a = mk.activation_patch(cpu, pairs, site=site, progress=False)
        b = mk.activation_patch(gpu, pairs.to("cuda"), site=site, progress=False)
        torch.testing.assert_close(a.scores, b.scores.cpu(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("average", ["sender-runs", "all-runs"])
def test_eap_ig_activations_on_cuda_equals_cpu(models, pairs, average):
    cpu, gpu = models
    aligned = pairs[[0, 2]]  # one length: aligned, unpadded
    kwargs = {"method": "eap-ig-activations", "steps": 3, "ig_average": average}
    a = mk.edge_attribution(cpu, aligned, progress=False, **kwargs)
    b = mk.edge_attribution(gpu, aligned.to("cuda"), progress=False, **kwargs)
    torch.testing.assert_close(a.scores, b.scores.cpu(), atol=1e-4, rtol=1e-3)


def test_feature_circuit_on_cuda_equals_cpu(models, pairs):
    cpu, gpu = models
    cfg = SAEConfig(
        architecture="topk", d_in=32, d_sae=64, k=8, hook_name="blocks.1.hook_resid_post"
    )
    sae = SparseDictionary.from_config(cfg, seed=0)
    a = mk.feature_circuit(cpu, sae, pairs, latents_per_dictionary=6, progress=False)
    b = mk.feature_circuit(
        gpu, copy.deepcopy(sae).to("cuda"), pairs.to("cuda"), latents_per_dictionary=6,
        progress=False,
    )  # fmt: skip
    torch.testing.assert_close(a.scores, b.scores.cpu(), atol=1e-4, rtol=1e-3)
