"""Latents as nodes: attribution patching over SAE/transcoder latents and their error term, and
input-invariant feature-to-feature connections of transcoders.

**Attribution patching on latents** (Marks et al. 2024, "Sparse Feature Circuits"): with the
dictionary spliced in as ``x = decode(f) + error``, every latent ``f_i`` and the error term are
nodes; the effect of patching a latent from the base run to the source run is estimated by the
first-order term ``(f_i^source - f_i^base) . dM/df_i`` summed over positions (the error term
the same way with its vector). One forward and one backward pass score every latent, so a user
can pick the few worth patching for real with :func:`mechkit.patch_latents`.

**Transcoder connections** (Dunefsky et al. 2024, "Transcoders find interpretable LLM feature
circuits"): a transcoder latent ``i`` writes ``W_dec[i]`` into the residual stream; a later
transcoder (or SAE) reads it through ``W_enc[:, j]``. ``W_dec_up @ W_enc_down`` is the
input-invariant connection between every pair of latents (norms between them ignored); times the
upstream latent's activation it is that latent's contribution to the downstream pre-activation.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from mechkit.core.batching import each_batch, prompts_per_pass
from mechkit.core.inputs import reference_mean, resolve_contrast
from mechkit.core.labels import metric_name
from mechkit.core.metrics import batch_metric, mean_value
from mechkit.core.progress import progress_bar
from mechkit.core.types import Model, SparseDictionaryLike
from mechkit.errors import ShapeError
from mechkit.hook_scope import hook_scope
from mechkit.metrics import Metric, check_metric_value
from mechkit.patching.result import PatchResult
from mechkit.sae.splice import SAESites, as_rows, check_hooks, reconstruct, sae_sites

__all__ = ["attribute_latents", "feature_connections"]


def attribute_latents(
    model: Model,
    sae: SparseDictionaryLike,
    clean: Any,
    corrupt: Any = None,
    metric: Any = None,
    *,
    direction: Literal["denoising", "noising"] | None = None,
    ablation: Literal["corrupt", "mean", "zero"] = "corrupt",
    reference: Any = None,
    batch_size: int | None = None,
    progress: bool = False,
) -> PatchResult:
    """Estimate, for every latent and the error term, the effect of patching it (all positions).

    Args:
        model: a HookedTransformer.
        sae: an SAE or transcoder (:class:`mechkit.sae.SparseDictionary` or any
            :class:`~mechkit.core.types.SparseDictionaryLike`).
        clean, corrupt, metric: a :class:`~mechkit.PromptPairs` (its logit difference the
            default metric), or prompts of one shape and a metric, as in
            :func:`mechkit.core.resolve_contrast`.
        direction, ablation, reference: the core's vocabulary (``"resample"`` is not offered):
            denoising estimates clean values put into the corrupt run; noising the ablation's
            values (the corrupt run's, the ``reference`` mean, or zero) put into the clean run.
        batch_size: prompts per pass (None: all; splitting needs a mechkit Metric).
        progress: a progress bar over the batches (off by default: two passes per batch).

    Returns:
        A :class:`PatchResult` with one axis ``latent`` (labels ``0 .. d_sae - 1`` then
        ``"error"``): each score is ``M(base) + (f_source - f_base) . dM/df`` summed over
        positions, with ``estimator="attribution patching"``.

    Example:
        >>> from mechkit.sae import SAEConfig, SparseDictionary
        >>> model = mk.load_model("attn-only-2l")
        >>> sae = SparseDictionary.from_config(SAEConfig(
        ...     architecture="relu", d_in=128, d_sae=64, hook_name="blocks.0.hook_resid_post"))
        >>> clean = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
        >>> corrupt = torch.tensor([[1, 9, 3, 4], [5, 9, 7, 8]])
        >>> r = mk.sae.attribute_latents(model, sae, clean, corrupt,
        ...                              lambda lg: lg[:, -1, 3].mean())
        >>> r.scores.shape, r.labels["latent"][-1]        # 64 latents, then the error term
        (torch.Size([65]), 'error')
    """
    sites = sae_sites(sae)
    check_hooks(model, sites)
    contrast = resolve_contrast(
        model,
        clean,
        corrupt,
        metric,
        direction=direction,
        ablation=ablation,
        reference=reference,
        ablations=("corrupt", "mean", "zero"),
    )
    n_batch = contrast.n_prompts
    size = prompts_per_pass(n_batch, batch_size, contrast.metric)
    base_tokens, source_tokens = contrast.base_tokens, contrast.source_tokens
    means: tuple[Tensor, Tensor] | None = None
    if contrast.ablation == "mean":
        assert contrast.reference_tokens is not None and contrast.reference_mask is not None
        ref_f, ref_err, _ = _run(model, sae, sites, contrast.reference_tokens, None, grad=False)
        seq, mask = base_tokens.shape[1], contrast.reference_mask
        means = reference_mean(ref_f, mask, seq), reference_mean(ref_err, mask, seq)
    parts: list[Tensor] = []
    values = {"base": 0.0, "source": 0.0}

    def work(rows: slice) -> None:
        m = batch_metric(contrast.metric, rows, n_batch)
        base_f, base_err, grads = _run(model, sae, sites, base_tokens[rows], m, grad=True)
        if source_tokens is not None:
            source_f, source_err, _ = _run(model, sae, sites, source_tokens[rows], m, grad=False)
        elif means is not None:
            source_f, source_err = means[0].expand_as(base_f), means[1].expand_as(base_err)
        else:
            source_f, source_err = torch.zeros_like(base_f), torch.zeros_like(base_err)
        assert grads is not None  # a run with grad=True returns them
        grad_f, grad_err, per_prompt_base = grads
        n = base_f.shape[0]
        # the metric is a mean over the batch: one prompt's own effect is n times its share
        latent = ((source_f - base_f) * grad_f).sum(1) * n  # (batch, d_sae)
        error = ((source_err - base_err) * grad_err).sum((1, 2)) * n  # (batch,)
        per_prompt = torch.cat([latent, error[:, None]], 1).T.float().cpu()  # (node, batch)
        base_value, source_value = _values(model, m, base_tokens[rows], source_tokens, rows)
        parts.append(per_prompt + per_prompt_base[None, :])  # kept once the batch has run
        values["base"] += base_value * n
        values["source"] += source_value * n
        bar.update(1)

    with progress_bar(-(-n_batch // size), "attributing latents", enabled=progress) as bar:
        each_batch(n_batch, size, work)
    per_prompt = torch.cat(parts, 1)
    labels: list[Any] = [*range(sites.d_sae), "error"]
    base_value = values["base"] / n_batch
    source = values["source"] / n_batch if source_tokens is not None else None
    clean_score, corrupt_score = (
        (source, base_value) if contrast.direction == "denoising" else (base_value, source)
    )
    return PatchResult(
        scores=per_prompt.mean(-1),
        per_prompt=per_prompt,
        axes=("latent",),
        labels={"latent": labels},
        tick_labels={"latent": [str(v) for v in labels]},
        clean_score=clean_score,
        corrupt_score=corrupt_score,
        method=contrast.method,
        site=f"latents of {sites.out_hook}",
        metric_name=metric_name(contrast.metric),
        estimator="attribution patching",
    )


def _run(
    model: Model,
    sae: SparseDictionaryLike,
    sites: SAESites,
    tokens: Tensor,
    metric: Any,
    *,
    grad: bool,
) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor] | None]:
    """Latents ``(batch, pos, d_sae)`` and error ``(batch, pos, d_out)`` of one run, and with
    ``grad`` their gradients and the per-prompt metric."""
    held: dict[str, Tensor] = {}

    def read(act: Tensor, hook: Any) -> None:
        held["x"] = as_rows(act, sites.d_in, sites.in_hook)

    def write(act: Tensor, hook: Any) -> Tensor:
        target = as_rows(act, sites.d_out, sites.out_hook)
        f0, x_hat0 = reconstruct(sae, held["x"].detach())
        skip = (x_hat0 - sae.decode(f0)).detach()  # the skip term (zero for an SAE)
        f = f0.detach().requires_grad_(grad)
        err = (target.to(x_hat0.dtype) - x_hat0).detach().requires_grad_(grad)
        x_hat = sae.decode(f) + skip
        held["f"], held["err"] = f, err
        return (x_hat + err).to(act.dtype).reshape(act.shape)

    hooks = [(sites.in_hook, read), (sites.out_hook, write)]
    if sites.in_hook == sites.out_hook:

        def both(act: Tensor, hook: Any) -> Tensor:
            read(act, hook)
            return write(act, hook)

        hooks = [(sites.in_hook, both)]
    with torch.set_grad_enabled(grad), hook_scope(model, fwd_hooks=hooks):
        logits = model(tokens)
        if not grad:
            return held["f"].detach(), held["err"].detach(), None
        if isinstance(metric, Metric):
            per_prompt = metric.per_prompt(logits)
            value = per_prompt.mean()
        else:
            value = check_metric_value(metric(logits), tokens.shape[0])
            per_prompt = value.expand(tokens.shape[0]) if value.ndim == 0 else value
            value = value.mean()
        grad_f, grad_err = torch.autograd.grad(value, [held["f"], held["err"]])
    return held["f"].detach(), held["err"].detach(), (
        grad_f, grad_err, per_prompt.detach().float().cpu()
    )  # fmt: skip


@torch.no_grad()
def _values(
    model: Model, metric: Any, base: Tensor, source: Tensor | None, rows: slice
) -> tuple[float, float]:
    """The metric on the base run and on the source run (0 when there is none), the model as
    it is."""
    base_value = float(mean_value(metric, model(base)))
    if source is None:
        return base_value, 0.0
    return base_value, float(mean_value(metric, model(source[rows])))


@torch.no_grad()
def feature_connections(
    upstream: Any, downstream: Any, *, normalize: bool = False
) -> Float[Tensor, "d_sae_up d_sae_down"]:
    """``W_dec_up @ W_enc_down``: how much each upstream latent's decoder direction drives each
    downstream latent's encoder, independent of the input (Dunefsky et al. 2024).

    Args:
        upstream: a transcoder (or SAE) whose output is written into the residual stream.
        downstream: a transcoder or SAE reading the residual stream at or after it.
        normalize: divide by the norms of the decoder rows and encoder columns (cosines).

    Returns:
        ``(d_sae_up, d_sae_down)``. Norms between the two are ignored: an exact contribution
        on a given input needs the downstream norm's scale (``f_up[i] * w[i, j] / scale``).

    Example:
        >>> from mechkit.sae import SAEConfig, SparseDictionary
        >>> up = SparseDictionary.from_config(SAEConfig(architecture="relu", d_in=128,
        ...     d_sae=64, hook_name="blocks.0.ln1.hook_normalized", d_out=128,
        ...     out_hook_name="blocks.0.hook_attn_out"))
        >>> down = SparseDictionary.from_config(SAEConfig(architecture="relu", d_in=128,
        ...     d_sae=32, hook_name="blocks.1.hook_resid_pre"))
        >>> feature_connections(up, down).shape             # (d_sae_up, d_sae_down)
        torch.Size([64, 32])
    """
    up, down = sae_sites(upstream), sae_sites(downstream)
    if up.d_out != down.d_in:
        raise ShapeError(
            f"Expected the upstream dictionary's output width ({up.d_out}, {up.out_hook}) to "
            f"equal the downstream one's input width ({down.d_in}, {down.in_hook})."
        )
    w_dec = upstream.W_dec.float()  # (d_sae_up, d_model)
    w_enc = downstream.W_enc.float().to(w_dec.device)  # (d_model, d_sae_down)
    if normalize:
        w_dec = w_dec / w_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        w_enc = w_enc / w_enc.norm(dim=0, keepdim=True).clamp_min(1e-12)
    return w_dec @ w_enc
