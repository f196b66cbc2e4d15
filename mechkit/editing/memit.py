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
weighted by ``lambda``. With one fact and one layer it is ROME's update scaled by ``k^T C^-1 k /
(lambda + k^T C^-1 k)`` (Sherman-Morrison), ROME's own at ``lambda = 0``.

**Lambda, scale-free.** MEMIT's ``C`` is the keys' per-token second moment and its ``lambda``
(``mom2_update_weight``: 15,000 for GPT-J, 20,000 for GPT-2 XL) a count of corpus tokens set
against the edits; how much of each target a layer then realises depends on the keys' Mahalanobis
norms ``q_i = k_i^T C^-1 k_i``: one fact alone realises ``q / (lambda + q)`` of its residual.
These norms differ between models, layers and covariance estimates (on SmolLM2's subject keys
``q`` is ~3,000-5,000 with the corpus covariance and ``d_mlp`` = 1,536 with a scaled identity), so
a fixed ``lambda`` means different things; at ``lambda = d_mlp`` a two-fact edit over three layers
of SmolLM2 realised too little to change a prediction. Here ``mom2_weight`` (``rho``) is relative:
``lambda = rho * mean_i q_i`` in each layer, so one fact realises ``1 / (1 + rho)`` of its
residual per layer whatever the model, the scale of ``C`` or its estimate; the absolute
``lambda`` of each layer is kept in the edit's record (``record["lambda"]``). ``rho = 0`` is the
limit of exact edits, ``W' k_i = W k_i + r_i`` for every fact at least ``C``-norm (ROME's update
for one fact; EMMET, Gupta et al. 2024, for several). The update is computed in the equivalent
form ``C^-1 K^T (lambda I + K C^-1 K^T)^-1 R`` (Woodbury), which holds at ``lambda = 0``.
``covariance="identity"`` is ``C = I`` (its scale does not matter).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import torch
from jaxtyping import Float
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

__all__ = ["memit", "memit_update", "key_norms", "MOM2_WEIGHT"]

MOM2_WEIGHT = 0.1
"""memit's default ``rho``: one fact alone realises 1/1.1 (91%) of its residual per layer."""


def memit_update(
    keys: Float[Tensor, "fact d_mlp"],
    residuals: Float[Tensor, "fact d_model"],
    covariance: Float[Tensor, "d_mlp d_mlp"] | None,
    mom2_weight: float,
) -> Float[Tensor, "d_mlp d_model"]:
    """``(lambda C + K^T K)^-1 K^T R``: the change of ``W_out`` for keys ``K`` and residuals
    ``R``, with ``lambda = mom2_weight`` absolute (MEMIT's units; ``C`` None: the identity).
    Computed as ``C^-1 K^T (lambda I + K C^-1 K^T)^-1 R``, which also holds at ``lambda = 0``
    (then ``K (W + delta) = K W + R`` exactly, for independent keys).

    Example:
        >>> K, R = torch.randn(1, 6, dtype=torch.float64), torch.randn(1, 4, dtype=torch.float64)
        >>> delta = memit_update(K, R, torch.eye(6), 2.0)   # one key: K maps to a share of R
        >>> n = float(K @ K.T)
        >>> tuple(delta.shape), torch.allclose(K @ delta, R * n / (2.0 + n))
        ((6, 4), True)
    """
    k = keys.double()
    c_inv_kt = k.T if covariance is None else torch.linalg.solve(covariance.double(), k.T)
    gram = k @ c_inv_kt  # (fact, fact): K C^-1 K^T
    eye = torch.eye(len(k), dtype=torch.float64, device=k.device)
    return c_inv_kt @ torch.linalg.solve(mom2_weight * eye + gram, residuals.double())


def key_norms(
    keys: Float[Tensor, "fact d_mlp"], covariance: Float[Tensor, "d_mlp d_mlp"] | None
) -> Float[Tensor, " fact"]:
    """``q_i = k_i^T C^-1 k_i``, each key's squared Mahalanobis norm under ``C`` (None: the
    identity), against which :func:`memit` sets its ``lambda``.

    Example:
        >>> key_norms(torch.tensor([[1.0, 2.0]]), 2 * torch.eye(2))
        tensor([2.5000], dtype=torch.float64)
    """
    k = keys.double()
    c_inv_kt = k.T if covariance is None else torch.linalg.solve(covariance.double(), k.T)
    return (k * c_inv_kt.T).sum(-1)


def memit(
    model: Model,
    facts: Fact | TokenizedFact | Sequence[Fact | TokenizedFact],
    *,
    layers: Sequence[int],
    covariance: Literal["corpus", "identity"] | Tensor | dict[int, Tensor] = "corpus",
    mom2_weight: float = MOM2_WEIGHT,
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
        mom2_weight: ``rho``, ``lambda`` relative to the edited keys (module docstring):
            ``lambda = rho * mean_i k_i^T C^-1 k_i`` per layer; 0 gives exact edits (ROME's
            update for one fact in one layer). Larger keeps more of the corpus keys' outputs.
        config: how each target is optimised (:class:`~mechkit.editing.RomeConfig`).
        n_tokens: corpus tokens for the covariance (None: the whole training split).
        targets: ``(fact, d_model)`` changes of the last layer's MLP output at the subject to
            use instead of optimising them (ROME edits at that layer with the same ``config``
            give the same: ``values[...] - W_out^T keys[...]``).
        progress: show a progress bar over facts and layers.

    Returns:
        A :class:`~mechkit.editing.WeightEdit` on every layer's ``W_out``; ``keys["L{l}"]``
        ``(fact, d_mlp)``, ``values["z"]`` the targets ``(fact, d_model)``; ``record["lambda"]``
        the absolute ``lambda`` of each layer.

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
    if isinstance(mom2_weight, bool) or not isinstance(mom2_weight, int | float) or mom2_weight < 0:
        raise InvalidArgumentError(
            f"Expected mom2_weight >= 0 (relative to the keys' norms; 0: exact edits); got "
            f"{mom2_weight!r}."
        )
    tfs = tokenize_facts(model, facts)
    prefixes = context_prefixes(model, config.n_prefixes, config.prefix_len, config.seed)
    prompts = [prefixed(tf, prefixes) for tf in tfs]
    last = layers[-1]
    resid = f"blocks.{last}.hook_resid_post"
    Cs = covariances(model, layers, covariance, n_tokens=n_tokens, progress=progress)  # noqa: N806
    deltas: dict[str, Tensor] = {}
    keys: dict[str, Tensor] = {}
    losses = []
    lambdas: dict[str, float] = {}
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
            C = Cs[layer]  # noqa: N806  (None: the identity)
            lam = float(mom2_weight) * float(key_norms(K, C).mean())
            lambdas[f"L{layer}"] = lam
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
            "mom2_weight": float(mom2_weight),
            "lambda": lambdas,
            "config": dataclasses.asdict(config),
            "losses": losses,
        },
    )
