"""BatchTopK sparse dictionaries (Bussmann et al. 2024, "BatchTopK Sparse Autoencoders").

When training, a batch of ``B`` rows keeps its ``k * B`` largest pre-activations in total, so
``k`` is the *average* L0 and easy rows can use fewer latents than hard ones. That rule depends
on the batch, so at inference the dictionary is a JumpReLU with one global threshold
``theta``: an exponential moving average (rate 0.01, started at the first batch's value) of
the smallest kept activation of each training batch. It is stored as the ``(d_sae,)`` buffer
``threshold`` (all equal), and saved in sae-lens's format as a ``jumprelu`` SAE, as sae-lens
does. A moving average over a short run remembers the early batches, whose kept activations are
larger, and then fires fewer than ``k`` latents per row at inference (22 of 32 on the first
shipped transcoder): :meth:`BatchTopKSAE.calibrate`, called by ``train_sae`` at the end, sets
the threshold to the mean over training batches of the same statistic under the final
weights. Training is otherwise TopK's (AuxK
for dead latents, unit-norm decoder rows, sparse steps).

    >>> cfg = SAEConfig(architecture="batchtopk", d_in=8, d_sae=32, k=4,
    ...                 hook_name="blocks.0.hook_resid_pre")
    >>> BatchTopKSAE(cfg).encode(torch.randn(3, 8)).shape
    torch.Size([3, 32])
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import torch
from jaxtyping import Float
from torch import Tensor

from mechkit.distributed.data_parallel import global_kth_largest, global_min, rank_and_world
from mechkit.sae.base import SAEConfig, SparseDictionary, register_architecture
from mechkit.sae.topk import sparse_training_step

__all__ = ["BatchTopKSAE"]

#: rate of the moving average of the smallest kept activation
THRESHOLD_RATE = 0.01


@register_architecture("batchtopk")
class BatchTopKSAE(SparseDictionary):
    """BatchTopK SAE or transcoder; a JumpReLU with a global threshold at inference.

    Example:
        >>> from mechkit.sae import SAEConfig
        >>> sae = BatchTopKSAE(SAEConfig(architecture="batchtopk", d_in=8, d_sae=32, k=4,
        ...                              hook_name="blocks.0.hook_resid_post"))
        >>> int(sae.batch_topk(torch.randn(3, 32)).count_nonzero()) <= 12   # k * batch in all
        True
    """

    threshold: Tensor  # (d_sae,) a buffer: set by training and calibration, not by gradients

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros(cfg.d_sae, dtype=cfg.torch_dtype))

    def activate(self, pre: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_sae"]:
        return torch.relu(pre) * (pre > self.threshold).to(pre.dtype)

    def batch_topk(self, pre: Float[Tensor, "batch d_sae"]) -> Float[Tensor, "batch d_sae"]:
        """The training-time activation: the batch's ``k * batch`` largest, ReLU'd."""
        n = cast(int, self.cfg.k) * pre.shape[0]
        values, flat = pre.reshape(-1).topk(n, sorted=False)
        return torch.zeros_like(pre).reshape(-1).scatter_(0, flat, values.relu()).view_as(pre)

    @torch.no_grad()
    def calibrate(self, batches: Iterable[Any], n_batches: int) -> None:
        """Set the inference threshold from the final weights: the mean over up to
        ``n_batches`` batches (``x`` or ``(x, y)``, raw activations) of the smallest positive
        value among each batch's ``k * batch`` largest pre-activations."""
        smallest = []
        for i, batch in enumerate(batches):
            if i == n_batches:
                break
            x = batch[0] if isinstance(batch, tuple | list) else batch
            pre = self.pre_activations(x.to(self.W_enc.device, self.W_enc.dtype))
            values = pre.reshape(-1).topk(cast(int, self.cfg.k) * pre.shape[0], sorted=False).values
            positive = values[values > 0]
            if positive.numel():
                smallest.append(positive.min().float())
        if smallest:
            self.threshold.fill_(float(torch.stack(smallest).mean()))

    def training_step(self, x, y, *, coefficient, dead, n_dead, aux_k, aux_coefficient):  # noqa: ARG002
        batch, d_sae = x.shape[0], self.cfg.d_sae
        x_in = self._encoder_input(x).detach()
        with torch.no_grad():
            pre = torch.addmm(self.b_enc, x_in, self.W_enc)  # (batch, d_sae)
            world = rank_and_world()[1]
            if world == 1:
                values, flat = pre.reshape(-1).topk(cast(int, self.cfg.k) * batch, sorted=False)
                flat, order = flat.sort()  # row-major: rows ascending, as embedding_bag wants
                values = values[order]
            else:  # the global batch's k * batch * world largest: those above its threshold
                n = cast(int, self.cfg.k) * batch * world
                cut = global_kth_largest(pre.reshape(-1), n)
                flat = (pre.reshape(-1) >= cut).nonzero().squeeze(1)  # ascending
                values = pre.reshape(-1)[flat]
            rows, cols = flat // d_sae, flat % d_sae
            counts = torch.bincount(rows, minlength=batch)
            offsets = torch.cumsum(counts, 0) - counts  # (batch,) start of each row's bag
        out = sparse_training_step(
            self, x, y, pre, x_in, values, rows, cols, offsets,
            dead=dead, n_dead=n_dead, aux_k=aux_k, aux_coefficient=aux_coefficient,
        )  # fmt: skip
        with torch.no_grad():
            positive = values.relu()
            smallest = global_min(torch.where(positive > 0, positive, torch.inf).min())
            smallest = torch.where(torch.isfinite(smallest), smallest, self.threshold[0])
            moved = self.threshold * (1 - THRESHOLD_RATE) + THRESHOLD_RATE * smallest
            # the first batch sets it (no bias towards the zero it starts from)
            self.threshold.copy_(torch.where(self.threshold == 0, smallest, moved))
        return out
