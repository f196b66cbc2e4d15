"""Probes with controls: is a property linearly readable at a layer, and is that the model's doing?

A probe is a small classifier (or regressor) trained on a layer's activations to predict a
property of the token. Accuracy alone says little: a flexible probe can memorise word identity.
Hewitt & Liang (2019, "Designing and Interpreting Probes with Control Tasks") compare every probe
with the same probe trained on a *control task*, which gives each word type a fixed random label
drawn from the label distribution; *selectivity* = task accuracy - control accuracy.

:func:`fit_probe` fits one probe on activations: logistic regression (L-BFGS in float64,
softmax for more than two classes, sigmoid for two), ridge regression for float labels (closed
form) or a one-hidden-layer MLP (Adam). Features are standardised; the L2 weight is chosen by
k-fold cross-validation on the training split among ``l2_grid``; the score (accuracy, or R^2
for a regression) is measured on a held-out test split. The objective is the mean loss plus
``l2 * ||W||^2`` (for scikit-learn: ``C = 1 / (2 * l2 * n)``, ``Ridge(alpha=l2 * n)``).

:func:`train_probe` reads a :class:`~mechkit.probing.ProbingDataset`'s activations at every
chosen layer in one batched pass and fits the task and control probes there, returning a
:class:`ProbeResult` (accuracy and selectivity by layer, the probes, save/load, and a probe's
direction as a :class:`~mechkit.SteeringVector`).

Example:
    >>> x = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    >>> probe = fit_probe(x, (x[:, 0] > 0).long(), l2=1e-3)
    >>> probe.test_score > 0.9
    True
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from mechkit.atomic_io import write_atomically
from mechkit.core.labels import model_name
from mechkit.core.results import rank
from mechkit.core.types import Model
from mechkit.errors import (
    EmptyDatasetError,
    FileFormatError,
    InvalidArgumentError,
    InvalidSiteError,
    ShapeError,
    check_choice,
    check_positive_int,
)
from mechkit.probing.datasets import ProbingDataset, collect_activations
from mechkit.reading import read_safetensors
from mechkit.sites import COMPONENTS, Site
from mechkit.steering.vectors import STEERING_SITES, SteeringVector

__all__ = [
    "Probe",
    "ProbeResult",
    "fit_probe",
    "fit_logistic",
    "check_site",
    "train_probe",
    "control_labels",
    "L2_GRID",
]

ProbeKind = Literal["logistic", "ridge", "mlp"]
L2_GRID: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
"""The L2 weights cross-validation chooses among by default."""


# ---------------------------------------------------------------------------------------------
# Fitting on activations


def fit_logistic(
    z: Float[Tensor, "batch d"], y: Tensor, n_classes: int, l2: float, steps: int = 200
) -> dict[str, Tensor]:
    """``{"weight": (out, d), "bias": (out,)}`` minimising mean cross-entropy + l2 ||W||^2
    (full-batch L-BFGS in float64 from zero; ``out`` is 1 for two classes, else C).

    Example:
        >>> z = torch.tensor([[-2.0], [-1.0], [1.0], [2.0]], dtype=torch.float64)
        >>> fit_logistic(z, torch.tensor([0, 0, 1, 1]), 2, 1e-2)["weight"].shape   # (out, d)
        torch.Size([1, 1])
    """
    out = 1 if n_classes == 2 else n_classes
    w = torch.zeros(out, z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(out, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=steps, tolerance_grad=1e-9, tolerance_change=1e-12,
        history_size=20, line_search_fn="strong_wolfe",
    )  # fmt: skip

    def closure() -> Tensor:
        optimizer.zero_grad()
        logits = z @ w.T + b  # (batch, out)
        if out == 1:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], y.double())
        else:
            loss = torch.nn.functional.cross_entropy(logits, y)
        loss = loss + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return {"weight": w.detach(), "bias": b.detach()}


def _fit_ridge(z: Tensor, y: Tensor, l2: float) -> dict[str, Tensor]:
    """Closed form of mean squared error + l2 ||w||^2 (intercept unpenalised)."""
    n = z.shape[0]
    zm, ym = z.mean(0), y.mean()
    zc = z - zm
    gram = zc.T @ zc + l2 * n * torch.eye(z.shape[1], dtype=z.dtype)
    w = torch.linalg.solve(gram, zc.T @ (y - ym))  # (d,)
    return {"weight": w[None], "bias": (ym - zm @ w)[None]}


def _fit_mlp(
    z: Tensor, y: Tensor, n_classes: int, l2: float, steps: int, hidden: int, seed: int
) -> dict[str, Tensor]:
    """A one-hidden-layer ReLU MLP by full-batch Adam (weight decay l2 on the weights)."""
    torch.manual_seed(seed)
    out = max(n_classes, 1)
    first, last = torch.nn.Linear(z.shape[1], hidden), torch.nn.Linear(hidden, out)
    net = torch.nn.Sequential(first, torch.nn.ReLU(), last).double()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            pred = net(z)
            if n_classes:
                loss = torch.nn.functional.cross_entropy(pred, y)
            else:
                loss = (pred[:, 0] - y).pow(2).mean()
            loss = loss + l2 * (first.weight.pow(2).sum() + last.weight.pow(2).sum())
            loss.backward()
            optimizer.step()
    return {k: v.detach() for k, v in net.state_dict().items()}


def _forward(kind: str, params: dict[str, Tensor], z: Tensor) -> Tensor:
    """Scores ``(batch, out)`` of a probe on standardised features."""
    if kind == "mlp":
        h = torch.relu(z @ params["0.weight"].T + params["0.bias"])
        return h @ params["2.weight"].T + params["2.bias"]
    return z @ params["weight"].T + params["bias"]


def _predict(kind: str, params: dict[str, Tensor], z: Tensor, n_classes: int) -> Tensor:
    scores = _forward(kind, params, z)
    if n_classes == 0:
        return scores[:, 0]
    if scores.shape[1] == 1:
        return (scores[:, 0] > 0).long()
    return scores.argmax(-1)


def _score(pred: Tensor, y: Tensor, n_classes: int) -> float:
    if n_classes:
        return float((pred == y).double().mean())
    total = (y - y.mean()).pow(2).sum()
    return float(1 - (pred - y).pow(2).sum() / total) if total > 0 else 0.0


def _group_split(groups: Tensor, n_parts: int, seed: int) -> list[Tensor]:
    """Indices cut into ``n_parts`` parts with every group wholly inside one part."""
    g = torch.Generator().manual_seed(seed)
    unique = torch.unique(groups)
    order = unique[torch.randperm(len(unique), generator=g)]
    return [torch.nonzero(torch.isin(groups, order[i::n_parts]))[:, 0] for i in range(n_parts)]


def _stratified_split(y: Tensor, n_classes: int, n_parts: int, seed: int) -> list[Tensor]:
    """Indices cut into ``n_parts`` parts, each class spread evenly (regression: at random)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=g)
    if n_classes:
        order = order[torch.sort(y[order], stable=True).indices]  # classes grouped, shuffled
    return [order[i::n_parts] for i in range(n_parts)]


@dataclasses.dataclass(frozen=True)
class Probe:
    """A fitted probe; ``params`` act on standardised features ``(x - mean) / std``.

    Attributes:
        kind: ``"logistic"``, ``"ridge"`` or ``"mlp"``.
        params: the probe's tensors (``weight``/``bias`` for a linear probe).
        mean, std: the standardisation, ``(d,)`` each.
        n_classes: classes (0 for a regression).
        l2: the L2 weight used (chosen by cross-validation unless given).
        train_score, test_score: accuracy (R^2 for a regression) on each split.
        cv_scores: the mean validation score of each L2 weight tried (empty when given).

    Example:
        >>> x = torch.randn(100, 4, generator=torch.Generator().manual_seed(1))
        >>> probe = fit_probe(x, (x[:, 1] > 0).long(), l2=1e-3)
        >>> probe.predict(x[:3]).shape, probe.direction().shape     # (batch,), (d,)
        (torch.Size([3]), torch.Size([4]))
    """

    kind: str
    params: dict[str, Tensor]
    mean: Tensor
    std: Tensor
    n_classes: int
    l2: float
    train_score: float
    test_score: float
    cv_scores: dict[float, float] = dataclasses.field(default_factory=dict)

    def scores(self, x: Float[Tensor, "batch d"]) -> Float[Tensor, "batch out"]:
        """The probe's logits (or regression output), ``(batch, out)``."""
        z = (x.double() - self.mean) / self.std
        return _forward(self.kind, self.params, z)

    def predict(self, x: Float[Tensor, "batch d"]) -> Tensor:
        """Class indices (or regression values) for activations ``x``."""
        z = (x.double() - self.mean) / self.std
        return _predict(self.kind, self.params, z, self.n_classes)

    def direction(self, class_index: int | None = None) -> Float[Tensor, " d"]:
        """A linear probe's weight in the activation basis (``w / std``: the gradient of its
        logit), unit norm. ``class_index`` picks a class of a multi-class probe (for two
        classes the direction points to class 1)."""
        if self.kind == "mlp":
            raise InvalidArgumentError(
                "Expected a linear probe (logistic or ridge) for a direction; got an MLP probe. "
                "Hint: train_probe(..., kind='linear')."
            )
        weight = self.params["weight"]
        if weight.shape[0] > 1 and class_index is None:
            raise InvalidArgumentError(
                f"Expected class_index for a probe of {weight.shape[0]} classes; got None."
            )
        row = weight[0 if weight.shape[0] == 1 else int(class_index)]  # type: ignore[arg-type]
        v = row / self.std
        return (v / v.norm()).float()


def fit_probe(
    x: Float[Tensor, "batch d"],
    labels: Tensor,
    *,
    kind: Literal["linear", "mlp"] = "linear",
    l2: float | None = None,
    l2_grid: Sequence[float] = L2_GRID,
    folds: int = 5,
    test_fraction: float = 0.25,
    steps: int = 200,
    hidden: int = 64,
    groups: Tensor | None = None,
    seed: int = 0,
) -> Probe:
    """Fit a probe on activations ``x`` for integer class ``labels`` (or float targets).

    Args:
        x: ``(batch, d)`` activations.
        labels: ``(batch,)`` class indices 0..C-1 (int) or targets (float: ridge regression).
        kind: ``"linear"`` (logistic for classes, ridge for floats) or ``"mlp"``.
        l2: the L2 weight; None chooses it among ``l2_grid`` by ``folds``-fold
            cross-validation on the training split.
        test_fraction: the share held out (stratified by class) to score the final probe.
        steps: L-BFGS iterations (logistic) or Adam steps (MLP).
        hidden: the MLP's hidden width.
        groups: ``(batch,)`` integer group ids (word types): the test split and the folds then
            hold out whole groups, so the score is on types never seen in training.
        seed: the split, the folds and the MLP's initialisation.

    Example:
        >>> x = torch.randn(120, 6, generator=torch.Generator().manual_seed(0))
        >>> probe = fit_probe(x, x[:, 2].double() * 3.0)             # ridge, R^2
        >>> round(probe.test_score, 2), probe.kind
        (1.0, 'ridge')
    """
    check_choice("kind", kind, ["linear", "mlp"])
    if not isinstance(x, Tensor) or x.ndim != 2:
        raise ShapeError(f"Expected x of shape (batch, d); got {getattr(x, 'shape', type(x))}.")
    labels = torch.as_tensor(labels)
    if labels.shape != (x.shape[0],):
        raise ShapeError(
            f"Expected one label per row of x ({x.shape[0]}); got labels of shape "
            f"{tuple(labels.shape)}."
        )
    regression = labels.is_floating_point()
    y = labels.double() if regression else labels.long()
    n_classes = 0 if regression else int(y.max()) + 1
    if not regression and len(torch.unique(y)) < 2:
        raise InvalidArgumentError(
            f"Expected at least two classes to probe for; got only class {int(y[0])}. Hint: a "
            "property with one value is trivially 'readable'; check the labels."
        )
    check_positive_int("folds", folds)
    if not 0.0 < test_fraction < 1.0:
        raise InvalidArgumentError(f"Expected 0 < test_fraction < 1; got {test_fraction!r}.")
    n_test = max(1, round(len(y) * test_fraction))
    per_class = torch.bincount(y, minlength=n_classes) if n_classes else None
    smallest = int(per_class.min()) if per_class is not None else len(y)
    if len(y) - n_test < max(folds, 2) or smallest < 2 or (l2 is None and smallest < folds):
        raise EmptyDatasetError(
            f"Expected enough examples for {folds} folds and a test split (at least {folds} "
            f"per class); got {len(y)} examples, the rarest class with {smallest}. Hint: more "
            "data, fewer folds, or l2=... to skip cross-validation."
        )
    model_kind: str = "mlp" if kind == "mlp" else ("ridge" if regression else "logistic")
    x = x.double()
    n_parts = max(2, round(1 / test_fraction))
    if groups is not None:
        groups = torch.as_tensor(groups).long()
        if groups.shape != y.shape or len(torch.unique(groups)) < max(n_parts, folds):
            raise InvalidArgumentError(
                f"Expected one group id per example and at least {max(n_parts, folds)} groups; "
                f"got shape {tuple(groups.shape)} with {len(torch.unique(groups))} groups."
            )
        parts = _group_split(groups, n_parts, seed)
    else:
        parts = _stratified_split(y, n_classes, n_parts, seed)
    test = parts[0]
    train = torch.cat(parts[1:])

    def fit(xs: Tensor, ys: Tensor, weight: float) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        mean = xs.mean(0)
        std = xs.std(0, unbiased=False)
        std = torch.where(std > 1e-12, std, torch.ones_like(std))
        z = (xs - mean) / std
        if model_kind == "logistic":
            params = fit_logistic(z, ys, n_classes, weight, steps)
        elif model_kind == "ridge":
            params = _fit_ridge(z, ys, weight)
        else:
            params = _fit_mlp(z, ys, n_classes, weight, steps, hidden, seed)
        return params, mean, std

    def evaluate(params: dict[str, Tensor], mean: Tensor, std: Tensor, rows: Tensor) -> float:
        pred = _predict(model_kind, params, (x[rows] - mean) / std, n_classes)
        return _score(pred, y[rows], n_classes)

    cv: dict[float, float] = {}
    if l2 is None:
        fold_parts = (
            _stratified_split(y[train], n_classes, folds, seed + 1)
            if groups is None
            else _group_split(groups[train], folds, seed + 1)
        )
        for weight in l2_grid:
            values = []
            for i, held in enumerate(fold_parts):
                rest = torch.cat([p for j, p in enumerate(fold_parts) if j != i])
                params, mean, std = fit(x[train][rest], y[train][rest], float(weight))
                values.append(evaluate(params, mean, std, train[held]))
            cv[float(weight)] = sum(values) / len(values)
        l2 = max(cv, key=lambda w: (cv[w], w))  # ties: the stronger penalty
    params, mean, std = fit(x[train], y[train], float(l2))
    return Probe(
        model_kind, params, mean, std, n_classes, float(l2),
        evaluate(params, mean, std, train), evaluate(params, mean, std, test), cv,
    )  # fmt: skip


def control_labels(dataset: ProbingDataset, *, seed: int = 0) -> Tensor:
    """Hewitt & Liang's control task: each word type gets one label drawn from the dataset's
    label distribution (seeded); every example of a type carries its type's label.

    Example:
        >>> data = ProbingDataset(["a", "b", "a", "c"], [0] * 4, [0, 1, 1, 0],
        ...                       types=["a", "b", "a", "c"])
        >>> labels = control_labels(data)
        >>> bool(labels[0] == labels[2])                     # the same type, the same label
        True
    """
    rng = random.Random(seed)
    observed = dataset.label_ids.tolist()
    assigned: dict[str, Any] = {}
    for t in sorted(set(dataset.word_types)):
        assigned[t] = rng.choice(observed)
    values = [assigned[t] for t in dataset.word_types]
    return torch.tensor(values, dtype=torch.float64 if dataset.is_regression else torch.long)


# ---------------------------------------------------------------------------------------------
# Probing a model


@dataclasses.dataclass(frozen=True, eq=False)
class ProbeResult:
    """Probes at several layers of one site, with their control tasks.

    Attributes:
        layers: the layers probed.
        site: the component (``"resid_pre"``...).
        accuracy: ``(layer,)`` held-out accuracy (R^2 for a regression).
        control_accuracy: ``(layer,)`` the same probe's held-out accuracy on the control task
            (NaN when ``control=False``).
        train_accuracy: ``(layer,)`` accuracy on the training split.
        l2: ``(layer,)`` the chosen L2 weights.
        probes: the task probe of each layer.
        classes: the class names (empty for a regression).
        majority: the most frequent class's share (the constant predictor's accuracy).
        metadata: model, dataset, kind, seed.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> data = mk.probing.ProbingDataset(
        ...     [(i % 7 + 1, i % 5 + 1) for i in range(60)], [-1] * 60,
        ...     [int(i % 5 > 1) for i in range(60)])
        >>> result = mk.train_probe(model, data, layers=[0, 1], l2=1e-2)
        >>> result.accuracy.shape, result.top(1)[0][0]                      # (layer,)
        (torch.Size([2]), 'L0')
    """

    layers: tuple[int, ...]
    site: str
    accuracy: Float[Tensor, " layer"]
    control_accuracy: Float[Tensor, " layer"]
    train_accuracy: Float[Tensor, " layer"]
    l2: Float[Tensor, " layer"]
    probes: tuple[Probe, ...]
    classes: tuple[str, ...]
    majority: float
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def selectivity(self) -> Float[Tensor, " layer"]:
        """Accuracy minus control accuracy, per layer (Hewitt & Liang 2019)."""
        return self.accuracy - self.control_accuracy

    def probe(self, layer: int) -> Probe:
        """The probe at ``layer``."""
        if layer not in self.layers:
            raise InvalidArgumentError(
                f"Expected a probed layer in {list(self.layers)}; got {layer!r}."
            )
        return self.probes[self.layers.index(layer)]

    def top(self, n: int = 10, *, absolute: bool = True) -> list[tuple[str, float]]:
        """The ``n`` layers (``"L3"``) with the highest held-out accuracy (see
        :func:`mechkit.core.rank`)."""
        return rank([f"L{layer}" for layer in self.layers], self.accuracy, n, absolute=absolute)

    def to_dataframe(self) -> Any:
        """One row per layer: accuracy, control accuracy, selectivity, train accuracy, l2."""
        import pandas as pd

        return pd.DataFrame(
            {
                "layer": list(self.layers),
                "accuracy": self.accuracy.tolist(),
                "control_accuracy": self.control_accuracy.tolist(),
                "selectivity": self.selectivity.tolist(),
                "train_accuracy": self.train_accuracy.tolist(),
                "l2": self.l2.tolist(),
            }
        )

    def plot(self) -> Any:
        """Accuracy, control accuracy and selectivity by layer (plotly), with the majority rate."""
        import plotly.graph_objects as go

        fig = go.Figure()
        layers = list(self.layers)
        for name, values in (
            ("accuracy", self.accuracy),
            ("control accuracy", self.control_accuracy),
            ("selectivity", self.selectivity),
        ):
            fig.add_trace(go.Scatter(x=layers, y=values.tolist(), mode="lines+markers", name=name))
        if self.classes:
            fig.add_hline(y=self.majority, line_dash="dot", annotation_text="majority class")
        fig.update_layout(
            title=f"Probe on {self.metadata.get('dataset', '')} ({self.site})",
            xaxis_title="layer",
            yaxis_title="held-out accuracy" if self.classes else "held-out R^2",
        )
        return fig

    def steering_vector(self, layer: int, class_index: int | None = None) -> SteeringVector:
        """A linear probe's unit direction at ``layer`` as a :class:`~mechkit.SteeringVector`
        (residual sites only; ``class_index`` for more than two classes).

        Example:
            >>> x = mk.load_model("attn-only-2l")
            >>> data = mk.probing.ProbingDataset([(i % 9 + 1,) for i in range(40)], [0] * 40,
            ...                                  [int(i % 9 > 4) for i in range(40)])
            >>> res = mk.train_probe(x, data, layers=[1], l2=1e-2, control=False)
            >>> res.steering_vector(1).hook_name
            'blocks.1.hook_resid_pre'
        """
        if self.site not in STEERING_SITES:
            raise InvalidSiteError(
                f"Expected a residual site ({', '.join(STEERING_SITES)}) for a steering vector; "
                f"the probes read {self.site!r}."
            )
        meta = {**self.metadata, "layer_accuracy": float(self.accuracy[self.layers.index(layer)])}
        direction = self.probe(layer).direction(class_index)
        return SteeringVector(direction, layer=layer, site=self.site, method="probe", metadata=meta)

    def save(self, path: str | Path) -> None:
        """Write a safetensors file (every probe's tensors) with the rest as JSON metadata."""
        from safetensors.torch import save_file

        tensors = {"accuracy": self.accuracy, "control_accuracy": self.control_accuracy,
                   "train_accuracy": self.train_accuracy, "l2": self.l2}  # fmt: skip
        probes = []
        for layer, probe in zip(self.layers, self.probes, strict=True):
            for key, value in probe.params.items():
                tensors[f"probe.{layer}.{key}"] = value
            tensors[f"probe.{layer}.mean"], tensors[f"probe.{layer}.std"] = probe.mean, probe.std
            probes.append(
                {"kind": probe.kind, "keys": list(probe.params), "n_classes": probe.n_classes,
                 "l2": probe.l2, "train_score": probe.train_score,
                 "test_score": probe.test_score, "cv_scores": list(probe.cv_scores.items())}
            )  # fmt: skip
        header = {
            "format": "mechkit.ProbeResult",
            "json": json.dumps(
                {"layers": list(self.layers), "site": self.site, "classes": list(self.classes),
                 "majority": self.majority, "metadata": self.metadata, "probes": probes}
            ),
        }  # fmt: skip
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=header))

    @classmethod
    def load(cls, path: str | Path) -> ProbeResult:
        """Read a result written by :meth:`save`.

        Raises:
            FileFormatError: damaged, truncated, or not a probe result (the message names it).
        """
        hint = "write it with ProbeResult.save."
        tensors, header = read_safetensors(path, "a probe result (ProbeResult.save)", hint)
        try:
            if header.get("format") != "mechkit.ProbeResult":
                raise KeyError("format")
            info = json.loads(header["json"])
            probes = []
            for layer, p in zip(info["layers"], info["probes"], strict=True):
                params = {k: tensors[f"probe.{layer}.{k}"] for k in p["keys"]}
                probes.append(
                    Probe(p["kind"], params, tensors[f"probe.{layer}.mean"],
                          tensors[f"probe.{layer}.std"], p["n_classes"], p["l2"],
                          p["train_score"], p["test_score"], dict(map(tuple, p["cv_scores"])))
                )  # fmt: skip
            return cls(
                tuple(info["layers"]), info["site"], tensors["accuracy"],
                tensors["control_accuracy"], tensors["train_accuracy"], tensors["l2"],
                tuple(probes), tuple(info["classes"]), info["majority"], info["metadata"],
            )  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            raise FileFormatError(
                f"Expected a probe-result file from ProbeResult.save; {str(path)!r} lacks or "
                f"garbles {exc}. Hint: {hint}"
            ) from None

    def __repr__(self) -> str:
        best = self.top(1)[0]
        return (
            f"ProbeResult(dataset={self.metadata.get('dataset')!r}, site={self.site!r}, "
            f"layers={len(self.layers)}, best={best[0]} ({best[1]:.3f}))"
        )


def check_site(model: Model, site: str, layers: Sequence[int]) -> list[str]:
    """The hook names of ``site`` at ``layers`` (checked), for the probing family.

    Example:
        >>> check_site(mk.load_model("attn-only-2l"), "resid_post", [0, 1])
        ['blocks.0.hook_resid_post', 'blocks.1.hook_resid_post']
    """
    check_choice("site", site, COMPONENTS)
    n = model.cfg.n_layers
    out = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not -n <= layer < n:
            raise InvalidSiteError(
                f"Expected layers in [0, {n}) (the model has {n} layers); got {layer!r}."
            )
        out.append(Site(site, layer=layer % n).resolve(model).hook_name)  # type: ignore[arg-type]
    return out


def train_probe(
    model: Model,
    dataset: ProbingDataset,
    *,
    layers: Sequence[int] | None = None,
    site: str = "resid_pre",
    kind: Literal["linear", "mlp"] = "linear",
    control: bool = True,
    l2: float | None = None,
    l2_grid: Sequence[float] = L2_GRID,
    folds: int = 5,
    test_fraction: float = 0.25,
    split: Literal["random", "type"] = "random",
    seed: int = 0,
    batch_size: int | None = None,
    memory_budget: int | str | None = None,
    progress: bool = False,
) -> ProbeResult:
    """Train a probe (and its control-task twin) at each layer of ``site`` on ``dataset``.

    Args:
        model: the HookedTransformer.
        dataset: labelled positions (:class:`~mechkit.probing.ProbingDataset`).
        layers: the layers to probe (None: all).
        site: the component read at each layer (``"resid_pre"``, ``"mlp_out"``...).
        kind: ``"linear"`` (logistic, or ridge for float labels) or ``"mlp"``.
        control: also fit the control task (Hewitt & Liang) for selectivity.
        l2: a fixed L2 weight (None: cross-validated among ``l2_grid``).
        folds, test_fraction, seed: cross-validation folds, held-out share and seed.
        split: ``"random"`` (examples split at random, stratified by class: Hewitt & Liang's
            setting, where a control task can be memorised from types seen in training) or
            ``"type"`` (whole word types held out: accuracy on types never seen, where the
            control task is at chance and selectivity measures generalisation).
        batch_size: texts per forward pass (None: as many as ``memory_budget`` holds; halved
            on running out of memory).
        memory_budget: bytes (or ``"2GB"``) a forward pass may use when ``batch_size`` is
            None; None: 2 GiB on CPU, 60% of free memory on CUDA.
        progress: show a progress bar.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> data = mk.probing.ProbingDataset(
        ...     [(i % 7 + 1, i % 3 + 1) for i in range(42)], [1] * 42, [i % 3 for i in range(42)])
        >>> result = mk.train_probe(model, data, layers=[0], l2=1e-2)
        >>> float(result.accuracy[0]), result.classes                      # 3 classes
        (1.0, ('0', '1', '2'))
    """
    layer_list = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    if not layer_list:
        raise InvalidArgumentError("Expected at least one layer to probe; got none.")
    hooks = check_site(model, site, layer_list)
    layer_list = [la % model.cfg.n_layers for la in layer_list]
    acts = collect_activations(model, dataset, hooks, batch_size=batch_size,
                               memory_budget=memory_budget, progress=progress)  # fmt: skip
    y = dataset.label_ids
    y_control = control_labels(dataset, seed=seed) if control else None
    check_choice("split", split, ["random", "type"])
    groups = None
    if split == "type":
        index = {t: i for i, t in enumerate(dict.fromkeys(dataset.word_types))}
        groups = torch.tensor([index[t] for t in dataset.word_types])
    options = dict(kind=kind, l2=l2, l2_grid=l2_grid, folds=folds,
                   test_fraction=test_fraction, seed=seed, groups=groups)  # fmt: skip
    probes, accuracy, control_acc = [], [], []
    for hook in hooks:
        probe = fit_probe(acts[hook], y, **options)  # type: ignore[arg-type]
        probes.append(probe)
        accuracy.append(probe.test_score)
        if y_control is not None and len(torch.unique(y_control)) > 1:
            control_acc.append(fit_probe(acts[hook], y_control, **options).test_score)  # type: ignore[arg-type]
        else:
            control_acc.append(float("nan"))
    counts = torch.bincount(y) if not dataset.is_regression else None
    majority = float(counts.max() / counts.sum()) if counts is not None else float("nan")
    metadata = {"model": model_name(model), "dataset": dataset.name, "kind": kind,
                "seed": seed, "n_examples": len(dataset), "split": split}  # fmt: skip
    return ProbeResult(
        tuple(layer_list), site, torch.tensor(accuracy), torch.tensor(control_acc),
        torch.tensor([p.train_score for p in probes]), torch.tensor([p.l2 for p in probes]),
        tuple(probes), tuple(str(c) for c in dataset.classes), majority, metadata,
    )  # fmt: skip
