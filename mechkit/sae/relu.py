"""ReLU sparse dictionaries: ``f = relu(pre)``, trained with an L1 penalty weighted by decoder
norms (Bricken et al. 2023, "Towards Monosemanticity"; the April 2024 update's
``sum_i f_i ||W_dec,i||``, which makes the penalty immune to shrinking ``f`` by growing
``W_dec``). The decoder is left unconstrained.

    >>> from mechkit.sae import SAEConfig
    >>> cfg = SAEConfig(architecture="relu", d_in=8, d_sae=32, hook_name="blocks.0.hook_resid_pre")
    >>> ReLUSAE(cfg).encode(torch.randn(3, 8)).shape     # (batch, d_sae)
    torch.Size([3, 32])
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from mechkit.sae.base import SparseDictionary, StepOutput, register_architecture

__all__ = ["ReLUSAE"]


@register_architecture("relu")
class ReLUSAE(SparseDictionary):
    """ReLU SAE or transcoder (sae-lens ``standard`` / ``transcoder`` / ``skip_transcoder``).

    Example:
        >>> from mechkit.sae import SAEConfig
        >>> cfg = SAEConfig(architecture="relu", d_in=8, d_sae=32, hook_name="blocks.0.mlp")
        >>> sae = ReLUSAE.from_config(cfg)
        >>> bool((sae.encode(torch.randn(3, 8)) >= 0).all())
        True
    """

    unit_norm_decoder = False

    def activate(self, pre: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_sae"]:
        return torch.relu(pre)

    def training_step(self, x, y, *, coefficient, dead, n_dead, aux_k, aux_coefficient):  # noqa: ARG002
        f = torch.relu(self._encoder_input(x) @ self.W_enc + self.b_enc)  # (batch, d_sae)
        y_hat = self._skip_and_bias(x, f @ self.W_dec)
        mse = (y - y_hat).pow(2).sum(-1).mean()
        penalty = (f @ self.W_dec.norm(dim=-1)).mean()  # sum_i f_i ||W_dec,i||
        active = f > 0
        return StepOutput(
            loss=mse + coefficient * penalty,
            mse=mse.detach(),
            sparsity=penalty.detach(),
            l0=active.sum(-1).float().mean(),
            fired=active.any(0),
        )
