"""TopK sparse dictionaries (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

``f = scatter(topk(z, k))``: each row keeps its ``k`` largest pre-activations (ReLU'd), the
rest are zero, so L0 is at most ``k`` by construction and no sparsity penalty is needed. The
loss is the reconstruction error plus the paper's AuxK term for dead latents: the ``k_aux``
largest pre-activations *among the dead latents* reconstruct the main reconstruction's error
``e = y - y_hat`` (``||e - e_hat||^2``, weight ``1/32``), which gives dead latents a gradient.
Decoder rows are kept at unit norm (the gradient's component along each row is removed, then
the rows are renormalised), as in the paper.

Training uses the sparse steps of :mod:`mechkit.sae.sparse_ops`: one dense product to choose
the winners, everything after that on the ``batch * k`` winners only.

    >>> from mechkit.sae import SAEConfig
    >>> cfg = SAEConfig(architecture="topk", d_in=8, d_sae=32, k=4,
    ...                 hook_name="blocks.0.hook_resid_pre")
    >>> f = TopKSAE(cfg).encode(torch.randn(3, 8))
    >>> f.shape, bool(((f != 0).sum(-1) <= 4).all())        # (batch, d_sae), at most k active
    (torch.Size([3, 32]), True)
"""

from __future__ import annotations

from typing import cast

import torch
from jaxtyping import Float
from torch import Tensor

from mechkit.errors import SAEConfigError
from mechkit.sae.base import SparseDictionary, StepOutput, register_architecture
from mechkit.sae.sparse_ops import gather_pre_activations, sparse_decode

__all__ = ["TopKSAE"]


def _aux_loss(
    sae: SparseDictionary,
    pre: Tensor,
    x_in: Tensor,
    err: Tensor,
    dead: Tensor,
    k_aux: int,
) -> Tensor:
    """AuxK: the top ``k_aux`` dead latents' reconstruction of ``err`` (no bias)."""
    with torch.no_grad():
        masked = pre.masked_fill(~dead, float("-inf"))
        values, idx = masked.topk(k_aux, dim=-1, sorted=False)  # (batch, k_aux)
    rows = torch.arange(pre.shape[0], device=pre.device).repeat_interleave(k_aux)
    b_in = sae.b_dec if sae.cfg.apply_b_dec_to_input else None
    acts = gather_pre_activations(
        values.reshape(-1), x_in, sae.W_enc, sae.b_enc, b_in, rows, idx.reshape(-1)
    ).relu()
    e_hat = sparse_decode(idx, acts.reshape(idx.shape), sae.W_dec)
    return (err.detach() - e_hat).pow(2).sum(-1).mean()


def sparse_training_step(
    sae: SparseDictionary,
    x: Tensor,
    y: Tensor,
    pre: Tensor,
    x_in: Tensor,
    values: Tensor,
    rows: Tensor,
    cols: Tensor,
    offsets: Tensor | None,
    *,
    dead: Tensor | None,
    n_dead: int,
    aux_k: int,
    aux_coefficient: float,
) -> StepOutput:
    """The shared TopK/BatchTopK step, given the chosen ``(rows, cols)`` and their values."""
    b_in = sae.b_dec if sae.cfg.apply_b_dec_to_input else None
    acts = gather_pre_activations(values, x_in, sae.W_enc, sae.b_enc, b_in, rows, cols).relu()
    if offsets is None:  # fixed k per row: (batch, k) bags
        k = cols.numel() // x.shape[0]
        y_hat = sparse_decode(cols.view(-1, k), acts.view(-1, k), sae.W_dec)
    else:
        y_hat = sparse_decode(cols, acts, sae.W_dec, offsets)
    y_hat = sae._skip_and_bias(x, y_hat)
    err = y - y_hat
    mse = err.pow(2).sum(-1).mean()
    loss = mse
    aux = mse.new_zeros(())
    if dead is not None and n_dead > 0 and aux_coefficient > 0:
        aux = _aux_loss(sae, pre, x_in, err, dead, min(aux_k, n_dead))
        loss = loss + aux_coefficient * aux
    with torch.no_grad():
        active = (acts > 0).to(acts.dtype)
        fired = torch.zeros(sae.cfg.d_sae, dtype=acts.dtype, device=acts.device)
        fired = fired.index_add_(0, cols, active) > 0
        l0 = active.sum() / x.shape[0]
    return StepOutput(loss=loss, mse=mse.detach(), sparsity=aux.detach(), l0=l0, fired=fired)


@register_architecture("topk")
class TopKSAE(SparseDictionary):
    """TopK SAE or transcoder (sae-lens ``topk``; sae-lens has no TopK transcoder class).

    Example:
        >>> from mechkit.sae import SAEConfig
        >>> cfg = SAEConfig(architecture="topk", d_in=8, d_sae=32, k=4, hook_name="blocks.0.mlp")
        >>> sae = TopKSAE.from_config(cfg)
        >>> sae.encode(torch.randn(3, 8)).count_nonzero(-1)          # at most k per token
        tensor([4, 4, 4])
    """

    def activate(self, pre: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_sae"]:
        if self.cfg.rescale_acts_by_decoder_norm:
            pre = pre * self.W_dec.norm(dim=-1)
        values, idx = pre.topk(cast(int, self.cfg.k), dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, idx, values.relu())

    def decode(self, f: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_out"]:
        if self.cfg.rescale_acts_by_decoder_norm:
            f = f / self.W_dec.norm(dim=-1)
        return super().decode(f)

    def training_step(self, x, y, *, coefficient, dead, n_dead, aux_k, aux_coefficient):  # noqa: ARG002
        k = cast(int, self.cfg.k)  # SAEConfig requires k for topk
        x_in = self._encoder_input(x).detach()
        with torch.no_grad():
            pre = torch.addmm(self.b_enc, x_in, self.W_enc)  # (batch, d_sae)
            if self.cfg.rescale_acts_by_decoder_norm:
                raise SAEConfigError(
                    "Expected rescale_acts_by_decoder_norm=False to train a TopK SAE (training "
                    "with it is not implemented); got True. Hint: it is for loading sae-lens "
                    "SAEs; train with it off."
                )
            values, idx = pre.topk(k, dim=-1, sorted=False)  # (batch, k)
        rows = torch.arange(x.shape[0], device=x.device).repeat_interleave(k)
        return sparse_training_step(
            self, x, y, pre, x_in, values.reshape(-1), rows, idx.reshape(-1), None,
            dead=dead, n_dead=n_dead, aux_k=aux_k, aux_coefficient=aux_coefficient,
        )  # fmt: skip
