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

    >>> r = mk.sae.attribute_latents(model, sae, pairs)        # PatchResult over latents + error
    >>> r.top(10)
    >>> w = mk.sae.feature_connections(transcoder_5, transcoder_8)   # (d_sae_5, d_sae_8)
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from mechkit.errors import InvalidArgumentError, ShapeError
from mechkit.hook_scope import hook_scope
from mechkit.patching.activation import _metric_name, resolve_inputs
from mechkit.patching.result import PatchResult
from mechkit.sae.splice import as_rows, check_hooks, reconstruct, sae_sites

__all__ = ["attribute_latents", "feature_connections"]


def attribute_latents(
    model: Any,
    sae: Any,
    clean: Any,
    corrupt: Any = None,
    metric: Any = None,
    *,
    direction: Literal["denoising", "noising"] = "denoising",
) -> PatchResult:
    """Estimate, for every latent and the error term, the effect of patching it (all positions).

    Args:
        model: a HookedTransformer.
        sae: an SAE or transcoder (:class:`mechkit.sae.SparseDictionary` or any object with
            its interface).
        clean, corrupt, metric: as for :func:`mechkit.activation_patch` (a PromptPairs, or
            token batches of one shape).
        direction: ``"denoising"`` (clean values into the corrupt run) or ``"noising"``.

    Returns:
        A :class:`PatchResult` with one axis ``latent`` (labels ``0 .. d_sae - 1`` then
        ``"error"``): each score is ``M(base) + (f_source - f_base) . dM/df`` summed over
        positions, with ``estimator="attribution patching"``.
    """
    sites = sae_sites(sae)
    check_hooks(model, sites)
    setup = resolve_inputs(model, clean, corrupt, metric, direction, None, None)
    if setup.source_tokens is None:
        raise InvalidArgumentError(f"Expected corrupt prompts for {direction}; got None.")

    source_f, source_err, _ = _run(model, sae, sites, setup.source_tokens, setup.metric, grad=False)
    base_f, base_err, grads = _run(model, sae, sites, setup.base_tokens, setup.metric, grad=True)
    base_value, other = _values(model, setup)
    grad_f, grad_err, per_prompt_base = grads
    n_batch = setup.base_tokens.shape[0]
    # the metric is a mean over prompts: one prompt's own effect is n times its share
    latent = ((source_f - base_f) * grad_f).sum(1) * n_batch  # (batch, d_sae)
    error = ((source_err - base_err) * grad_err).sum((1, 2)) * n_batch  # (batch,)
    per_prompt = torch.cat([latent, error[:, None]], 1).T.float().cpu()  # (node, batch)
    per_prompt = per_prompt + per_prompt_base[None, :]
    labels: list[Any] = [*range(sites.d_sae), "error"]
    clean_score, corrupt_score = (other, base_value) if direction == "denoising" else (
        base_value, other
    )  # fmt: skip
    return PatchResult(
        scores=per_prompt.mean(-1),
        per_prompt=per_prompt,
        axes=("latent",),
        labels={"latent": labels},
        tick_labels={"latent": [str(v) for v in labels]},
        clean_score=clean_score,
        corrupt_score=corrupt_score,
        method=direction,
        site=f"latents of {sites.out_hook}",
        metric_name=_metric_name(setup.metric),
        estimator="attribution patching",
    )


def _run(model: Any, sae: Any, sites: Any, tokens: Tensor, metric: Any, *, grad: bool) -> Any:
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
        from mechkit.metrics import Metric, check_metric_value

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
def _values(model: Any, setup: Any) -> tuple[float, float]:
    """The metric on the base run and on the source run (the model as it is)."""
    from mechkit.metrics import Metric

    def score(tokens: Tensor) -> float:
        logits = model(tokens)
        m = setup.metric
        value = m.per_prompt(logits).mean() if isinstance(m, Metric) else m(logits)
        return float(torch.as_tensor(value).float().mean())

    return score(setup.base_tokens), score(setup.source_tokens)


@torch.no_grad()
def feature_connections(upstream: Any, downstream: Any, *, normalize: bool = False) -> Tensor:
    """``W_dec_up @ W_enc_down``: how much each upstream latent's decoder direction drives each
    downstream latent's encoder, independent of the input (Dunefsky et al. 2024).

    Args:
        upstream: a transcoder (or SAE) whose output is written into the residual stream.
        downstream: a transcoder or SAE reading the residual stream at or after it.
        normalize: divide by the norms of the decoder rows and encoder columns (cosines).

    Returns:
        ``(d_sae_up, d_sae_down)``. Norms between the two are ignored: an exact contribution
        on a given input needs the downstream norm's scale (``f_up[i] * w[i, j] / scale``).
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
