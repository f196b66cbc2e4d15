"""Sparse dictionaries: SAEs and transcoders, their activations, training and files.

- :class:`SAEConfig`, :class:`SparseDictionary` and one class per architecture
  (``ARCHITECTURES``: ``relu``, ``topk``, ``batchtopk``, ``jumprelu``), each usable as an SAE,
  a transcoder (``d_out``/``out_hook_name``) or a skip transcoder (``skip=True``).
- :func:`load_sae` / :func:`save_sae`: sae-lens's on-disk format, both ways.
- :class:`ActivationStore`: activations (or transcoder input/output pairs) of any hook over a
  token corpus, in shuffled batches, optionally cached to disk and reused across runs.
- :func:`train_sae` with :class:`TrainConfig`: seeded, resumable training.

    >>> import mechkit as mk
    >>> from mechkit.sae import ActivationStore, SAEConfig, TrainConfig, train_sae
    >>> model = mk.load_model("attn-only-2l")
    >>> store = ActivationStore(model, "blocks.1.hook_resid_pre", mk.corpus_tokens(model),
    ...                         batch_size=1024)
    >>> cfg = SAEConfig(architecture="topk", d_in=128, d_sae=1024, k=16,
    ...                 hook_name="blocks.1.hook_resid_pre")
    >>> sae, result = train_sae(cfg, store, TrainConfig(total_tokens=200_000))
    >>> result.to_dataframe().tail(1)        # step, tokens, loss, mse, l0, explained_variance
    >>> sae.encode(torch.randn(4, 128)).shape          # (batch, d_sae)
    torch.Size([4, 1024])
"""

from mechkit.sae import batchtopk, jumprelu, relu, topk  # noqa: F401  (register architectures)
from mechkit.sae.activations import ActivationStore, sae_corpus_tokens
from mechkit.sae.base import ARCHITECTURES, SAEConfig, SparseDictionary, load_sae, save_sae
from mechkit.sae.batchtopk import BatchTopKSAE
from mechkit.sae.jumprelu import JumpReLUSAE
from mechkit.sae.relu import ReLUSAE
from mechkit.sae.topk import TopKSAE
from mechkit.sae.training import TrainConfig, TrainedSAE, TrainResult, train_sae

__all__ = [
    "ARCHITECTURES",
    "SAEConfig",
    "SparseDictionary",
    "ReLUSAE",
    "TopKSAE",
    "BatchTopKSAE",
    "JumpReLUSAE",
    "load_sae",
    "save_sae",
    "ActivationStore",
    "sae_corpus_tokens",
    "TrainConfig",
    "TrainResult",
    "TrainedSAE",
    "train_sae",
]
