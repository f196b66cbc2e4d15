"""JumpReLU sparse dictionaries (Rajamanoharan et al. 2024, "Jumping Ahead: Improving
Reconstruction Fidelity with JumpReLU Sparse Autoencoders").

``f = z * H(z - theta)`` with ``z`` the pre-activation and a learnt per-latent threshold
``theta > 0``. The loss is ``||y - y_hat||^2 + lambda * L0``, with ``L0 = sum_i H(z_i - theta_i)``.
``H`` has zero derivative almost everywhere, so the thresholds are trained through the paper's
straight-through estimators with a rectangle kernel ``K`` of bandwidth ``eps``:

- ``d/dtheta [z H(z - theta)] = -(theta / eps) K((z - theta) / eps)``,
- ``d/dtheta H(z - theta) = -(1 / eps) K((z - theta) / eps)``,
- ``d/dz [z H(z - theta)] = H(z - theta)``; the L0 term sends no gradient to ``z``.

Decoder rows are kept at unit norm. The paper trains on inputs scaled to ``E||x||^2 = d_in``
(mechkit's trainer does the same and folds the scale back), where ``eps = 0.001`` and an initial
``theta = 0.001`` are its values.

    >>> cfg = SAEConfig(architecture="jumprelu", d_in=8, d_sae=32, hook_name="blocks.0.mlp")
    >>> JumpReLUSAE(cfg).encode(torch.randn(3, 8)).shape
    torch.Size([3, 32])
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn

from mechkit.sae.base import SAEConfig, SparseDictionary, StepOutput, register_architecture

__all__ = ["JumpReLUSAE", "jumprelu", "step"]

#: the rectangle kernel's bandwidth and the initial threshold (the paper's values)
BANDWIDTH = 0.001
INIT_THRESHOLD = 0.001


def _rectangle(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad):
        z, theta = ctx.saved_tensors
        eps = ctx.eps
        g_z = (z > theta).to(grad.dtype) * grad
        g_theta = -(theta / eps) * _rectangle((z - theta) / eps) * grad
        return g_z, g_theta.reshape(-1, theta.shape[-1]).sum(0), None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad):
        z, theta = ctx.saved_tensors
        eps = ctx.eps
        g_theta = -(1.0 / eps) * _rectangle((z - theta) / eps) * grad
        return None, g_theta.reshape(-1, theta.shape[-1]).sum(0), None


def jumprelu(
    z: Float[Tensor, "... d_sae"], theta: Float[Tensor, " d_sae"], eps: float = BANDWIDTH
) -> Float[Tensor, "... d_sae"]:
    """``z * H(z - theta)`` with the straight-through gradient for ``theta``.

    Example:
        >>> jumprelu(torch.tensor([0.5, 2.0]), torch.tensor([1.0, 1.0]))
        tensor([0., 2.])
    """
    return _JumpReLU.apply(z, theta, eps)


def step(
    z: Float[Tensor, "... d_sae"], theta: Float[Tensor, " d_sae"], eps: float = BANDWIDTH
) -> Float[Tensor, "... d_sae"]:
    """``H(z - theta)`` with the straight-through gradient for ``theta`` (none for ``z``).

    Example:
        >>> step(torch.tensor([0.5, 2.0]), torch.tensor([1.0, 1.0]))
        tensor([0., 1.])
    """
    return _Step.apply(z, theta, eps)


@register_architecture("jumprelu")
class JumpReLUSAE(SparseDictionary):
    """JumpReLU SAE or transcoder (sae-lens ``jumprelu`` / ``jumprelu_transcoder`` /
    ``jumprelu_skip_transcoder``); ``threshold`` is a ``(d_sae,)`` parameter.

    Example:
        >>> from mechkit.sae import SAEConfig
        >>> sae = JumpReLUSAE(SAEConfig(architecture="jumprelu", d_in=8, d_sae=32,
        ...                             hook_name="blocks.0.hook_resid_post"))
        >>> sae.threshold.shape, sae.encode(torch.randn(3, 8)).shape     # (d_sae,), (batch, d_sae)
        (torch.Size([32]), torch.Size([3, 32]))
    """

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.threshold = nn.Parameter(torch.zeros(cfg.d_sae, dtype=cfg.torch_dtype))

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator) -> None:
        super().init_weights(generator)
        self.threshold.fill_(INIT_THRESHOLD)

    def activate(self, pre: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_sae"]:
        # relu(z) * (z > theta), sae-lens's inference form (equal to z * H(z - theta), theta >= 0)
        return torch.relu(pre) * (pre > self.threshold).to(pre.dtype)

    def training_step(self, x, y, *, coefficient, dead, n_dead, aux_k, aux_coefficient):  # noqa: ARG002
        z = self._encoder_input(x) @ self.W_enc + self.b_enc  # (batch, d_sae)
        f = jumprelu(z, self.threshold)
        y_hat = self._skip_and_bias(x, f @ self.W_dec)
        mse = (y - y_hat).pow(2).sum(-1).mean()
        l0 = step(z, self.threshold).sum(-1).mean()
        return StepOutput(
            loss=mse + coefficient * l0,
            mse=mse.detach(),
            sparsity=l0.detach(),
            l0=l0.detach(),
            fired=(f != 0).any(0),
        )

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        super().after_optimizer_step()
        self.threshold.clamp_(min=1e-6)  # a negative threshold would let negative z through
