"""The sparse-dictionary interface: one config, one module class per architecture, a registry.

A *sparse dictionary* maps an activation ``x`` (width ``d_in``) to latents
``f = act(x' @ W_enc + b_enc)`` (width ``d_sae``, mostly zero) and back to ``f @ W_dec + b_dec``
(width ``d_out``). An SAE reconstructs its own input (``d_out = d_in``, ``x' = x - b_dec`` when
``apply_b_dec_to_input``); a *transcoder* reads one hook (an MLP's input) and predicts another
(the MLP's output, ``d_out`` wide), and a *skip transcoder* adds a linear term ``x @ W_skip``.
The architectures differ only in ``act``:

- ``"relu"``: ReLU, trained with an L1 penalty weighted by decoder norms (Bricken et al. 2023).
- ``"topk"``: keep the ``k`` largest pre-activations per token (Gao et al. 2024).
- ``"batchtopk"``: keep the ``k * batch`` largest over a batch when training; at inference a
  JumpReLU with the threshold learnt during training (Bussmann et al. 2024).
- ``"jumprelu"``: ``z * (z > threshold)`` with a learnt per-latent threshold (Rajamanoharan et
  al. 2024).

Each architecture lives in its own module (``mechkit/sae/topk.py`` ...) and registers its class
under its key with :func:`register_architecture`; a duplicate key is an error.

    >>> model = mk.load_model("attn-only-2l")                       # d_model 128
    >>> cfg = SAEConfig(architecture="topk", d_in=128, d_sae=1024, k=32,
    ...                 hook_name="blocks.1.hook_resid_post")
    >>> sae = SparseDictionary.from_config(cfg)        # a TopKSAE, weights initialised
    >>> _, cache = model.run_with_cache(torch.tensor([[1, 2, 3, 4, 5]]))
    >>> x = cache["blocks.1.hook_resid_post"]          # (batch, pos, d_model)
    >>> sae.encode(x).shape                            # (batch, pos, d_sae)
    torch.Size([1, 5, 1024])
    >>> sae(x).shape                                   # (batch, pos, d_out)
    torch.Size([1, 5, 128])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn

from mechkit.errors import SAEConfigError, ShapeError
from mechkit.sae.config import ARCHITECTURES, SAEConfig, architecture_class, register_architecture
from mechkit.sae.io import read_sae, write_sae

__all__ = [
    "ARCHITECTURES",
    "SAEConfig",
    "SparseDictionary",
    "SAEConfigError",
    "register_architecture",
    "load_sae",
    "save_sae",
]


@dataclasses.dataclass(eq=False)
class StepOutput:
    """What one training step of an architecture computes (tensors, no host sync).

    Attributes:
        loss: the scalar to minimise.
        mse: squared error summed over the output width, averaged over rows.
        sparsity: the sparsity penalty (relu, jumprelu) or AuxK loss (topk, batchtopk),
            before its coefficient.
        l0: latents active per row, averaged.
        fired: ``(d_sae,)`` bool, the latents that fired on some row of the batch.
    """

    loss: Tensor
    mse: Tensor
    sparsity: Tensor
    l0: Tensor
    fired: Tensor


class SparseDictionary(nn.Module):
    """An SAE or transcoder; subclasses (one per architecture) define the activation.

    Parameters: ``W_enc`` (d_in, d_sae), ``b_enc`` (d_sae,), ``W_dec`` (d_sae, d_out), ``b_dec``
    (d_out,); ``threshold`` (d_sae,) for ``jumprelu``/``batchtopk``; ``W_skip`` (d_in, d_out)
    for skip transcoders. Build one with :meth:`from_config` (initialised weights) or
    :func:`load_sae`.

    Example:
        >>> cfg = SAEConfig(architecture="relu", d_in=8, d_sae=32, hook_name="blocks.0.mlp")
        >>> sae = SparseDictionary.from_config(cfg)
        >>> sae(torch.randn(4, 8)).shape
        torch.Size([4, 8])
    """

    architecture: ClassVar[str] = ""
    cfg: SAEConfig

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        if cfg.architecture != type(self).architecture:
            raise SAEConfigError(
                f"Expected a config with architecture {type(self).architecture!r} for "
                f"{type(self).__name__}; got {cfg.architecture!r}. Hint: use "
                "SparseDictionary.from_config(cfg) to pick the class."
            )
        self.cfg = cfg
        dtype, w = cfg.torch_dtype, cfg.out_width
        self.W_enc = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_sae, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))
        self.W_dec = nn.Parameter(torch.zeros(cfg.d_sae, w, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(w, dtype=dtype))
        if cfg.skip:
            self.W_skip = nn.Parameter(torch.zeros(cfg.d_in, w, dtype=dtype))

    # -- construction --------------------------------------------------------------------------

    @staticmethod
    def from_config(cfg: SAEConfig, *, seed: int | None = 0) -> SparseDictionary:
        """A dictionary of ``cfg.architecture``'s class with freshly initialised weights.

        Decoder rows are random unit vectors, the encoder starts as the decoder's transpose
        (for SAEs; Conerly et al. 2024), biases at zero. ``seed=None`` leaves all-zero weights.
        """
        cls = architecture_class(cfg.architecture)
        sae = cls(cfg)
        if seed is not None:
            sae.init_weights(torch.Generator().manual_seed(seed))
        return sae

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator) -> None:
        """Initialise the weights in place from ``generator`` (see :meth:`from_config`)."""
        cfg = self.cfg
        w_dec = torch.randn(cfg.d_sae, cfg.out_width, generator=generator)
        w_dec /= w_dec.norm(dim=-1, keepdim=True)
        self.W_dec.copy_(w_dec)
        if cfg.d_out is None or cfg.d_out == cfg.d_in:
            self.W_enc.copy_(w_dec.T)
        else:
            w_enc = torch.randn(cfg.d_in, cfg.d_sae, generator=generator)
            self.W_enc.copy_(w_enc / w_enc.norm(dim=0, keepdim=True))
        self.b_enc.zero_()
        self.b_dec.zero_()
        if cfg.skip:
            self.W_skip.zero_()

    # -- the interface -------------------------------------------------------------------------

    @property
    def is_transcoder(self) -> bool:
        """True for transcoders and skip transcoders."""
        return self.cfg.is_transcoder

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    def _check_input(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.ndim == 0 or x.shape[-1] != self.cfg.d_in:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ShapeError(
                f"Expected input of shape (..., {self.cfg.d_in}) (d_in of the dictionary on "
                f"{self.cfg.hook_name!r}); got {shape}. Hint: is this the activation of that "
                "hook, and of the model the dictionary was trained on?"
            )
        return x.to(self.W_enc.dtype)

    def pre_activations(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """``(x - b_dec) @ W_enc + b_enc`` (``b_dec`` subtracted only if apply_b_dec_to_input)."""
        x = self._check_input(x)
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activate(self, pre: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_sae"]:
        """The architecture's activation function, applied to pre-activations (inference)."""
        raise NotImplementedError

    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """Latent activations of ``x``."""
        return self.activate(self.pre_activations(x))

    def decode(self, f: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_out"]:
        """``f @ W_dec + b_dec`` (no skip term)."""
        if not isinstance(f, Tensor) or f.ndim == 0 or f.shape[-1] != self.cfg.d_sae:
            shape = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
            raise ShapeError(
                f"Expected latents of shape (..., {self.cfg.d_sae}); got {shape}. Hint: decode "
                "takes encode's output."
            )
        return f.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def skip_term(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_out"]:
        """``x @ W_skip`` for skip transcoders, zero otherwise."""
        x = self._check_input(x)
        if not self.cfg.skip:
            return x.new_zeros(*x.shape[:-1], self.cfg.out_width)
        return x @ self.W_skip

    def forward(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_out"]:
        """``decode(encode(x))``, plus ``x @ W_skip`` for skip transcoders."""
        out = self.decode(self.encode(x))
        if self.cfg.skip:
            out = out + self._check_input(x) @ self.W_skip
        return out

    def extra_repr(self) -> str:
        cfg = self.cfg
        k = f", k={cfg.k}" if cfg.k is not None else ""
        out = f", d_out={cfg.d_out}, out_hook={cfg.out_hook_name!r}" if cfg.d_out else ""
        skip = ", skip=True" if cfg.skip else ""
        return f"d_in={cfg.d_in}, d_sae={cfg.d_sae}{k}, hook={cfg.hook_name!r}{out}{skip}"

    # -- training (used by mechkit.sae.training) ----------------------------------------------

    #: True when training keeps decoder rows at unit norm (the sparsity term needs it).
    unit_norm_decoder: ClassVar[bool] = True

    def training_step(
        self,
        x: Float[Tensor, "batch d_in"],
        y: Float[Tensor, "batch d_out"],
        *,
        coefficient: float,
        dead: Bool[Tensor, " d_sae"] | None,
        n_dead: int,
        aux_k: int,
        aux_coefficient: float,
    ) -> StepOutput:
        """Loss of one batch; ``y`` is the target (``x`` itself for an SAE).

        ``coefficient`` weighs the sparsity penalty (relu, jumprelu; already warmed up),
        ``dead`` is the ``(d_sae,)`` mask of dead latents (``n_dead`` of them) for AuxK.
        """
        raise NotImplementedError

    def _skip_and_bias(self, x: Tensor, y_hat: Tensor) -> Tensor:
        y_hat = y_hat + self.b_dec
        return y_hat + x @ self.W_skip if self.cfg.skip else y_hat

    def _encoder_input(self, x: Tensor) -> Tensor:
        return x - self.b_dec if self.cfg.apply_b_dec_to_input else x

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Re-impose constraints after a step (unit decoder rows where the method wants them)."""
        if self.unit_norm_decoder:
            self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Remove the gradient component along each unit decoder row (it only changes norms)."""
        if self.unit_norm_decoder and self.W_dec.grad is not None:
            w, g = self.W_dec, self.W_dec.grad
            g.sub_((g * w).sum(-1, keepdim=True) * w)

    def calibrate(self, batches: Iterable[Any], n_batches: int) -> None:
        """After training, with the final weights (no-op; BatchTopK sets its threshold)."""

    @torch.no_grad()
    def fold_input_scale(self, s_in: float, s_out: float) -> None:
        """Fold training-time scalings (inputs ``* s_in``, targets ``* s_out``) into the
        weights, so the dictionary takes and returns raw activations with the same latents."""
        self.W_enc.mul_(s_in)
        if self.cfg.skip:
            self.W_skip.mul_(s_in / s_out)
        self.W_dec.div_(s_out)
        self.b_dec.div_(s_out)

    # -- saving --------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write this dictionary to folder ``path`` in sae-lens's format (see :func:`save_sae`)."""
        return save_sae(self, path)


def load_sae(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: str | None = None,
    hook_name: str | None = None,
) -> SparseDictionary:
    """Read a folder in sae-lens's format (``cfg.json`` + ``sae_weights.safetensors``), or a
    dictionary shipped with mechkit by its name (``"smollm2-135m-res12-topk"``; see
    :func:`mechkit.sae.io.shipped_saes`), which works from an installed wheel as from a checkout.

    Reads what :func:`save_sae` writes and what sae-lens's ``SAE.save_model`` writes for the
    architectures ``standard``, ``topk``, ``jumprelu``, ``transcoder``, ``skip_transcoder``,
    ``jumprelu_transcoder`` and ``jumprelu_skip_transcoder``. ``dtype`` overrides the stored
    one; ``hook_name`` names the input hook for foreign files that did not record it.

    Example:
        >>> sae = load_sae("smollm2-135m-res12-topk")  # or a folder's path
        >>> sae.cfg.hook_name
        'blocks.12.hook_resid_post'
    """
    return read_sae(path, device=device, dtype=dtype, hook_name=hook_name)


def save_sae(sae: SparseDictionary, path: str | Path, *, weights_dtype: str | None = None) -> Path:
    """Write ``sae`` to folder ``path`` in sae-lens's format, each file atomically.

    ``weights_dtype`` (e.g. ``"bfloat16"``) stores the tensors in a smaller dtype while
    ``cfg.json`` keeps ``sae.cfg.dtype``, so loaders (ours and sae-lens's) cast back up.
    Returns the folder.

    Example:
        >>> import tempfile, pathlib
        >>> sae = SparseDictionary.from_config(SAEConfig(
        ...     architecture="topk", d_in=128, d_sae=256, k=8,
        ...     hook_name="blocks.0.hook_resid_post"))
        >>> folder = pathlib.Path(tempfile.mkdtemp()) / "my_sae"
        >>> save_sae(sae, folder) == folder, load_sae(folder).cfg == sae.cfg
        (True, True)
    """
    return write_sae(sae, path, weights_dtype=weights_dtype)
