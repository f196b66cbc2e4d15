"""``load_model(..., n_devices=k)``: the block placement follows TransformerLens's own routing
rule (``get_device_for_block_index``, which its forward pass uses to move the residual stream),
checked on CPU for many shapes without GPUs; what cannot be split is refused before any loading
with a message saying why; placing a model's modules keeps its outputs (CPU "devices"). The
multi-GPU run itself needs GPUs and is skipped here.
"""

from __future__ import annotations

import types

import pytest
import torch
from transformer_lens.utils import get_device_for_block_index

import mechkit as mk
from mechkit.devices import block_devices, place_blocks
from mechkit.errors import DeviceError, InvalidArgumentError


@pytest.mark.parametrize(
    ("n_layers", "n_devices", "first"),
    [(2, 2, "cuda"), (12, 4, "cuda"), (30, 8, "cuda:0"), (62, 8, "cuda"), (7, 3, "cuda:2")],
)
def test_block_devices_follow_transformer_lens_routing(n_layers, n_devices, first):
    cfg = types.SimpleNamespace(n_layers=n_layers, n_devices=n_devices, device=first)
    planned = block_devices(n_layers, n_devices, first)
    assert planned == [get_device_for_block_index(i, cfg) for i in range(n_layers)]
    base = torch.device(first).index or 0
    # contiguous runs, every device used, none beyond the last
    assert sorted({d.index for d in planned}) == list(range(base, base + n_devices))
    assert [d.index for d in planned] == sorted(d.index for d in planned)


def test_what_cannot_be_split_is_refused_before_loading():
    with pytest.raises(DeviceError, match="CUDA GPUs to split"):
        mk.load_model("no-such-model", device="cpu", n_devices=2)  # refused before the name
    with pytest.raises(InvalidArgumentError, match="n_devices"):
        mk.load_model("attn-only-2l", device="cpu", n_devices=0)
    with pytest.raises(DeviceError, match="at most the number of blocks"):
        block_devices(2, 3, "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA"):
            mk.load_model("attn-only-2l", device="cuda", n_devices=2)


def test_placing_the_blocks_keeps_the_outputs(toy):
    tokens = torch.tensor([[0, 5, 6, 7, 5, 6]])
    before = toy(tokens)
    model = place_blocks(mk.load_model("attn-only-2l", device="cpu"), block_devices(2, 1, "cpu"))
    assert model.cfg.n_devices == 1
    torch.testing.assert_close(model(tokens), before)
    with pytest.raises(InvalidArgumentError, match="one device per block"):
        place_blocks(model, [torch.device("cpu")])


@pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs 2 GPUs: the split model's forward and patching"
)
def test_a_model_split_across_two_gpus_patches_like_one():  # pragma: no cover - GPUs only
    one = mk.load_model("attn-only-2l", device="cuda:0")
    two = mk.load_model("attn-only-2l", device="cuda:0", n_devices=2)
    assert str(two.blocks[1].attn.W_Q.device) == "cuda:1"
    clean = torch.tensor([[0, 5, 6, 7, 5, 6]])
    corrupt = torch.tensor([[0, 5, 6, 9, 5, 6]])
    metric = lambda logits: logits[:, -1, 7].mean()  # noqa: E731
    a = mk.activation_patch(one, clean, corrupt, metric, site="z", progress=False)
    b = mk.activation_patch(two, clean, corrupt, metric, site="z", progress=False)
    torch.testing.assert_close(a.scores, b.scores, atol=1e-4, rtol=0)
