"""The interpretability-illusion check for subspace interventions (Makelov et al. 2023).

Makelov, Lange and Nanda ("Is This the Subspace You Are Looking for? An Interpretability
Illusion for Subspace Activation Patching", 2023) show that patching a direction ``v`` can
change the output although the model does not use ``v``: when ``v = v_null + v_row`` with
``v_null`` in the kernel of the weights that read the site (it varies with the variable but
nothing reads it) and ``v_row`` in their row space but *dormant* (it never varies on real
data), patching along ``v`` moves the activation along ``v_row`` by an amount set by
``v_null``, switching on a pathway the model never uses.

:func:`illusion_check` reports, for a subspace found by DAS (or given):

- the split of the subspace into its part that the reading weights see (their row space: the
  MLP's ``W_out`` at an MLP hidden site, or ``weight``) or, at other sites, the part inside the
  span of real activations (centred; singular values above 1e-3 of the largest), and the rest;
  and the IIA of patching each part alone;
- the IIA of patching the whole component (the subspace should not beat it by much, and an
  effect the whole component lacks is suspicious);
- the subspace's variation on real data against an average direction's;
- held-out IIA (the pairs passed are the held-out ones).

The verdict, in this order (``gain`` is an IIA above the unchanged run's, ``EFFECT`` = 0.1):

- ``"no effect"``: neither the subspace nor the whole component gains more than ``EFFECT``:
  the site plays no causal role for this variable, so there is nothing to explain (and
  nothing to flag as an illusion either);
- ``"not found"``: the whole component gains, the subspace does not: the variable is there
  but not in this subspace;
- ``"illusion"``: the subspace's gain needs both parts (each alone keeps under half of it);
- ``"dormant"``: the subspace barely varies on real data (under 1% of an average direction);
- ``"ok"``: otherwise.

Every verdict but ``"ok"`` is *flagged*.

Example:
    >>> report = IllusionReport(0.9, 0.1, 0.1, 1.0, 0.0, 0.5, 1.2, "activation span", "ok")
    >>> report.flagged, report.scores()["iia_subspace"]
    (False, 0.9)
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from mechkit.core.results import rank
from mechkit.core.types import Model
from mechkit.errors import InvalidArgumentError, ShapeError
from mechkit.probing.interchange import site_activations, subspace_iia

__all__ = ["IllusionReport", "illusion_check", "illusion_verdict", "row_space_projector"]

EFFECT = 0.1
"""The least IIA gain over the unchanged run that counts as an effect (10 points of accuracy:
on a few dozen held-out pairs, smaller gains are within sampling noise)."""


@dataclasses.dataclass(frozen=True)
class IllusionReport:
    """Makelov et al.'s checks of one subspace.

    Attributes:
        iia_subspace: held-out IIA of the subspace patch.
        iia_inside: IIA of patching only its part the reading weights see (or inside the
            activations' span).
        iia_outside: IIA of patching only the rest.
        iia_full: IIA of patching the whole component.
        iia_none: the unchanged base run's IIA.
        inside_fraction: the share of the subspace (squared norm) in the inside part.
        variation: the activations' variance along the subspace over an average direction's.
        split: what "inside" means: ``"row space of W"`` or ``"activation span"``.
        verdict: ``"ok"``, ``"illusion"``, ``"dormant"``, ``"no effect"`` or ``"not found"``
            (see :func:`illusion_verdict`).

    Example:
        >>> IllusionReport(0.9, 0.0, 0.0, 1.0, 0.0, 0.5, 1.0, "activation span",
        ...                "illusion").flagged
        True
    """

    iia_subspace: float
    iia_inside: float
    iia_outside: float
    iia_full: float
    iia_none: float
    inside_fraction: float
    variation: float
    split: str
    verdict: str

    @property
    def flagged(self) -> bool:
        """Whether the verdict is anything but ``"ok"`` (an illusion, a dormant direction, no
        effect at the site, or an effect the subspace misses)."""
        return self.verdict != "ok"

    def scores(self) -> dict[str, float]:
        """The numbers, by name."""
        return {k: v for k, v in dataclasses.asdict(self).items() if isinstance(v, float)}

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-ready."""
        return dataclasses.asdict(self)

    def top(self, n: int = 10, *, absolute: bool = True) -> list[tuple[str, float]]:
        """The numbers, ranked (see :func:`mechkit.core.rank`)."""
        scores = self.scores()
        return rank(list(scores), list(scores.values()), n, absolute=absolute)

    def to_dataframe(self) -> Any:
        """One row per number."""
        import pandas as pd

        return pd.DataFrame({"measure": list(self.scores()), "value": list(self.scores().values())})

    def plot(self) -> Any:
        """IIA of each patch (plotly bars)."""
        import plotly.graph_objects as go

        names = ["none", "subspace", "inside", "outside", "full"]
        values = [self.iia_none, self.iia_subspace, self.iia_inside, self.iia_outside,
                  self.iia_full]  # fmt: skip
        fig = go.Figure(go.Bar(x=names, y=values))
        fig.update_layout(title=f"Illusion check ({self.split}): {self.verdict}",
                          yaxis_title="IIA")  # fmt: skip
        return fig


def row_space_projector(
    weight: Float[Tensor, "d out"], *, tol: float = 1e-6
) -> Float[Tensor, "d d"]:
    """The orthogonal projector onto the part of the site that ``x @ weight`` reads (the
    complement of its kernel).

    Example:
        >>> w = torch.tensor([[1.0], [0.0]])                      # reads the first coordinate
        >>> row_space_projector(w)
        tensor([[1., 0.],
                [0., 0.]])
    """
    u, s, _ = torch.linalg.svd(weight.double(), full_matrices=False)
    u = u[:, s > tol * s.max()]
    return (u @ u.T).float()


def illusion_verdict(
    iia_none: float,
    iia_subspace: float,
    iia_inside: float,
    iia_outside: float,
    iia_full: float,
    variation: float,
) -> str:
    """The illusion check's verdict from its numbers (the rules in the module docstring).

    Example:
        >>> illusion_verdict(0.5, 0.52, 0.5, 0.5, 0.49, 1.0)  # nothing moves: no causal role
        'no effect'
        >>> illusion_verdict(0.0, 1.0, 0.1, 0.1, 1.0, 1.0)    # the effect needs both parts
        'illusion'
        >>> illusion_verdict(0.0, 1.0, 1.0, 0.0, 1.0, 1.0)
        'ok'
    """
    gain = iia_subspace - iia_none
    if gain <= EFFECT and iia_full - iia_none <= EFFECT:
        return "no effect"
    if gain <= EFFECT:
        return "not found"
    if max(iia_inside - iia_none, iia_outside - iia_none) < 0.5 * gain:
        return "illusion"
    if variation < 0.01:
        return "dormant"
    return "ok"


def _span_projector(acts: Tensor, tol: float = 1e-3) -> Tensor:
    """The projector onto the span of the centred activations (singular values above ``tol``
    times the largest: directions along which real data varies at all)."""
    centred = acts.double() - acts.double().mean(0)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    v = vh[s > tol * s[0]]
    return (v.T @ v).float()


def _orthonormal(rows: Tensor) -> Tensor:
    if rows.numel() == 0:
        return rows
    u, s, vh = torch.linalg.svd(rows.double(), full_matrices=False)
    return vh[s > 1e-6].float()


def illusion_check(
    model: Model,
    subspace: Any,
    base: Sequence[Any],
    source: Sequence[Any],
    labels: Sequence[str | int],
    *,
    hook_name: str | None = None,
    position: int = -1,
    weight: Tensor | None = None,
    choices: Tensor | None = None,
    activations: Tensor | None = None,
    memory_budget: int | str | None = None,
) -> IllusionReport:
    """Makelov et al.'s checks of a subspace (a :class:`DasResult` or an orthonormal basis) on
    held-out pairs (see the module docstring).

    Args:
        model: the HookedTransformer.
        subspace: a DAS result, or a ``(k, d)`` basis with ``hook_name`` and ``position``.
        base, source, labels: held-out pairs and their counterfactual labels.
        weight: the ``(d, out)`` weights that read the site (None: ``W_out`` at an MLP hidden
            site, else the span of the activations is used).
        choices: per pair, the candidate answers IIA compares.
        activations: real activations at the site (None: the pairs' own).
        memory_budget: bytes (or ``"2GB"``) a forward pass may use; None: 2 GiB on CPU, 60%
            of free memory on CUDA.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> src = [[i, 5, 6] for i in range(10, 20)]
        >>> labels = model(torch.tensor(src)).argmax(-1)[:, -1].tolist()
        >>> report = illusion_check(model, torch.eye(128)[:64], [[1, 2, 3]] * 10, src, labels,
        ...                         hook_name="blocks.1.hook_resid_pre")
        >>> report.split, 0.0 <= report.iia_subspace <= 1.0
        ('activation span', True)
    """
    if hasattr(subspace, "basis"):  # a DasResult
        basis, hook_name, position = subspace.basis, subspace.hook_name, subspace.position
    else:
        basis = torch.as_tensor(subspace).float()
    if hook_name is None:
        raise InvalidArgumentError("Expected hook_name with a basis (a DasResult carries it).")
    if basis.ndim != 2 or basis.shape[0] == 0:
        raise ShapeError(f"Expected a (k >= 1, d) basis; got {tuple(basis.shape)}.")
    d = basis.shape[1]
    if activations is None:
        activations = torch.cat(
            [site_activations(model, base, hook_name=hook_name, position=position,
                              memory_budget=memory_budget),
             site_activations(model, source, hook_name=hook_name, position=position,
                              memory_budget=memory_budget)]
        )  # fmt: skip
    mlp = re.fullmatch(r"blocks\.(\d+)\.mlp\.hook_post", hook_name)
    if weight is None and mlp is not None:
        weight = model.blocks[int(mlp.group(1))].mlp.W_out.detach().float().cpu()
    if weight is not None:
        if weight.shape[0] != d:
            raise ShapeError(f"Expected weight of shape ({d}, out); got {tuple(weight.shape)}.")
        projector, split = row_space_projector(weight.float().cpu()), "row space of W"
    else:
        projector, split = _span_projector(activations), "activation span"
    inside = basis @ projector  # (k, d)
    outside = basis - inside

    def iia(b: Tensor) -> float:
        return subspace_iia(model, base, source, labels, b, hook_name=hook_name,
                            position=position, choices=choices,
                            memory_budget=memory_budget)  # fmt: skip

    none = iia(torch.zeros(0, d))
    sub = iia(basis)
    inside_basis, outside_basis = _orthonormal(inside), _orthonormal(outside)
    iia_in = iia(inside_basis) if len(inside_basis) else none
    iia_out = iia(outside_basis) if len(outside_basis) else none
    full = iia(torch.eye(d))
    centred = activations.double() - activations.double().mean(0)
    along = (centred @ basis.double().T).pow(2).sum(-1).mean() / basis.shape[0]
    average = centred.pow(2).sum(-1).mean() / d
    variation = float(along / average) if average > 0 else 0.0
    return IllusionReport(
        sub, iia_in, iia_out, full, none, float(inside.pow(2).sum() / basis.shape[0]),
        variation, split, illusion_verdict(none, sub, iia_in, iia_out, full, variation),
    )  # fmt: skip
