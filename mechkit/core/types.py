"""Types shared by the package: the model, metrics and sparse dictionaries.

``Model`` is TransformerLens's ``HookedTransformer``; the protocols say what mechkit reads from
a metric function and from a sparse dictionary (an SAE or transcoder), so that a user's own
objects work wherever they provide those members.
"""

from __future__ import annotations

from typing import Protocol, TypeAlias, runtime_checkable

from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

__all__ = ["Model", "MetricFunction", "SparseDictionaryLike", "Tokens", "Logits"]

Model: TypeAlias = HookedTransformer
"""The model every method takes: a TransformerLens ``HookedTransformer``."""

Tokens: TypeAlias = Int[Tensor, "batch pos"]
"""Token ids of a batch of prompts."""

Logits: TypeAlias = Float[Tensor, "batch pos d_vocab"]
"""The model's output logits."""


@runtime_checkable
class MetricFunction(Protocol):
    """Any function of the logits to a score: a scalar, or one value per prompt ``(batch,)``.

    A mechkit :class:`~mechkit.metrics.Metric` is one, and more: it can be restricted to a subset
    of the prompts (``select``), which lets methods split a batch, and it reads only the answer
    positions, which lets methods skip unembedding the rest.

    Example:
        >>> def last_logit(logits):  # (batch, pos, d_vocab) -> (batch,)
        ...     return logits[:, -1, 0]
        >>> isinstance(last_logit, MetricFunction), isinstance("logit_diff", MetricFunction)
        (True, False)
    """

    def __call__(self, logits: Tensor, /) -> Tensor: ...


@runtime_checkable
class SparseDictionaryLike(Protocol):
    """What mechkit reads from an SAE or transcoder: its encoder and decoder, and its decoder
    matrix ``W_dec`` of shape ``(d_sae, d_out)``. Where it reads or writes the model is said by
    ``cfg.hook_name`` (and ``cfg.output_hook_name`` for a transcoder), as in
    :class:`~mechkit.sae.SparseDictionary`.

    Example:
        >>> from mechkit.sae import SAEConfig, SparseDictionary
        >>> sae = SparseDictionary.from_config(SAEConfig(
        ...     architecture="relu", d_in=128, d_sae=64, hook_name="blocks.0.hook_resid_post"))
        >>> tuple(sae.W_dec.shape)  # (d_sae, d_out)
        (64, 128)
        >>> isinstance(sae, SparseDictionaryLike), isinstance(torch.nn.Linear(2, 2),
        ...                                                   SparseDictionaryLike)
        (True, False)
    """

    @property
    def W_dec(self) -> Tensor: ...  # noqa: N802  (the field's name in every SAE library)

    def encode(self, x: Tensor, /) -> Tensor: ...

    def decode(self, f: Tensor, /) -> Tensor: ...
