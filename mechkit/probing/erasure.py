"""Concept erasure: remove what a linear classifier could read about a concept, then watch the LM.

**LEACE** (Belrose et al. 2023, "LEACE: Perfect linear concept erasure in closed form") is the
affine edit of least mean squared size after which *no* linear classifier predicts the concept
better than a constant. With ``W = Sigma_xx^(-1/2)`` (pseudo-inverse square root) and ``U`` the
left singular vectors of ``W Sigma_xz`` (singular values above ``svd_tol``), the erased features
are ``x - W^+ U U^T W (x - mu_x)``. Linear guardedness is equivalent to a zero cross-covariance
between the erased features and the concept (equal class-conditional means). The *oracle*
eraser, which also sees the concept's value, is ``x - (z - mu_z) (Sigma_xz Sigma_zz^+)^T``.

**INLP** (Ravfogel et al. 2020, "Null It Out") is the iterative baseline: train a linear
classifier, project the features onto its weights' null space, repeat.

**Amnesic probing** (Elazar et al. 2021, "Amnesic Probing") compares the LM's loss (and a task
metric) with the concept erased inside the model against erasing a random subspace of the same
rank: if the concept's removal hurts more than a random one's, the model used it.

An eraser is a :class:`ConceptEraser` (``x - L R (x - b)``); :func:`erase` applies it inside
the model at its hook, as a scoped intervention that leaves no hook behind.

Example:
    >>> x = torch.randn(200, 5, dtype=torch.float64)
    >>> labels = (x[:, 0] > 0).long()
    >>> eraser = ConceptEraser.leace(x, labels)
    >>> erased = eraser(x)
    >>> gap = erased[labels == 0].mean(0) - erased[labels == 1].mean(0)  # class means agree
    >>> eraser.rank, bool(gap.abs().max() < 1e-8)
    (1, True)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from mechkit.atomic_io import write_atomically
from mechkit.core.batching import each_batch
from mechkit.core.labels import model_name
from mechkit.core.results import rank
from mechkit.core.types import Model
from mechkit.errors import (
    FileFormatError,
    InvalidArgumentError,
    ShapeError,
    SiteNotFoundError,
    check_choice,
    check_positive_int,
    did_you_mean,
)
from mechkit.hook_scope import hook_scope
from mechkit.probing.datasets import ProbingDataset, collect_activations, prompts_per_forward
from mechkit.probing.probes import check_site, fit_logistic, fit_probe
from mechkit.reading import read_safetensors
from mechkit.tokens import encode, pad_right

__all__ = [
    "ConceptEraser",
    "OracleEraser",
    "AmnesicResult",
    "fit_leace",
    "fit_inlp",
    "erase",
    "amnesic_probe",
    "lm_loss",
]


def _concept_matrix(labels: Tensor, n: int) -> Tensor:
    """``(n, k)`` float64: one-hot classes for integer labels, the values for float labels."""
    labels = torch.as_tensor(labels)
    if labels.shape[0] != n:
        raise ShapeError(
            f"Expected one label per row of x ({n}); got labels of shape {tuple(labels.shape)}."
        )
    if labels.is_floating_point():
        z = labels.double().reshape(n, -1)
    else:
        if labels.ndim != 1:
            raise ShapeError(
                f"Expected integer labels of shape (batch,); got {tuple(labels.shape)}."
            )
        z = torch.nn.functional.one_hot(labels.long()).double()
    if z.shape[1] < 2 and not labels.is_floating_point() or z.std(0).max() == 0:
        raise InvalidArgumentError(
            "Expected a concept that varies (at least two classes); got a constant one. Hint: "
            "there is nothing to erase from a concept with one value."
        )
    return z


def _whitening(xc: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``Sigma^(-1/2)``, ``Sigma^(1/2)`` (pseudo-inverse roots, float64) of centred ``xc``'s
    sample covariance, and the ``(d, r)`` orthonormal basis of its range."""
    sigma_xx = xc.T @ xc / (xc.shape[0] - 1)
    values, vectors = torch.linalg.eigh(sigma_xx)
    keep = values > values[-1] * sigma_xx.shape[-1] * torch.finfo(values.dtype).eps
    values = values.clamp_min(0.0)
    w = vectors * torch.where(keep, values.rsqrt(), 0.0) @ vectors.T  # Sigma^(-1/2)
    w_inv = vectors * torch.where(keep, values.sqrt(), 0.0) @ vectors.T  # Sigma^(1/2)
    return w, w_inv, vectors[:, keep]


def _check_x(x: Any) -> Tensor:
    if not isinstance(x, Tensor) or x.ndim != 2 or x.shape[0] < 2:
        raise ShapeError(
            f"Expected activations of shape (batch >= 2, d); got {getattr(x, 'shape', type(x))}."
        )
    return x.double()


@dataclasses.dataclass(frozen=True, eq=False)
class ConceptEraser:
    """An affine eraser ``x -> x - ((x - bias) @ proj_right.T) @ proj_left.T``.

    Attributes:
        proj_left: ``(d, rank)``.
        proj_right: ``(rank, d)``.
        bias: ``(d,)`` the point the edit is anchored at (the mean for LEACE), or None.
        method: ``"leace"``, ``"inlp"``, ``"random"`` or ``"random-whitened"``.
        hook_name: where in the model it was fitted (None for one fitted on plain tensors).
        metadata: model, dataset, classes...

    Example:
        >>> x = torch.randn(100, 4, dtype=torch.float64)
        >>> eraser = ConceptEraser.leace(x, (x[:, 1] > 0).long())
        >>> eraser(x).shape, eraser.rank, eraser.matrix.shape                 # (batch, d)
        (torch.Size([100, 4]), 1, torch.Size([4, 4]))
    """

    proj_left: Float[Tensor, "d rank"]
    proj_right: Float[Tensor, "rank d"]
    bias: Float[Tensor, " d"] | None = None
    method: str = "leace"
    hook_name: str | None = None
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __call__(self, x: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
        if x.shape[-1] != self.proj_left.shape[0]:
            raise ShapeError(
                f"Expected activations with last dimension {self.proj_left.shape[0]}; got "
                f"{tuple(x.shape)}."
            )
        left = self.proj_left.to(x.device, torch.promote_types(x.dtype, torch.float32))
        right = self.proj_right.to(left.device, left.dtype)
        delta = x.to(left.dtype)
        if self.bias is not None:
            delta = delta - self.bias.to(left.device, left.dtype)
        return (x.to(left.dtype) - (delta @ right.T) @ left.T).to(x.dtype)

    @property
    def rank(self) -> int:
        """The rank of the edit (how many dimensions it changes)."""
        return int(self.proj_left.shape[1])

    @property
    def matrix(self) -> Float[Tensor, "d d"]:
        """The linear part ``I - proj_left @ proj_right``."""
        d = self.proj_left.shape[0]
        return torch.eye(d, dtype=self.proj_left.dtype) - self.proj_left @ self.proj_right

    @classmethod
    def leace(
        cls, x: Float[Tensor, "batch d"], labels: Tensor, *, svd_tol: float = 0.01
    ) -> ConceptEraser:
        """The LEACE eraser of ``labels`` (integer classes, or float values ``(batch,)`` or
        ``(batch, k)``) from ``x``, in float64, with the sample covariances (no shrinkage).

        Example:
            >>> x = torch.randn(50, 3, dtype=torch.float64)
            >>> ConceptEraser.leace(x, torch.arange(50) % 3).rank      # 3 classes: rank <= 2
            2
        """
        x = _check_x(x)
        z = _concept_matrix(labels, x.shape[0])
        n = x.shape[0]
        mean = x.mean(0)
        xc, zc = x - mean, z - z.mean(0)
        sigma_xz = xc.T @ zc / (n - 1)
        w, w_inv, _ = _whitening(xc)
        u, s, _ = torch.linalg.svd(w @ sigma_xz, full_matrices=False)
        u = u[:, s > svd_tol]  # (d, rank)
        return cls(w_inv @ u, u.T @ w, mean, "leace")

    @classmethod
    def inlp(
        cls,
        x: Float[Tensor, "batch d"],
        labels: Tensor,
        *,
        n_iterations: int = 10,
        l2: float = 1e-4,
        tolerance: float = 0.01,
    ) -> ConceptEraser:
        """INLP (Ravfogel et al. 2020): up to ``n_iterations`` rounds of fitting a logistic
        probe on the projected (centred) features and adding its weights to the erased space;
        stops early once the probe's training accuracy is within ``tolerance`` of the
        majority rate. The result is the orthogonal projection onto the remaining space.

        Example:
            >>> x = torch.randn(200, 6, dtype=torch.float64)
            >>> eraser = ConceptEraser.inlp(x, (x[:, :2].sum(1) > 0).long(), n_iterations=3)
            >>> eraser.method, eraser.rank <= 3
            ('inlp', True)
        """
        x = _check_x(x)
        check_positive_int("n_iterations", n_iterations)
        y = torch.as_tensor(labels).long()
        _concept_matrix(y, x.shape[0])
        n_classes = int(y.max()) + 1
        majority = float(torch.bincount(y).max()) / len(y)
        xc = x - x.mean(0)
        basis = torch.zeros(x.shape[1], 0, dtype=torch.float64)
        for _ in range(n_iterations):
            projected = xc - (xc @ basis) @ basis.T
            params = fit_logistic(projected, y, n_classes, l2)
            scores = projected @ params["weight"].T + params["bias"]
            pred = (scores[:, 0] > 0).long() if scores.shape[1] == 1 else scores.argmax(-1)
            if float((pred == y).double().mean()) <= majority + tolerance:
                break
            rows = params["weight"] - (params["weight"] @ basis) @ basis.T  # in the null space
            q, r = torch.linalg.qr(torch.cat([basis, rows.T], dim=1))
            basis = q[:, r.diagonal().abs() > 1e-10]
        return cls(basis, basis.T.clone(), None, "inlp")

    @classmethod
    def random(
        cls,
        d: int,
        rank: int,
        *,
        bias: Tensor | None = None,
        seed: int = 0,
        like: Float[Tensor, "batch d"] | None = None,
    ) -> ConceptEraser:
        """An eraser of a random ``rank``-dimensional subspace: amnesic probing's control.

        Without ``like``, the orthogonal projection that removes a uniformly random subspace
        (about ``bias``). With activations ``like``, a random *LEACE-shaped* eraser: LEACE's
        formula ``x - Sigma^(1/2) U U^T Sigma^(-1/2) (x - mean)`` with its concept directions
        ``U`` replaced by a uniformly random orthonormal ``rank``-frame of the whitened space
        (inside the covariance's range), anchored at ``like``'s mean (or ``bias``). It removes
        exactly as much whitened variance as LEACE of the same rank (``rank`` unit-variance
        directions) and differs from LEACE only in which directions it takes. Like LEACE, it
        reads through ``Sigma^(-1/2)``, so on activations far outside ``like`` (an attention
        sink's massive activations) its edit can be very large.

        Example:
            >>> e = ConceptEraser.random(8, 2, seed=1)
            >>> e.rank, bool(torch.allclose(e.matrix @ e.matrix, e.matrix, atol=1e-10))
            (2, True)
            >>> x = torch.randn(100, 8, dtype=torch.float64) * torch.arange(1, 9)
            >>> w = ConceptEraser.random(8, 2, like=x, seed=1)
            >>> w.rank, bool(torch.allclose(w.matrix @ w.matrix, w.matrix, atol=1e-10))
            (2, True)
        """
        check_positive_int("d", d)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= d:
            raise InvalidArgumentError(f"Expected 0 <= rank <= d ({d}); got {rank!r}.")
        g = torch.Generator().manual_seed(seed)
        if like is None:
            q, _ = torch.linalg.qr(torch.randn(d, max(rank, 1), generator=g, dtype=torch.float64))
            q = q[:, :rank]
            return cls(q, q.T.clone(), bias, "random")
        x = _check_x(like)
        if x.shape[1] != d:
            raise ShapeError(f"Expected activations of width d={d}; got {tuple(x.shape)}.")
        mean = x.mean(0)
        w, w_inv, span = _whitening(x - mean)
        if rank > span.shape[1]:
            raise InvalidArgumentError(
                f"Expected rank <= {span.shape[1]} (the dimension the activations span); got "
                f"{rank}. Hint: more activations, or a smaller rank."
            )
        frame = torch.randn(span.shape[1], max(rank, 1), generator=g, dtype=torch.float64)
        u, _ = torch.linalg.qr(span @ frame)  # (d, rank): random, inside the range
        u = u[:, :rank]
        return cls(w_inv @ u, u.T @ w, mean if bias is None else bias, "random-whitened")

    def at(self, hook_name: str, **metadata: Any) -> ConceptEraser:
        """The same eraser, recorded as belonging at ``hook_name``."""
        return dataclasses.replace(
            self, hook_name=hook_name, metadata={**self.metadata, **metadata}
        )

    def save(self, path: str | Path) -> None:
        """Write a safetensors file (the projections and bias; the rest as JSON metadata)."""
        from safetensors.torch import save_file

        tensors = {"proj_left": self.proj_left, "proj_right": self.proj_right}
        if self.bias is not None:
            tensors["bias"] = self.bias
        header = {
            "format": "mechkit.ConceptEraser",
            "json": json.dumps(
                {"method": self.method, "hook_name": self.hook_name, "metadata": self.metadata}
            ),
        }
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=header))

    @classmethod
    def load(cls, path: str | Path) -> ConceptEraser:
        """Read an eraser written by :meth:`save`.

        Raises:
            FileFormatError: damaged, truncated, or not an eraser (the message names it).
        """
        hint = "write it with ConceptEraser.save."
        tensors, header = read_safetensors(path, "a concept eraser (ConceptEraser.save)", hint)
        try:
            if header.get("format") != "mechkit.ConceptEraser":
                raise KeyError("format")
            info = json.loads(header["json"])
            return cls(
                tensors["proj_left"], tensors["proj_right"], tensors.get("bias"),
                info["method"], info["hook_name"], info["metadata"],
            )  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            raise FileFormatError(
                f"Expected a concept-eraser file from ConceptEraser.save; {str(path)!r} lacks "
                f"or garbles {exc}. Hint: {hint}"
            ) from None

    def __repr__(self) -> str:
        return (
            f"ConceptEraser(method={self.method!r}, rank={self.rank}, "
            f"d={self.proj_left.shape[0]}, hook_name={self.hook_name!r})"
        )


@dataclasses.dataclass(frozen=True, eq=False)
class OracleEraser:
    """Oracle LEACE: ``x - (z - mu_z) @ beta.T`` with ``beta = Sigma_xz Sigma_zz^+``; it needs
    the concept's value of every row it erases, and edits less than LEACE on average.

    Example:
        >>> x = torch.randn(100, 4, dtype=torch.float64)
        >>> labels = (x[:, 0] > 0).long()
        >>> oracle = OracleEraser.fit(x, labels)
        >>> oracle(x, labels).shape                                           # (batch, d)
        torch.Size([100, 4])
    """

    beta: Float[Tensor, "d k"]
    mean_z: Float[Tensor, " k"]

    @classmethod
    def fit(cls, x: Float[Tensor, "batch d"], labels: Tensor) -> OracleEraser:
        """Fit on activations and labels (integer classes or float values)."""
        x = _check_x(x)
        z = _concept_matrix(labels, x.shape[0])
        xc, zc = x - x.mean(0), z - z.mean(0)
        n = x.shape[0]
        beta = (xc.T @ zc / (n - 1)) @ torch.linalg.pinv(
            zc.T @ zc / (n - 1), hermitian=True, rtol=1e-10
        )
        return cls(beta, z.mean(0))

    def __call__(self, x: Float[Tensor, "batch d"], labels: Tensor) -> Float[Tensor, "batch d"]:
        labels = torch.as_tensor(labels)
        if labels.is_floating_point():
            z = labels.double().reshape(x.shape[0], -1)
        else:  # one-hot over every class fitted, also for a batch that lacks some
            z = torch.nn.functional.one_hot(labels.long(), self.beta.shape[1]).double()
        return (x.double() - (z - self.mean_z) @ self.beta.T).to(x.dtype)


def _fit_on_model(
    model: Model,
    dataset: ProbingDataset,
    layer: int,
    site: str,
    batch_size: int | None,
    memory_budget: int | str | None,
) -> tuple[str, Tensor, Tensor]:
    (hook,) = check_site(model, site, [layer])
    x = collect_activations(
        model, dataset, [hook], batch_size=batch_size, memory_budget=memory_budget
    )[hook]
    return hook, x.double(), dataset.label_ids


def fit_leace(
    model: Model,
    dataset: ProbingDataset,
    *,
    layer: int,
    site: str = "resid_pre",
    svd_tol: float = 0.01,
    batch_size: int | None = None,
    memory_budget: int | str | None = None,
) -> ConceptEraser:
    """The LEACE eraser of ``dataset``'s labels from ``site`` at ``layer`` of ``model``.

    Activations are read at the dataset's positions (``batch_size`` texts per forward pass,
    None: as many as ``memory_budget`` holds, 2 GiB on CPU by default); use the eraser in the
    model with :func:`erase` (at every position by default).

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> data = mk.probing.ProbingDataset([(i % 9 + 1, 3) for i in range(40)], [0] * 40,
        ...                                  [int(i % 9 > 4) for i in range(40)])
        >>> mk.fit_leace(model, data, layer=1)
        ConceptEraser(method='leace', rank=1, d=128, hook_name='blocks.1.hook_resid_pre')
    """
    hook, x, y = _fit_on_model(model, dataset, layer, site, batch_size, memory_budget)
    meta = {"model": model_name(model), "dataset": dataset.name,
            "classes": [str(c) for c in dataset.classes]}  # fmt: skip
    return ConceptEraser.leace(x, y, svd_tol=svd_tol).at(hook, **meta)


def fit_inlp(
    model: Model,
    dataset: ProbingDataset,
    *,
    layer: int,
    site: str = "resid_pre",
    n_iterations: int = 10,
    l2: float = 1e-4,
    batch_size: int | None = None,
    memory_budget: int | str | None = None,
) -> ConceptEraser:
    """The INLP eraser (:meth:`ConceptEraser.inlp`) of ``dataset``'s classes at a layer
    (activations read as :func:`fit_leace` reads them).

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> data = mk.probing.ProbingDataset([(i % 9 + 1, 3) for i in range(40)], [0] * 40,
        ...                                  [int(i % 9 > 4) for i in range(40)])
        >>> mk.probing.fit_inlp(model, data, layer=0, n_iterations=2).method
        'inlp'
    """
    hook, x, y = _fit_on_model(model, dataset, layer, site, batch_size, memory_budget)
    eraser = ConceptEraser.inlp(x, y, n_iterations=n_iterations, l2=l2)
    return eraser.at(hook, model=model_name(model), dataset=dataset.name)


@contextlib.contextmanager
def erase(
    model: Model,
    eraser: ConceptEraser,
    *,
    hook_name: str | None = None,
    positions: int | Sequence[int] | None = None,
) -> Iterator[Model]:
    """Inside the block, ``model`` runs with ``eraser`` applied at its hook (or ``hook_name``)
    at every position (or only ``positions``); the hook is gone afterwards, also after an
    exception or a Ctrl-C.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> x = torch.randn(64, 128, dtype=torch.float64)
        >>> eraser = ConceptEraser.leace(x, (x[:, 0] > 0).long()).at("blocks.1.hook_resid_pre")
        >>> with mk.erase(model, eraser):
        ...     logits = model(torch.tensor([[1, 2, 3]]))
        >>> logits.shape, len(model.blocks[1].hook_resid_pre.fwd_hooks)       # the hook is gone
        (torch.Size([1, 3, 500]), 0)
    """
    name = hook_name or eraser.hook_name
    if name is None or name not in model.hook_dict:
        raise SiteNotFoundError(
            f"Expected a hook of the model to erase at; got {name!r}."
            + (did_you_mean(name, model.hook_dict) if name else " Hint: erase(..., hook_name=...).")
        )
    picked: Any = slice(None)
    if positions is not None:
        picked = [positions] if isinstance(positions, int) else list(positions)

    def hook(act: Tensor, hook: Any) -> Tensor:
        out = act.clone()
        out[:, picked] = eraser(act[:, picked])
        return out

    with hook_scope(model, fwd_hooks=[(name, hook)]):
        yield model


def lm_loss(
    model: Model,
    texts: Sequence[str | Sequence[int]],
    *,
    batch_size: int | None = None,
    memory_budget: int | str | None = None,
) -> float:
    """The mean next-token cross-entropy over every real token of ``texts`` (right-padded in
    batches of ``batch_size`` texts, None: as many as ``memory_budget`` holds, 2 GiB on CPU by
    default; padding never counts).

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> loss = lm_loss(model, [[1, 2, 3, 4]])
        >>> with torch.no_grad():
        ...     reference = float(model(torch.tensor([[1, 2, 3, 4]]), return_type="loss"))
        >>> abs(loss - reference) < 1e-5
        True
    """
    rows = [encode(model, t) if isinstance(t, str) else list(t) for t in texts]
    tokenizer = getattr(model, "tokenizer", None)
    pad = 0 if tokenizer is None or tokenizer.pad_token_id is None else tokenizer.pad_token_id
    totals = [0.0, 0.0]
    device = next(model.parameters()).device

    def work(chunk: slice) -> None:
        tokens, mask = pad_right(rows[chunk], pad)  # (batch, pos)
        with torch.no_grad():
            logits = model(tokens.to(device)).float().cpu()  # (batch, pos, d_vocab)
        logp = logits[:, :-1].log_softmax(-1)
        nll = -logp.gather(-1, tokens[:, 1:, None])[..., 0]  # (batch, pos - 1)
        keep = mask[:, 1:]
        totals[0] += float(nll[keep].sum())
        totals[1] += float(keep.sum())

    each_batch(len(rows), prompts_per_forward(model, rows, batch_size, memory_budget), work)
    return totals[0] / max(totals[1], 1.0)


@dataclasses.dataclass(frozen=True)
class AmnesicResult:
    """The LM with a concept erased against a random subspace of the same rank erased.

    Attributes:
        loss_clean: mean next-token loss of the unchanged model.
        loss_erased: the same with the concept's eraser in the model.
        loss_random: ``(n_random,)`` with random erasers of the same rank.
        probe_accuracy: held-out probe accuracy on the activations before erasure.
        probe_accuracy_erased: the same probe retrained on the erased activations.
        metric_clean, metric_erased, metric_random: the task metric (NaN without one).
        rank: the eraser's rank.
        metadata: model, dataset, hook.

    Example:
        >>> r = AmnesicResult(3.0, 3.5, torch.tensor([3.1, 3.2]), 0.9, 0.5, float("nan"),
        ...                   float("nan"), torch.tensor([]), 1)
        >>> r.top(1)
        [('erased', 0.5)]
    """

    loss_clean: float
    loss_erased: float
    loss_random: Float[Tensor, " n_random"]
    probe_accuracy: float
    probe_accuracy_erased: float
    metric_clean: float
    metric_erased: float
    metric_random: Float[Tensor, " n_random"]
    rank: int
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    def top(self, n: int = 10, *, absolute: bool = True) -> list[tuple[str, float]]:
        """The conditions (``"erased"``, ``"random0"``, ...) ranked by their loss change."""
        labels = ["erased"] + [f"random{i}" for i in range(len(self.loss_random))]
        changes = [self.loss_erased - self.loss_clean] + [
            float(v) - self.loss_clean for v in self.loss_random
        ]
        return rank(labels, changes, n, absolute=absolute)

    def to_dataframe(self) -> Any:
        """One row per condition: clean, erased, random0.. with loss and metric."""
        import pandas as pd

        n = len(self.loss_random)
        metric_random = self.metric_random.tolist() or [float("nan")] * n
        return pd.DataFrame(
            {
                "condition": ["clean", "erased"] + [f"random{i}" for i in range(n)],
                "loss": [self.loss_clean, self.loss_erased, *self.loss_random.tolist()],
                "metric": [self.metric_clean, self.metric_erased, *metric_random],
            }
        )

    def plot(self) -> Any:
        """The LM loss per condition (plotly bars)."""
        import plotly.graph_objects as go

        df = self.to_dataframe()
        fig = go.Figure(go.Bar(x=df["condition"], y=df["loss"]))
        fig.update_layout(title=f"Amnesic probing (rank {self.rank})", yaxis_title="LM loss")
        return fig


def amnesic_probe(
    model: Model,
    dataset: ProbingDataset,
    eraser: ConceptEraser,
    *,
    texts: Sequence[str | Sequence[int]] | None = None,
    metric: Callable[[Model], float] | None = None,
    n_random: int = 3,
    control: str = "isotropic",
    seed: int = 0,
    batch_size: int | None = None,
    memory_budget: int | str | None = None,
) -> AmnesicResult:
    """Amnesic probing (Elazar et al. 2021) of ``eraser`` (fitted on ``dataset``).

    Args:
        model: the HookedTransformer.
        dataset: the concept's dataset (its probe is refitted on erased activations).
        eraser: a :class:`ConceptEraser` with its hook (from :func:`fit_leace`, ...).
        texts: the texts the LM loss is measured on (None: the dataset's distinct texts).
        metric: a function of the model to a number (a task metric), measured as the loss is.
        n_random: random erasers of the same rank (about the same bias) to compare with.
        control: how they are drawn (see :meth:`ConceptEraser.random`): ``"isotropic"``
            (default: a uniformly random orthogonal projection) or ``"whitened"`` (LEACE's
            form with random directions of the whitened space, fitted on the dataset's
            activations: as much whitened variance removed as LEACE removes). Neither is fair
            at a token far outside the fitting data (an attention sink with massive
            activations): there any of these edits can be thousands large; measured on
            SmolLM2, the whitened control broke the model as often as LEACE did. Erase at the
            other positions (``mk.erase(..., positions=...)``) to leave the sink alone.
        seed: the random erasers' seed; ``seed + i`` for the i-th.
        batch_size: texts per forward pass (None: as many as ``memory_budget`` holds).
        memory_budget: bytes (or ``"2GB"``) a forward pass may use when ``batch_size`` is
            None; None: 2 GiB on CPU, 60% of free memory on CUDA.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> data = mk.probing.ProbingDataset([(i % 9 + 1, 3) for i in range(40)], [0] * 40,
        ...                                  [int(i % 9 > 4) for i in range(40)])
        >>> eraser = mk.fit_leace(model, data, layer=1)
        >>> result = mk.probing.amnesic_probe(model, data, eraser, n_random=2)
        >>> result.loss_random.shape, result.rank
        (torch.Size([2]), 1)
    """
    if eraser.hook_name is None:
        raise InvalidArgumentError(
            "Expected an eraser with its hook (from fit_leace or eraser.at(hook_name)); got one "
            "fitted on plain tensors."
        )
    check_positive_int("n_random", n_random)
    check_choice("control", control, ("whitened", "isotropic"))
    texts = list(dict.fromkeys(dataset.texts)) if texts is None else list(texts)
    hook = eraser.hook_name
    x = collect_activations(
        model, dataset, [hook], batch_size=batch_size, memory_budget=memory_budget
    )[hook].double()
    y = dataset.label_ids
    before = fit_probe(x, y, l2=1e-3, seed=seed).test_score
    after = fit_probe(eraser(x), y, l2=1e-3, seed=seed).test_score

    def measure(e: ConceptEraser | None) -> tuple[float, float]:
        scope = erase(model, e) if e is not None else contextlib.nullcontext()
        with scope:
            loss = lm_loss(model, texts, batch_size=batch_size, memory_budget=memory_budget)
            value = float(metric(model)) if metric is not None else float("nan")
        return loss, value

    loss_clean, metric_clean = measure(None)
    loss_erased, metric_erased = measure(eraser)
    like = x if control == "whitened" else None
    randoms = [
        measure(
            ConceptEraser.random(
                x.shape[1], eraser.rank, bias=eraser.bias, seed=seed + i, like=like
            ).at(hook)
        )
        for i in range(n_random)
    ]
    return AmnesicResult(
        loss_clean, loss_erased, torch.tensor([r[0] for r in randoms]), before, after,
        metric_clean, metric_erased,
        torch.tensor([r[1] for r in randoms]) if metric is not None else torch.tensor([]),
        eraser.rank, {"model": model_name(model), "dataset": dataset.name, "hook_name": hook,
                      "control": control},
    )  # fmt: skip
