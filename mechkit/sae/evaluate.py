"""Evaluating a sparse dictionary (SAE or transcoder) on held-out text.

Two kinds of numbers (Bricken et al. 2023; Gao et al. 2024; sae-lens's evals):

* **Reconstruction**, on the activations themselves: L0 (latents firing per token), MSE (per
  element), explained variance ``1 - E||y - y_hat||^2 / E||y - E[y]||^2`` (``y`` the activation
  the dictionary reconstructs: its input for an SAE, the ``out_hook_name`` activation for a
  transcoder), and the mean cosine similarity of ``y`` and ``y_hat``.
* **Downstream**, with the reconstruction spliced in place of ``y``: next-token cross-entropy
  and the KL divergence from the clean model's next-token distribution, against two baselines
  that replace ``y`` by zeros (zero ablation) or by its mean over the evaluated tokens (mean
  ablation). ``CE recovered = (CE_ablated - CE_sae) / (CE_ablated - CE_clean)``: 1 is the clean
  model, 0 no better than the ablation; ``KL recovered = 1 - KL_sae / KL_ablated``.

Plus each latent's firing frequency: dead latents never fire on the evaluated tokens, dense
ones fire on more than ``dense_threshold`` of them.

**Which positions count.** By default (``exclude="first"``) position 0 of every sequence is
left out: models use the first position as an attention sink, whether it holds BOS or (in
SmolLM2, which prepends none) an ordinary token, and its activations have outlier norms that
dominate MSE and explained variance and are not what a dictionary is for (measured on SmolLM2's
layer-15 residual, 64 sequences of 128 tokens: those 64 positions moved the MSE of one SAE from
38 to 5,835). Left-out positions (and padding, given a ``mask``) are neither measured nor
replaced: splicing and ablations edit only counted positions, and CE/KL are read only at counted
positions (CE where the next token is real too). ``exclude="bos"`` leaves out position 0 only
when it holds the BOS token; ``"none"`` counts everything.

Without tokens, :func:`evaluate_sae` uses the held-out split of the default corpus.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mechkit.core.progress import progress_bar
from mechkit.core.results import rank
from mechkit.core.types import Model, SparseDictionaryLike
from mechkit.corpus import corpus_tokens
from mechkit.errors import (
    EmptyDatasetError,
    InvalidArgumentError,
    ShapeError,
    check_batch_size,
    check_choice,
)
from mechkit.hook_scope import hook_scope
from mechkit.lens.logit_lens import decode_residual
from mechkit.sae.splice import SAESites, as_rows, check_hooks, hook_layer, reconstruct, sae_sites
from mechkit.tokens import bos_token_id, token_batch

__all__ = [
    "SAEEvaluation",
    "evaluate_sae",
    "counted_positions",
    "evaluation_tokens",
    "run_until",
]

Exclude = Literal["bos", "first", "none"]


@dataclasses.dataclass(frozen=True, eq=False)
class SAEEvaluation:
    """The figures of :func:`evaluate_sae`.

    Attributes:
        hook_name, out_hook_name: where the dictionary reads and what it reconstructs (equal
            for an SAE).
        n_sequences, n_tokens: the prompts evaluated, and the positions counted.
        l0: mean number of latents firing (non-zero) per token.
        mse: mean squared error per element, ``E[(y - y_hat)^2]``.
        explained_variance: ``1 - E||y - y_hat||^2 / E||y - E[y]||^2``.
        cosine: mean cosine similarity of ``y`` and ``y_hat`` per token.
        ce_clean, ce_sae, ce_zero, ce_mean: next-token cross-entropy (nats per token) of the
            model, with the reconstruction spliced in, with ``y`` zero-ablated, mean-ablated.
        kl_sae, kl_zero, kl_mean: KL(clean || run) of the next-token distributions.
        frequency: ``(d_sae,)`` fraction of counted tokens each latent fires on.
        dense_threshold: frequency above which a latent counts as dense.
        exclude: which positions were left out (see the module docstring).
        seconds: wall time of the evaluation.

    Example:
        >>> from mechkit.sae import SAEConfig, SparseDictionary
        >>> model = mk.load_model("attn-only-2l")
        >>> sae = SparseDictionary.from_config(SAEConfig(
        ...     architecture="relu", d_in=128, d_sae=64, hook_name="blocks.0.hook_resid_post"))
        >>> ev = mk.evaluate_sae(model, sae, torch.randint(1, 500, (4, 16)), progress=False)
        >>> sorted(ev.metrics())[:3], len(ev.top(5))       # the 5 densest latents
        (['ce_clean', 'ce_mean', 'ce_recovered'], 5)
    """

    hook_name: str
    out_hook_name: str
    n_sequences: int
    n_tokens: int
    l0: float
    mse: float
    explained_variance: float
    cosine: float
    ce_clean: float
    ce_sae: float
    ce_zero: float
    ce_mean: float
    kl_sae: float
    kl_zero: float
    kl_mean: float
    frequency: Float[Tensor, " d_sae"]
    dense_threshold: float
    exclude: str
    seconds: float

    @property
    def ce_recovered(self) -> float:
        """``(CE_zero - CE_sae) / (CE_zero - CE_clean)``: loss recovered against zero ablation."""
        return _ratio(self.ce_zero - self.ce_sae, self.ce_zero - self.ce_clean)

    @property
    def ce_recovered_mean(self) -> float:
        """``(CE_mean - CE_sae) / (CE_mean - CE_clean)``: against mean ablation."""
        return _ratio(self.ce_mean - self.ce_sae, self.ce_mean - self.ce_clean)

    @property
    def kl_recovered(self) -> float:
        """``1 - KL_sae / KL_zero``."""
        return _ratio(self.kl_zero - self.kl_sae, self.kl_zero)

    @property
    def kl_recovered_mean(self) -> float:
        """``1 - KL_sae / KL_mean``."""
        return _ratio(self.kl_mean - self.kl_sae, self.kl_mean)

    @property
    def d_sae(self) -> int:
        return int(self.frequency.shape[0])

    @property
    def dead_latents(self) -> Int[Tensor, " n_dead"]:
        """Indices of latents that never fired on the evaluated tokens."""
        return (self.frequency == 0).nonzero().flatten()

    @property
    def dense_latents(self) -> Int[Tensor, " n_dense"]:
        """Indices of latents firing on more than ``dense_threshold`` of the tokens."""
        return (self.frequency > self.dense_threshold).nonzero().flatten()

    @property
    def n_dead(self) -> int:
        return int(self.dead_latents.numel())

    @property
    def n_dense(self) -> int:
        return int(self.dense_latents.numel())

    def metrics(self) -> dict[str, float]:
        """Every scalar figure by name, in display order."""
        return {
            "l0": self.l0,
            "mse": self.mse,
            "explained_variance": self.explained_variance,
            "cosine": self.cosine,
            "ce_clean": self.ce_clean,
            "ce_sae": self.ce_sae,
            "ce_zero": self.ce_zero,
            "ce_mean": self.ce_mean,
            "ce_recovered": self.ce_recovered,
            "ce_recovered_mean": self.ce_recovered_mean,
            "kl_sae": self.kl_sae,
            "kl_zero": self.kl_zero,
            "kl_mean": self.kl_mean,
            "kl_recovered": self.kl_recovered,
            "kl_recovered_mean": self.kl_recovered_mean,
            "dead_latents": float(self.n_dead),
            "dense_latents": float(self.n_dense),
            "d_sae": float(self.d_sae),
            "n_tokens": float(self.n_tokens),
            "seconds": self.seconds,
        }

    def top(self, n: int = 10, *, absolute: bool = True) -> list[tuple[int, float]]:
        """The ``n`` latents that fire most often, ``(latent, frequency)``, by the rule of
        :func:`mechkit.core.rank` (frequencies are never negative, so ``absolute`` changes
        nothing)."""
        return rank(list(range(self.d_sae)), self.frequency, n, absolute=absolute)

    def to_dataframe(self) -> Any:
        """A pandas DataFrame with one row per figure: ``metric, value``."""
        import pandas as pd

        rows = [{"metric": k, "value": v} for k, v in self.metrics().items()]
        return pd.DataFrame(rows, columns=["metric", "value"])

    def density_dataframe(self) -> Any:
        """One row per latent: ``latent, frequency, log10_frequency`` (-inf for dead ones)."""
        import pandas as pd

        freq = self.frequency.double()
        return pd.DataFrame(
            {
                "latent": range(self.d_sae),
                "frequency": freq.tolist(),
                "log10_frequency": freq.log10().tolist(),
            }
        )

    def plot(self) -> Any:
        """A plotly histogram of the latents' log10 firing frequency (dead latents counted in
        the title; the dotted line is the dense threshold)."""
        import plotly.graph_objects as go

        freq = self.frequency.double()
        alive = freq[freq > 0].log10()
        fig = go.Figure(go.Histogram(x=alive.numpy(), nbinsx=60, name="latents"))
        fig.add_vline(
            x=math.log10(self.dense_threshold),
            line_dash="dot",
            annotation_text=f"dense > {self.dense_threshold:g}",
        )
        fig.update_layout(
            title=(
                f"Latent density, {self.hook_name}: {self.n_dead} dead of {self.d_sae}, "
                f"{self.n_dense} dense ({self.n_tokens} tokens)"
            ),
            xaxis_title="log10 firing frequency",
            yaxis_title="latents",
            bargap=0.02,
        )
        return fig

    def summary(self) -> str:
        """A few lines of text with the main figures."""
        site = (
            self.hook_name
            if self.out_hook_name == self.hook_name
            else (f"{self.hook_name} -> {self.out_hook_name}")
        )
        return "\n".join(
            [
                f"SAE evaluation at {site}: {self.n_tokens} tokens of {self.n_sequences} "
                f"sequences (excluded: {self.exclude}), {self.seconds:.1f} s",
                f"  L0 {self.l0:.2f}   explained variance {self.explained_variance:.4f}   "
                f"MSE {self.mse:.4g}   cosine {self.cosine:.4f}",
                f"  CE clean {self.ce_clean:.4f}  spliced {self.ce_sae:.4f}  zero-abl "
                f"{self.ce_zero:.4f}  mean-abl {self.ce_mean:.4f}",
                f"  CE recovered {self.ce_recovered:.4f} (vs zero)  {self.ce_recovered_mean:.4f} "
                "(vs mean)",
                f"  KL spliced {self.kl_sae:.4f}  zero-abl {self.kl_zero:.4f}  mean-abl "
                f"{self.kl_mean:.4f}; recovered {self.kl_recovered:.4f} / "
                f"{self.kl_recovered_mean:.4f}",
                f"  dead latents {self.n_dead} / {self.d_sae}   dense (> {self.dense_threshold:g}) "
                f"{self.n_dense}",
            ]
        )

    def __repr__(self) -> str:
        return (
            f"SAEEvaluation({self.out_hook_name}: L0={self.l0:.2f}, "
            f"EV={self.explained_variance:.4f}, "
            f"CE recovered={self.ce_recovered:.4f}, KL={self.kl_sae:.4f}, dead={self.n_dead}/"
            f"{self.d_sae}, tokens={self.n_tokens})"
        )


_START_CACHE_BYTES = 1024**3
"""Residual streams entering the dictionary's block kept from the first pass to the second (the
rest are recomputed): 1 GiB, e.g. 450k tokens of a 576-wide float32 model."""


def _ratio(num: float, den: float) -> float:
    return float("nan") if den == 0 else num / den


# ----------------------------------------------------------------------------------------------
# Positions
# ----------------------------------------------------------------------------------------------


def counted_positions(
    model: Model,
    tokens: Int[Tensor, "batch pos"],
    *,
    exclude: Exclude = "first",
    mask: Bool[Tensor, "batch pos"] | None = None,
) -> Bool[Tensor, "batch pos"]:
    """``(batch, pos)`` True where a position counts: real (``mask``) and not excluded.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> counted_positions(model, torch.tensor([[1, 2, 3]])).tolist()   # position 0 left out
        [[False, True, True]]
    """
    check_choice("exclude", exclude, ["bos", "first", "none"])
    counted = (
        torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device)
        if mask is None
        else mask.to(tokens.device, torch.bool).clone()
    )
    if mask is not None and mask.shape != tokens.shape:
        raise ShapeError(
            f"Expected a mask shaped like the tokens {tuple(tokens.shape)}; got "
            f"{tuple(mask.shape)}."
        )
    if exclude == "first":
        counted[:, 0] = False
    elif exclude == "bos":
        counted[:, 0] &= tokens[:, 0] != bos_token_id(model)
    return counted


# ----------------------------------------------------------------------------------------------
# The evaluation
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Sums:
    """Running float64 sums over counted tokens."""

    n: int = 0
    l0: float = 0.0
    sq_err: float = 0.0
    sq_norm: float = 0.0
    cos: float = 0.0
    total: Tensor | None = None  # (d_out,) sum of y
    fired: Tensor | None = None  # (d_sae,) counts


@torch.no_grad()
def evaluate_sae(
    model: Model,
    sae: SparseDictionaryLike,
    tokens: Any = None,
    *,
    batch_size: int = 8,
    exclude: Exclude = "first",
    mask: Bool[Tensor, "batch pos"] | None = None,
    dense_threshold: float = 0.1,
    progress: bool = True,
) -> SAEEvaluation:
    """Reconstruction and spliced-loss figures of an SAE or transcoder on held-out tokens.

    Two passes over ``tokens``: the first runs the model up to the dictionary's block and
    measures reconstruction (and the mean activation for mean ablation); the second runs the
    rest of the model four times per batch (clean, spliced, zero- and mean-ablated) from the
    residual stream entering that block, kept from the first pass (up to 1 GiB of it).

    Args:
        model: a HookedTransformer.
        sae: an SAE or transcoder (``cfg.hook_name``; ``cfg.out_hook_name`` for transcoders).
        tokens: ``(batch, pos)`` token ids, or texts; None for
            ``mk.corpus.corpus_tokens(model, seq_len=128, split="test", max_sequences=64)``.
        batch_size: sequences per forward pass.
        exclude: ``"first"``, ``"bos"`` or ``"none"``: which positions are left out (see the
            module docstring).
        mask: ``(batch, pos)`` True at real tokens (right padding); None: all are real.
        dense_threshold: firing frequency above which a latent is dense.
        progress: show a progress bar.

    Returns:
        An :class:`SAEEvaluation`.

    Example:
        >>> from mechkit.sae import SAEConfig, SparseDictionary
        >>> model = mk.load_model("attn-only-2l")
        >>> sae = SparseDictionary.from_config(SAEConfig(
        ...     architecture="relu", d_in=128, d_sae=64, hook_name="blocks.0.hook_resid_post"))
        >>> tokens = torch.randint(1, 500, (8, 16), generator=torch.Generator().manual_seed(0))
        >>> ev = mk.evaluate_sae(model, sae, tokens, batch_size=4, progress=False)
        >>> ev.frequency.shape, isinstance(ev.n_dead, int)                 # (d_sae,)
        (torch.Size([64]), True)
    """
    start_time = time.perf_counter()
    check_choice("exclude", exclude, ["bos", "first", "none"])
    sites = sae_sites(sae)
    check_hooks(model, sites)
    tokens, mask = evaluation_tokens(model, tokens, mask)
    size = check_batch_size(batch_size) or max(1, tokens.shape[0])  # None: one pass
    if not 0 <= dense_threshold <= 1:
        raise InvalidArgumentError(f"Expected dense_threshold in [0, 1]; got {dense_threshold}.")
    counted = counted_positions(model, tokens, exclude=exclude, mask=mask)
    if not bool(counted.any()):
        raise EmptyDatasetError(
            f"Expected some positions to evaluate; all are excluded (exclude={exclude!r}, "
            f"tokens {tuple(tokens.shape)}). Hint: use longer sequences or exclude='none'."
        )
    device = model.cfg.device
    batches = [slice(i, i + size) for i in range(0, tokens.shape[0], size)]
    bar = progress_bar(2 * len(batches), "evaluating SAE", enabled=progress, unit="batch")
    try:
        sums = _Sums()
        starts: list[Tensor | None] = []  # kept for the second pass while they fit the budget
        kept_bytes = 0
        for rows in batches:
            start = _reconstruction_batch(
                model, sae, sites, tokens[rows].to(device), counted[rows].to(device), sums
            )
            size = 0 if start is None else start.numel() * start.element_size()
            keep = start is not None and kept_bytes + size <= _START_CACHE_BYTES
            kept_bytes += size if keep else 0
            starts.append(start if keep else None)
            bar.update(1)
        assert sums.total is not None and sums.fired is not None
        mean_y = (sums.total / sums.n).float()
        losses = {
            k: 0.0
            for k in ("ce_clean", "ce_sae", "ce_zero", "ce_mean", "kl_sae", "kl_zero", "kl_mean")
        }
        n_ce = n_kl = 0
        for i, rows in enumerate(batches):
            part, c_ce, c_kl = _loss_batch(
                model,
                sae,
                sites,
                tokens[rows].to(device),
                mask[rows].to(device),
                counted[rows].to(device),
                mean_y,
                starts[i],
            )
            starts[i] = None  # free it
            for k, v in part.items():
                losses[k] += v
            n_ce, n_kl = n_ce + c_ce, n_kl + c_kl
            bar.update(1)
    finally:
        bar.close()
    if n_ce == 0:
        raise EmptyDatasetError(
            "Expected some counted position followed by a real token to score cross-entropy; "
            "got none. Hint: use sequences longer than one token."
        )
    variance = sums.sq_norm - float((sums.total**2).sum()) / sums.n  # sum over tokens
    d_out = int(sums.total.shape[0])
    return SAEEvaluation(
        hook_name=sites.in_hook,
        out_hook_name=sites.out_hook,
        n_sequences=int(tokens.shape[0]),
        n_tokens=sums.n,
        l0=sums.l0 / sums.n,
        mse=sums.sq_err / (sums.n * d_out),
        explained_variance=1.0 - sums.sq_err / variance if variance > 0 else float("nan"),
        cosine=sums.cos / sums.n,
        ce_clean=losses["ce_clean"] / n_ce,
        ce_sae=losses["ce_sae"] / n_ce,
        ce_zero=losses["ce_zero"] / n_ce,
        ce_mean=losses["ce_mean"] / n_ce,
        kl_sae=losses["kl_sae"] / n_kl,
        kl_zero=losses["kl_zero"] / n_kl,
        kl_mean=losses["kl_mean"] / n_kl,
        frequency=(sums.fired.double() / sums.n).float().cpu(),
        dense_threshold=float(dense_threshold),
        exclude=exclude,
        seconds=time.perf_counter() - start_time,
    )


def evaluation_tokens(
    model: Model, tokens: Any, mask: Bool[Tensor, "batch pos"] | None
) -> tuple[Int[Tensor, "batch pos"], Bool[Tensor, "batch pos"]]:
    """``(tokens, mask)`` to evaluate on: the given ids or texts, or (None) 64 held-out
    sequences of 128 tokens of the default corpus.

    Example:
        >>> tokens, mask = evaluation_tokens(mk.load_model("attn-only-2l"), [[1, 2, 3]], None)
        >>> tokens.shape, bool(mask.all())
        (torch.Size([1, 3]), True)
    """
    if tokens is None:
        if getattr(model, "tokenizer", None) is None:
            raise InvalidArgumentError(
                "Expected tokens: this model has no tokenizer, so the default held-out corpus "
                "cannot be cut. Hint: pass a (batch, pos) tensor of token ids."
            )
        tokens = corpus_tokens(model, seq_len=128, split="test", max_sequences=64)
    if isinstance(tokens, str | list | tuple):
        tokens, text_mask = token_batch(model, tokens)
        mask = text_mask if mask is None else mask & text_mask
    tokens = torch.as_tensor(tokens)
    if tokens.ndim != 2 or tokens.numel() == 0 or tokens.is_floating_point():
        raise ShapeError(
            f"Expected token ids of shape (batch, pos); got {tuple(tokens.shape)} "
            f"({tokens.dtype}). Hint: mk.corpus.corpus_tokens(model, split='test')."
        )
    if mask is None:
        mask = torch.ones(tokens.shape, dtype=torch.bool)
    return tokens, mask.to(torch.bool)


def run_until(
    model: Model, tokens: Int[Tensor, "batch pos"], names: list[str]
) -> dict[str, Tensor]:
    """The activations at ``names``, running only as many blocks as needed.

    Example:
        >>> acts = run_until(mk.load_model("attn-only-2l"), torch.tensor([[1, 2, 3]]),
        ...                  ["blocks.0.hook_resid_post"])
        >>> acts["blocks.0.hook_resid_post"].shape
        torch.Size([1, 3, 128])
    """
    acts: dict[str, Tensor] = {}

    def keep(act: Tensor, hook: Any) -> None:
        acts[hook.name] = act

    layers = [hook_layer(n) for n in names]
    known = [layer for layer in layers if layer is not None]
    with hook_scope(model, fwd_hooks=[(n, keep) for n in names]):
        if len(known) == len(layers):
            model(tokens, stop_at_layer=max(known) + 1)
        else:
            model(tokens, return_type=None)
    return acts


def _start_layer(model: Model, sites: SAESites) -> int | None:
    """The block the second pass starts from (the dictionary's), None to run from the tokens."""
    if model.cfg.positional_embedding_type == "shortformer":
        return None  # the positional embedding enters each block: run from the tokens
    return hook_layer(sites.in_hook)


def _reconstruction_batch(
    model: Model,
    sae: SparseDictionaryLike,
    sites: SAESites,
    tokens: Tensor,
    counted: Tensor,
    sums: _Sums,
) -> Tensor | None:
    """Adds one batch's reconstruction sums; returns the residual entering the dictionary's
    block (None when the second pass runs from the tokens)."""
    names = sorted({sites.in_hook, sites.out_hook})
    layer = _start_layer(model, sites)
    start = None
    if layer is None:
        acts = run_until(model, tokens, names)
    else:
        acts = {}

        def keep(act: Tensor, hook: Any) -> None:
            acts[hook.name] = act

        start = model(tokens, stop_at_layer=layer)  # (batch, pos, d_model)
        stop = max(hook_layer(n) or 0 for n in names) + 1  # both in blocks: layer is not None
        with hook_scope(model, fwd_hooks=[(n, keep) for n in names]):
            model(start, start_at_layer=layer, stop_at_layer=stop)
    x = as_rows(acts[sites.in_hook], sites.d_in, sites.in_hook)
    y = as_rows(acts[sites.out_hook], sites.d_out, sites.out_hook)
    f, y_hat = reconstruct(sae, x)
    f, y, y_hat = f[counted], y[counted].double(), y_hat[counted].double().to(y.device)
    fired = f != 0  # (n, d_sae)
    sums.n += int(y.shape[0])
    sums.l0 += float(fired.sum())
    sums.sq_err += float(((y - y_hat) ** 2).sum())
    sums.sq_norm += float((y**2).sum())
    sums.cos += float(torch.nn.functional.cosine_similarity(y, y_hat, dim=-1, eps=1e-12).sum())
    total, counts = y.sum(0), fired.sum(0).to(torch.long).cpu()
    sums.total = total if sums.total is None else sums.total + total
    sums.fired = counts if sums.fired is None else sums.fired + counts
    return start


def _loss_batch(
    model: Model,
    sae: SparseDictionaryLike,
    sites: SAESites,
    tokens: Tensor,
    mask: Tensor,
    counted: Tensor,
    mean_y: Tensor,
    start: Tensor | None,
) -> tuple[dict[str, float], int, int]:
    """Summed CE and KL of the clean, spliced and ablated runs on one batch, run from the
    residual ``start`` entering the dictionary's block (recomputed when None)."""
    layer = _start_layer(model, sites)
    if layer is not None and start is None:
        start = model(tokens, stop_at_layer=layer)

    def run(hooks: list[tuple[str, Callable]]) -> Tensor:
        with hook_scope(model, fwd_hooks=hooks):
            if start is None:
                resid = model(tokens, stop_at_layer=model.cfg.n_layers)
            else:
                resid = model(start, start_at_layer=layer, stop_at_layer=model.cfg.n_layers)
            return decode_residual(model, resid)

    ce_at = counted[:, :-1] & mask[:, 1:]  # (batch, pos-1): counted and the next token real
    targets = tokens[:, 1:][ce_at]
    clean = run([])
    clean_logp = clean[counted].float().log_softmax(-1)  # (n_kl, d_vocab)
    out = {"ce_clean": _ce(clean, ce_at, targets)}
    del clean
    replace = _replacer(counted, sites)
    for name, hooks in (
        ("sae", _splice_hooks(sae, sites, replace)),
        ("zero", [(sites.out_hook, replace(lambda y: torch.zeros_like(y)))]),
        ("mean", [(sites.out_hook, replace(lambda y: mean_y.to(y).expand_as(y)))]),
    ):
        logits = run(hooks)
        out[f"ce_{name}"] = _ce(logits, ce_at, targets)
        logp = logits[counted].float().log_softmax(-1)
        out[f"kl_{name}"] = float((clean_logp.exp() * (clean_logp - logp)).sum())
        del logits, logp
    return out, int(ce_at.sum()), int(counted.sum())


def _ce(logits: Tensor, at: Tensor, targets: Tensor) -> float:
    logp = logits[:, :-1][at].float().log_softmax(-1)  # (n, d_vocab)
    return float(-logp.gather(-1, targets[:, None]).sum())


def _replacer(counted: Tensor, sites: SAESites) -> Callable[[Callable[[Tensor], Tensor]], Callable]:
    """Hooks that replace the output activation at counted positions by ``new(y)``."""

    def make(new: Callable[[Tensor], Tensor]) -> Callable[[Tensor, Any], Tensor]:
        def hook(act: Tensor, hook: Any) -> Tensor:
            y = as_rows(act, sites.d_out, sites.out_hook)
            value = new(y).to(y.device, y.dtype)
            return torch.where(counted[..., None], value, y).reshape(act.shape)

        return hook

    return make


def _splice_hooks(
    sae: SparseDictionaryLike, sites: SAESites, replace: Callable
) -> list[tuple[str, Callable]]:
    """Hooks that run the model on the reconstruction at counted positions (no error term)."""
    if not sites.is_transcoder:
        return [(sites.out_hook, replace(lambda y: reconstruct(sae, y)[1]))]
    stash: dict[str, Tensor] = {}

    def read(act: Tensor, hook: Any) -> None:
        stash["y_hat"] = reconstruct(sae, as_rows(act, sites.d_in, sites.in_hook))[1]

    def predicted(y: Tensor) -> Tensor:
        return stash.pop("y_hat")

    return [(sites.in_hook, read), (sites.out_hook, replace(predicted))]
