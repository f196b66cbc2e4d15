"""Steering with sparse-dictionary latents: a latent's decoder direction as a steering vector.

Templeton et al. (2024, "Scaling Monosemanticity") steer a model by adding a multiple of an SAE
feature's decoder direction to the residual stream ("feature steering"); Neuronpedia and
sae-lens do the same. :func:`sae_latent_vector` builds that direction as a
:class:`~mechkit.steering.SteeringVector`, so every steering tool (``steer``, ``generate``,
``steering_sweep``) takes it. The vector is what one unit of each latent's activation adds to the
reconstruction (``decode(e_i) - decode(0)``, so SAEs that rescale by decoder norm are handled),
and a coefficient ``c`` therefore adds ``c`` to the latent's activation: steering with it equals
``mk.splice(model, sae)`` with ``spliced.add([i], c)`` (tested).

Example:
    >>> sae = mk.sae.SparseDictionary.from_config(mk.sae.SAEConfig(
    ...     architecture="relu", d_in=128, d_sae=8, hook_name="blocks.1.hook_resid_pre"))
    >>> vec = mk.steering.sae_latent_vector(sae, 3)  # latent 3's decoder direction, (d_model,)
    >>> vec.hook_name, vec.vector.shape
    ('blocks.1.hook_resid_pre', torch.Size([128]))
    >>> model = mk.load_model("attn-only-2l")
    >>> with mk.steer(model, vec, coefficient=8.0):    # latent 3 raised by 8 everywhere
    ...     logits = model(torch.tensor([[1, 2, 3]]))
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

from mechkit.errors import InvalidSiteError, InvalidTypeError, ShapeError
from mechkit.sae.splice import check_latents, sae_sites
from mechkit.steering.vectors import SteeringVector

__all__ = ["sae_latent_vector"]

# where a dictionary's output can be added to the residual stream (a transcoder writing the MLP
# output adds to the stream the block passes on)
_SITES = {
    "hook_resid_pre": "resid_pre",
    "hook_resid_mid": "resid_mid",
    "hook_resid_post": "resid_post",
    "hook_mlp_out": "resid_post",
    "hook_attn_out": "resid_mid",
}


@torch.no_grad()
def sae_latent_vector(
    sae: Any,
    latents: int | Sequence[int],
    *,
    weights: Sequence[float] | None = None,
) -> SteeringVector:
    """The residual-stream direction that raises SAE (or transcoder) latents by one unit each.

    Args:
        sae: an SAE on a residual-stream hook, or a dictionary writing ``hook_mlp_out`` or
            ``hook_attn_out`` (its direction is then added after the block or the attention).
        latents: a latent index, or several (their directions summed).
        weights: one weight per latent (default 1 each): the vector is
            ``sum_i weights[i] * (decode(e_i) - decode(0))``.

    Returns:
        A ``(d_model,)`` :class:`SteeringVector` with ``method="sae_latent"`` and the latents in
        its metadata.

    Example:
        >>> from mechkit.sae import SAEConfig, SparseDictionary
        >>> sae = SparseDictionary.from_config(SAEConfig(
        ...     architecture="relu", d_in=128, d_sae=64, hook_name="blocks.1.hook_resid_pre"))
        >>> vec = mk.steering.sae_latent_vector(sae, [3, 5], weights=[1.0, -2.0])
        >>> vec.layer, vec.site, vec.method, vec.vector.shape  # (d_model,)
        (1, 'resid_pre', 'sae_latent', torch.Size([128]))
        >>> torch.allclose(vec.vector, sae.W_dec[3] - 2 * sae.W_dec[5])  # a linear decoder
        True
    """
    sites = sae_sites(sae)
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", sites.out_hook)
    if match is None or match.group(2) not in _SITES:
        raise InvalidSiteError(
            f"Expected a dictionary writing the residual stream, the MLP output or the attention "
            f"output (hooks {sorted(_SITES)}); got one writing {sites.out_hook!r}. Hint: "
            "steering vectors live in the residual stream."
        )
    if latents is None:
        raise InvalidTypeError("Expected a latent index or a list of them; got None.")
    index = check_latents(latents, sites.d_sae)
    assert index is not None  # None only for latents=None, refused above
    w = torch.ones(len(index)) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    if w.shape != (len(index),):
        raise ShapeError(
            f"Expected one weight per latent ({len(index)}); got weights of shape {tuple(w.shape)}."
        )
    f = torch.zeros(sites.d_sae, dtype=sae.W_dec.dtype, device=sae.W_dec.device)
    f.index_add_(0, index.to(f.device), w.to(f))
    vector = sae.decode(f[None])[0] - sae.decode(torch.zeros_like(f)[None])[0]  # (d_model,)
    layer, hook = int(match.group(1)), match.group(2)
    return SteeringVector(
        vector.float().cpu(),
        layer=layer,
        site=_SITES[hook],
        method="sae_latent",
        metadata={
            "latents": index.tolist(),
            "weights": w.tolist(),
            "sae_hook": sites.out_hook,
            "model": getattr(sae.cfg, "model_name", None),
        },
    )
