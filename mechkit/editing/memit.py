"""MEMIT: many facts edited at once, spread over a range of MLP layers.

Meng et al. (2023), *Mass-Editing Memory in a Transformer*, arXiv:2210.07229. For each fact a
target hidden state ``z_i = h_i + delta_i`` at the last layer ``L`` of the range (at the
subject's last token) is found as ROME finds ``v*`` (:func:`~mechkit.editing.rome.target_value`,
``delta`` added to block ``L``'s MLP output, which is the same as adding it to the residual
stream there). Then, for each layer ``l`` of the range in order, with the updates of the earlier
layers in place, the keys ``K`` (one row per fact, averaged over prefixes as ROME's ``k*``) and
the residuals ``R = (z - h) / (layers left)`` give the least-squares update

``W_out += (lambda C + K^T K)^-1 K^T R``

(in TransformerLens's layout ``out = k @ W_out``; the paper's ``Delta = R K^T (lambda C + K
K^T)^-1`` transposed), which trades the new associations against the keys' second moment ``C``
weighted by ``lambda`` (``mom2_weight``). With one fact and one layer it is ROME's update
scaled by ``k^T C^-1 k / (lambda + k^T C^-1 k)`` (Sherman-Morrison), which tends to ROME's as
``lambda`` goes to 0.

``covariance="identity"`` uses ``C = s I`` with ``s`` the mean of ``|k|^2 / d_mlp`` over the
edited keys, so that ``lambda`` means the same with either choice. ``mom2_weight`` defaults to
``d_mlp``: MEMIT used 15,000 for GPT-J (``d_mlp`` 16,384) and 20,000 for GPT-2 XL (6,400).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from mechkit.core.progress import progress_bar
from mechkit.core.types import Model
from mechkit.editing.covariance import check_layer, covariances
from mechkit.editing.edits import WeightEdit, edit
from mechkit.editing.facts import Fact, TokenizedFact, tokenize_facts
from mechkit.editing.rome import (
    RomeConfig,
    context_prefixes,
    essence_prompt,
    mean_at_subject,
    prefixed,
    request_text,
    target_value,
)
from mechkit.errors import InvalidArgumentError

__all__ = ["memit", "memit_update"]


def memit_update(keys: Tensor, residuals: Tensor, covariance: Tensor, mom2_weight: float) -> Tensor:
    """``(lambda C + K^T K)^-1 K^T R``: the change of ``W_out`` (``(d_mlp, d_model)``) for keys
    ``K`` ``(fact, d_mlp)`` and residuals ``R`` ``(fact, d_model)``.

    Example:
        >>> K, R = torch.randn(1, 6, dtype=torch.float64), torch.randn(1, 4, dtype=torch.float64)
        >>> delta = memit_update(K, R, torch.eye(6), 2.0)   # one key: K maps to a share of R
        >>> n = float(K @ K.T)
        >>> tuple(delta.shape), torch.allclose(K @ delta, R * n / (2.0 + n))
        ((6, 4), True)
    """
    k = keys.double()
    lhs = mom2_weight * covariance.double() + k.T @ k  # (d_mlp, d_mlp)
    return torch.linalg.solve(lhs, k.T @ residuals.double())


def memit(
    model: Model,
    facts: Fact | TokenizedFact | Sequence[Fact | TokenizedFact],
    *,
    layers: Sequence[int],
    covariance: Literal["corpus", "identity"] | Tensor | dict[int, Tensor] = "corpus",
    mom2_weight: float | None = None,
    config: RomeConfig | None = None,
    n_tokens: int | None = None,
    targets: Tensor | None = None,
    progress: bool = True,
) -> WeightEdit:
    """One MEMIT edit of all ``facts`` (towards their ``new_target``) over ``layers``.

    Args:
        model: a HookedTransformer with MLPs.
        facts: facts with ``new_target``.
        layers: the blocks whose ``W_out`` is edited (MEMIT: a few consecutive ones where the
            MLPs' indirect effect peaks); the targets are set at the last.
        covariance: ``"corpus"``, ``"identity"`` (module docstring), a tensor, or ``{layer:
            tensor}``.
        mom2_weight: ``lambda`` (None: ``d_mlp``).
        config: how each target is optimised (:class:`~mechkit.editing.RomeConfig`).
        n_tokens: corpus tokens for the covariance (None: the whole training split).
        targets: ``(fact, d_model)`` changes of the last layer's MLP output at the subject to
            use instead of optimising them (ROME edits at that layer with the same ``config``
            give the same: ``values[...] - W_out^T keys[...]``).
        progress: show a progress bar over facts and layers.

    Returns:
        A :class:`~mechkit.editing.WeightEdit` on every layer's ``W_out``; ``keys["L{l}"]``
        ``(fact, d_mlp)``, ``values["z"]`` the targets ``(fact, d_model)``.

    Example:
        >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
        >>> model = HookedTransformer(HookedTransformerConfig(n_layers=3, d_model=8, n_ctx=16,
        ...     d_head=4, n_heads=2, d_mlp=16, d_vocab=20, act_fn="relu"))
        >>> facts = [TokenizedFact(torch.tensor([1, 2, 3]), (0, 2), 4, new_target=5),
        ...          TokenizedFact(torch.tensor([6, 7, 8]), (1, 2), 9, new_target=10)]
        >>> e = memit(model, facts, layers=[0, 1], covariance="identity",
        ...           config=RomeConfig(steps=2), progress=False)
        >>> sorted(e.deltas), tuple(e.keys["L0"].shape)   # (fact, d_mlp)
        (['blocks.0.mlp.W_out', 'blocks.1.mlp.W_out'], (2, 16))
    """
    layers = sorted({check_layer(model, layer) for layer in layers})
    if not layers:
        raise InvalidArgumentError("Expected at least one layer to edit; got none.")
    config = config or RomeConfig()
    lam = float(model.cfg.d_mlp or 0) if mom2_weight is None else float(mom2_weight)
    if lam < 0:
        raise InvalidArgumentError(f"Expected mom2_weight >= 0; got {mom2_weight!r}.")
    tfs = tokenize_facts(model, facts)
    prefixes = context_prefixes(model, config.n_prefixes, config.prefix_len, config.seed)
    prompts = [prefixed(tf, prefixes) for tf in tfs]
    last = layers[-1]
    resid = f"blocks.{last}.hook_resid_post"
    Cs = covariances(model, layers, covariance, n_tokens=n_tokens, progress=progress)  # noqa: N806
    deltas: dict[str, Tensor] = {}
    keys: dict[str, Tensor] = {}
    losses = []
    with progress_bar(len(tfs) + len(layers), "MEMIT", enabled=progress) as bar:
        zs = []
        for i, (tf, group) in enumerate(zip(tfs, prompts, strict=True)):
            if targets is None:
                essence = essence_prompt(model, tf)
                delta, loss = target_value(model, group, last, config, essence=essence)
                losses.append(loss)
            else:
                delta = targets[i].to(model.cfg.device)
            zs.append(mean_at_subject(model, group, resid, last) + delta)
            bar.update()
        z = torch.stack(zs)  # (fact, d_model)
        for n_done, layer in enumerate(layers):
            name = f"blocks.{layer}.mlp.W_out"
            so_far = WeightEdit(dict(deltas), "MEMIT")
            with edit(model, so_far):
                K = torch.stack(  # noqa: N806
                    [
                        mean_at_subject(model, g, f"blocks.{layer}.mlp.hook_post", layer)
                        for g in prompts
                    ]
                )  # (fact, d_mlp)
                h = torch.stack([mean_at_subject(model, g, resid, last) for g in prompts])
            R = (z - h) / (len(layers) - n_done)  # noqa: N806  (fact, d_model)
            C = Cs[layer]  # noqa: N806
            if C is None:
                scale = float((K.double() ** 2).sum(-1).mean()) / K.shape[1]
                C = scale * torch.eye(K.shape[1], device=K.device)  # noqa: N806
            W = model.blocks[layer].mlp.W_out  # noqa: N806
            deltas[name] = memit_update(K, R, C, lam).to(W.dtype)
            keys[f"L{layer}"] = K.detach().cpu()
            bar.update()
    return WeightEdit(
        deltas=deltas,
        method="MEMIT",
        requests=tuple(request_text(tf) for tf in tfs),
        keys=keys,
        values={"z": z.detach().cpu()},
        record={
            "layers": layers,
            "covariance": covariance if isinstance(covariance, str) else "given",
            "mom2_weight": lam,
            "config": dataclasses.asdict(config),
            "losses": losses,
        },
    )
