"""The forward layout (mechkit/models/layout.py) changes strides only: outputs are bit-identical."""

from __future__ import annotations

import torch
from transformer_lens import HookedTransformer

import mechkit as mk
from mechkit.models.layout import use_forward_layout


def _copy(model: HookedTransformer) -> HookedTransformer:
    """The same model with every parameter stored contiguously (TransformerLens's own layout)."""
    plain = HookedTransformer(model.cfg, tokenizer=model.tokenizer, move_to_device=False)
    plain.load_state_dict({k: v.contiguous() for k, v in model.state_dict().items()})
    return plain.eval()


@torch.no_grad()
def test_loaded_models_run_without_weight_copies_and_give_identical_logits(smollm2, toy):
    for model in (smollm2, toy):
        assert not model.W_U.is_contiguous() and model.W_U.T.is_contiguous()
        plain = _copy(model)
        assert plain.W_U.is_contiguous()
        tokens = torch.tensor([[1, 5, 9, 300, 42, 7]])
        assert torch.equal(model(tokens), plain(tokens))
    mlp = smollm2.blocks[3].mlp
    for weight in (mlp.W_gate, mlp.W_in, mlp.W_out):  # the gated MLP reads W.T.contiguous()
        assert weight.T.is_contiguous()
    attn = smollm2.blocks[3].attn
    assert attn.W_Q.permute(0, 2, 1).is_contiguous() and attn._W_K.permute(0, 2, 1).is_contiguous()
    assert attn.W_O.permute(2, 0, 1).is_contiguous()


def test_gradients_and_generation_are_unchanged(toy):
    plain = _copy(toy)
    tokens = torch.tensor([[1, 2, 3, 4, 5]])
    grads = []
    for model in (toy, plain):
        model.zero_grad(set_to_none=True)
        model(tokens)[0, -1, 3].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        model.zero_grad(set_to_none=True)
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])
    assert use_forward_layout(toy) == 0  # loading already did it; a second call moves nothing
    assert mk.load_model("attn-only-2l").W_U.stride() == toy.W_U.stride()
