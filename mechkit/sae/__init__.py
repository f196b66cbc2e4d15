"""Sparse dictionaries: SAEs and transcoders, their activations, training and files.

- :class:`SAEConfig`, :class:`SparseDictionary` and one class per architecture
  (``ARCHITECTURES``: ``relu``, ``topk``, ``batchtopk``, ``jumprelu``), each usable as an SAE,
  a transcoder (``d_out``/``out_hook_name``) or a skip transcoder (``skip=True``).
- :func:`load_sae` / :func:`save_sae`: sae-lens's on-disk format, both ways.
- :class:`ActivationStore`: activations (or transcoder input/output pairs) of any hook over a
  token corpus, in shuffled batches, optionally cached to disk and reused across runs.
- :func:`train_sae` with :class:`TrainConfig`: seeded, resumable training.
- :func:`evaluate_sae`: L0, explained variance, MSE, cosine, and loss recovered when spliced in.
- :func:`splice` (a context manager; latents and the reconstruction error addressable) and
  :func:`patch_latents` (activation patching over latents); :func:`attribute_latents`
  (attribution patching over latents and the error term, Marks et al.) and
  :func:`feature_connections` (transcoder-to-transcoder weights, Dunefsky et al.);
  :func:`feature_circuit` (latents and error terms of several dictionaries as the nodes of a
  :class:`mechkit.CircuitGraph`, Marks et al.) and :func:`evaluate_feature_circuit`.
- :func:`feature_browser`: top contexts, activation histograms and promoted tokens, one HTML page.

Example (a small SAE on the toy model; the recipes in :mod:`mechkit.sae.recipes` train the
shipped SmolLM2 ones on ``sae_corpus_tokens``):

    >>> from mechkit.sae import ActivationStore, SAEConfig, TrainConfig, train_sae, load_sae
    >>> model = mk.load_model("attn-only-2l")
    >>> store = ActivationStore(model, "blocks.0.hook_resid_post",
    ...                         torch.randint(1, 500, (64, 32)), batch_size=256)
    >>> cfg = SAEConfig(architecture="topk", d_in=128, d_sae=512, k=16,
    ...                 hook_name="blocks.0.hook_resid_post", model_name="attn-only-2l")
    >>> sae, result = train_sae(cfg, store, TrainConfig(total_tokens=4096, progress=False))
    >>> result.to_dataframe().columns[:3].tolist()     # step, tokens, lr, loss, mse, l0, ...
    ['step', 'tokens', 'lr']
    >>> sae.encode(torch.randn(4, 128)).shape          # (batch, d_sae)
    torch.Size([4, 512])
    >>> load_sae("smollm2-135m-res12-topk").cfg.d_sae  # shipped dictionaries: by name
    2304
"""

from mechkit.errors import (  # defined in mechkit.errors; importable from here as before
    ActivationCacheError,
    SAEConfigError,
    SAEFileError,
    TrainConfigError,
)
from mechkit.sae import batchtopk, jumprelu, relu, topk  # noqa: F401  (register architectures)
from mechkit.sae.activations import ActivationStore, sae_corpus_tokens
from mechkit.sae.attribution import attribute_latents, feature_connections
from mechkit.sae.base import ARCHITECTURES, SAEConfig, SparseDictionary, load_sae, save_sae
from mechkit.sae.batchtopk import BatchTopKSAE
from mechkit.sae.browser import (
    FeatureContext,
    FeatureData,
    FeatureReport,
    collect_features,
    feature_browser,
)
from mechkit.sae.evaluate import SAEEvaluation, evaluate_sae
from mechkit.sae.feature_circuits import feature_circuit
from mechkit.sae.feature_evaluation import FeatureCircuitEvaluation, evaluate_feature_circuit
from mechkit.sae.jumprelu import JumpReLUSAE
from mechkit.sae.relu import ReLUSAE
from mechkit.sae.splice import SpliceHandle, patch_latents, splice
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
    "FeatureContext",
    "FeatureData",
    "FeatureReport",
    "collect_features",
    "feature_browser",
    "SAEEvaluation",
    "evaluate_sae",
    "SpliceHandle",
    "patch_latents",
    "splice",
    "attribute_latents",
    "feature_connections",
    "feature_circuit",
    "evaluate_feature_circuit",
    "FeatureCircuitEvaluation",
    "SAEConfigError",
    "TrainConfigError",
    "ActivationCacheError",
    "SAEFileError",
]
