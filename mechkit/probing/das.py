"""Distributed alignment search: is this subspace the one the model uses for a variable?

DAS (Geiger et al. 2023, "Finding Alignments Between Interpretable Causal Variables and
Distributed Neural Representations") learns an orthogonal rotation ``R`` of a site's activation
(parametrised with ``torch.nn.utils.parametrizations.orthogonal``) such that an *interchange
intervention* on the first ``k`` rotated coordinates, ``h' = R^T swap_k(R h, R s)``, makes the
model output what a high-level causal model says the intervened run should output. ``h`` is the
base run's activation, ``s`` the source run's. With ``B`` the first ``k`` rows of ``R`` the edit
is the low-rank ``h' = h + (s - h) B^T B``. *Boundless* DAS (Wu et al. 2023, "Interpretability
at Scale") learns ``k`` through a sigmoid mask over the rotated coordinates whose temperature is
annealed. The score is the *interchange intervention accuracy* (IIA): how often the intervened
model gives the counterfactual label, on held-out pairs.

The high-level model is the user's: a Python function giving each ``(base, source)`` pair its
counterfactual label, e.g. for IOI "the answer is the base's other name when the source's
indirect object stands where the base's subject stood".

Every result carries the interpretability-illusion check of Makelov et al. (2023)
(:mod:`mechkit.probing.illusion`): the subspace patch against patching the whole component, the
subspace's variation on real data, its split into the part the following weights (or the
activations' span) can see and the rest, and held-out IIA.

Example:
    >>> model = mk.load_model("attn-only-2l")
    >>> base, source = [[i, 7, 9] for i in range(1, 21)], [[i, 7, 9] for i in range(21, 41)]
    >>> labels = model(torch.tensor(source)).argmax(-1)[:, -1].tolist()
    >>> result = das(model, base, source, labels, hook_name="blocks.1.hook_resid_post", steps=2)
    >>> result.basis.shape                                                       # (k, d_model)
    torch.Size([1, 128])
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechkit.atomic_io import write_atomically
from mechkit.core.labels import model_name
from mechkit.core.progress import progress_bar
from mechkit.core.results import rank
from mechkit.core.types import Model
from mechkit.errors import (
    EmptyDatasetError,
    FileFormatError,
    InvalidArgumentError,
    ShapeError,
    check_choice,
    check_positive_int,
)
from mechkit.hook_scope import run_with_cache
from mechkit.probing.datasets import InterchangePairs, prompts_per_forward
from mechkit.probing.illusion import illusion_check
from mechkit.probing.interchange import (
    Prompt,
    check_hook,
    choice_accuracy,
    eval_subspace,
    forward_swapped,
    label_ids,
    pad_id,
    prompt_rows,
    site_activations,
    subspace_edit,
    token_index,
)
from mechkit.reading import read_safetensors
from mechkit.tokens import pad_right, tokenize_answer

CACHE_BYTES = 1 << 29
"""The most bytes of base-run residual streams :func:`das` keeps to train from the site on."""


def resume_layer(model: Model, hook_name: str) -> int | None:
    """The block a forward pass resumes at from the residual stream at ``hook_name``
    (``blocks.L.hook_resid_pre``: L; ``blocks.L.hook_resid_post``: L + 1), else None."""
    found = re.fullmatch(r"blocks\.(\d+)\.hook_resid_(pre|post)", hook_name)
    if found is None:
        return None
    return int(found.group(1)) + int(found.group(2) == "post")


def base_streams(
    model: Model, rows: list[list[int]], hook_name: str, size: int
) -> tuple[Tensor, Tensor]:
    """The base runs' whole residual streams at ``hook_name`` (right-padded, ``(n, pos, d)``,
    float32 CPU) and each run's last real token, ``size`` prompts per pass."""
    tokens, mask = pad_right(rows, pad_id(model))
    device = next(model.parameters()).device
    block = int(hook_name.split(".")[1])  # the hook fires inside this block
    stop = block + 1 if block + 1 < model.cfg.n_layers else None
    out = []
    for i in range(0, len(rows), size):
        with torch.no_grad():
            _, cache = run_with_cache(
                model, tokens[i : i + size].to(device), names_filter=hook_name,
                stop_at_layer=stop, return_type=None,
            )  # fmt: skip
        out.append(cache[hook_name].float().cpu())
    return torch.cat(out), mask.sum(-1) - 1


def forward_resumed(
    model: Model, streams: Tensor, last: Tensor, index: Tensor, sources: Tensor, edit: Any,
    layer: int,
) -> Tensor:  # fmt: skip
    """Logits ``(batch, d_vocab)`` at each base's last token with the base's residual stream at
    ``index`` replaced by ``edit(h, s)``, the model run from block ``layer`` on (the blocks
    before the site are the same in every step, so a training step skips them)."""
    device = next(model.parameters()).device
    streams = streams.to(device)
    ar = torch.arange(streams.shape[0], device=device)
    at = index.to(device)
    edited = streams.clone()
    edited[ar, at] = edit(streams[ar, at], sources.to(device)).to(streams.dtype)
    dtype = next(model.parameters()).dtype
    logits = model(edited.to(dtype), start_at_layer=layer)
    return logits[ar, last.to(device)]


__all__ = ["DasResult", "das"]


@dataclasses.dataclass(frozen=True, eq=False)
class DasResult:
    """A learned subspace and its interchange-intervention accuracies.

    Attributes:
        rotation: ``(d, d)`` the learned orthogonal matrix ``R``.
        k: the subspace's dimension (learned, for boundless DAS).
        hook_name, position: the site.
        iia_train, iia_test: IIA on the training and held-out pairs.
        iia_none: how often the unchanged base run already gives the counterfactual label
            (held-out pairs).
        iia_full: IIA of patching the whole activation (held-out pairs).
        losses: ``(steps,)`` training losses.
        mask: ``(d,)`` boundless DAS's final soft mask (None otherwise).
        illusion: the Makelov et al. check (:class:`~mechkit.probing.IllusionReport`).
        metadata: model, seed, steps, learning rate.

    Example:
        >>> r = DasResult(torch.eye(4), 1, "blocks.0.hook_resid_pre", -1, 1.0, 0.9, 0.1, 0.5,
        ...               torch.zeros(3))
        >>> r.basis.shape, r.top(2)                                             # (k, d)
        (torch.Size([1, 4]), [('iia_train', 1.0), ('iia_test', 0.9)])
    """

    rotation: Float[Tensor, "d d"]
    k: int
    hook_name: str
    position: int
    iia_train: float
    iia_test: float
    iia_none: float
    iia_full: float
    losses: Float[Tensor, " steps"]
    mask: Float[Tensor, " d"] | None = None
    illusion: Any = None
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def basis(self) -> Float[Tensor, "k d"]:
        """The subspace's orthonormal basis: the first ``k`` rows of the rotation."""
        return self.rotation[: self.k]

    def _scores(self) -> dict[str, float]:
        return {"iia_train": self.iia_train, "iia_test": self.iia_test,
                "iia_full": self.iia_full, "iia_none": self.iia_none}  # fmt: skip

    def top(self, n: int = 10, *, absolute: bool = True) -> list[tuple[str, float]]:
        """The accuracies (``iia_train``, ``iia_test``, ``iia_full``, ``iia_none``), ranked."""
        scores = self._scores()
        return rank(list(scores), list(scores.values()), n, absolute=absolute)

    def to_dataframe(self) -> Any:
        """One row per accuracy, plus the illusion check's rows when present."""
        import pandas as pd

        rows = [{"measure": k, "value": v} for k, v in self._scores().items()]
        if self.illusion is not None:
            rows += [{"measure": k, "value": v} for k, v in self.illusion.scores().items()]
        return pd.DataFrame(rows)

    def plot(self) -> Any:
        """The training loss by step (plotly)."""
        import plotly.graph_objects as go

        fig = go.Figure(go.Scatter(y=self.losses.tolist(), mode="lines"))
        fig.update_layout(
            title=f"DAS at {self.hook_name} (k={self.k}, held-out IIA {self.iia_test:.2f})",
            xaxis_title="step", yaxis_title="loss",
        )  # fmt: skip
        return fig

    def save(self, path: str | Path) -> None:
        """Write a safetensors file (rotation, losses, mask) with the rest as JSON metadata."""
        from safetensors.torch import save_file

        tensors = {"rotation": self.rotation, "losses": self.losses}
        if self.mask is not None:
            tensors["mask"] = self.mask
        info = {"k": self.k, "hook_name": self.hook_name, "position": self.position,
                **self._scores(), "metadata": self.metadata,
                "illusion": None if self.illusion is None else self.illusion.to_dict()}  # fmt: skip
        header = {"format": "mechkit.DasResult", "json": json.dumps(info)}
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=header))

    @classmethod
    def load(cls, path: str | Path) -> DasResult:
        """Read a result written by :meth:`save` (the illusion check comes back as a dict).

        Raises:
            FileFormatError: damaged, truncated, or not a DAS result.
        """
        hint = "write it with DasResult.save."
        tensors, header = read_safetensors(path, "a DAS result (DasResult.save)", hint)
        try:
            if header.get("format") != "mechkit.DasResult":
                raise KeyError("format")
            info = json.loads(header["json"])
            return cls(
                tensors["rotation"], info["k"], info["hook_name"], info["position"],
                info["iia_train"], info["iia_test"], info["iia_none"], info["iia_full"],
                tensors["losses"], tensors.get("mask"), info["illusion"], info["metadata"],
            )  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            raise FileFormatError(
                f"Expected a DAS-result file from DasResult.save; {str(path)!r} lacks or "
                f"garbles {exc}. Hint: {hint}"
            ) from None

    def __repr__(self) -> str:
        verdict = getattr(self.illusion, "verdict", None)
        return (
            f"DasResult(hook_name={self.hook_name!r}, k={self.k}, iia_test={self.iia_test:.3f}, "
            f"iia_full={self.iia_full:.3f}, iia_none={self.iia_none:.3f}, illusion={verdict!r})"
        )


def das(
    model: Model,
    base: Sequence[Prompt] | InterchangePairs,
    source: Sequence[Prompt] | None = None,
    labels: Sequence[str | int] | None = None,
    *,
    hook_name: str,
    position: int | str = -1,
    k: int = 1,
    boundless: bool = False,
    choices: Int[Tensor, "batch n_choices"] | Sequence[Sequence[str | int]] | None = None,
    steps: int = 200,
    lr: float = 1e-2,
    batch_size: int = 16,
    test_fraction: float = 0.3,
    check_illusion: bool = True,
    weight: Tensor | None = None,
    seed: int = 0,
    memory_budget: int | str | None = None,
    progress: bool = False,
) -> DasResult:
    """Learn a ``k``-dimensional subspace at ``hook_name`` whose interchange realises the
    high-level model's counterfactual ``labels`` (distributed alignment search).

    Args:
        model: the HookedTransformer.
        base, source: the pairs' prompts (text or token ids); or ``base`` is an
            :class:`~mechkit.probing.InterchangePairs` (from
            :func:`~mechkit.probing.interchange_pairs`, the user's high-level model in a few
            lines) and ``source``, ``labels`` and, unless given, ``choices`` come from it.
        labels: per pair, the answer the intervened base run should give (a single-token
            string or a token id), from the user's high-level causal model.
        hook_name: the site (any hook; its activation is flattened per position).
        position: the token of both runs that is intervened on (-1: the last), or the name
            of one of the pairs' ``positions`` (``"S2"``).
        k: the subspace's dimension (for boundless DAS, the mask's starting boundary).
        boundless: learn ``k`` with a sigmoid mask and an annealed temperature.
        choices: per pair, the candidate answers IIA and the loss compare (None: the whole
            vocabulary).
        steps, lr, batch_size: Adam steps, learning rate, pairs per step.
        test_fraction: the share of pairs held out for IIA.
        check_illusion: run :func:`~mechkit.probing.illusion_check` on the result.
        weight: for the illusion check, the weights that read the site (None: the MLP's
            ``W_out`` at an MLP hidden site, else the span of the activations).
        seed: the rotation's initialisation, the split and the batches.
        memory_budget: bytes (or ``"2GB"``) one forward pass of the reading and evaluation
            passes may use (training steps take ``batch_size`` pairs); None: 2 GiB on CPU, 60%
            of free memory on CUDA.
        progress: show a progress bar.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> base = [[i, 7, 9] for i in range(1, 21)]
        >>> source = [[i, 7, 9] for i in range(21, 41)]
        >>> labels = model(torch.tensor(source)).argmax(-1)[:, -1].tolist()  # copy the source
        >>> result = mk.probing.das(model, base, source, labels, k=128, steps=1,
        ...                          hook_name="blocks.1.hook_resid_post", check_illusion=False)
        >>> result.iia_test, result.iia_full                                # the whole space
        (1.0, 1.0)
    """
    check_hook(model, hook_name)
    if isinstance(base, InterchangePairs):
        if source is not None or labels is not None:
            raise InvalidArgumentError(
                "Expected either InterchangePairs or base, source and labels; got both. Hint: "
                "das(model, pairs, hook_name=...)."
            )
        pairs = base
        base, source, labels = pairs.base, pairs.source, pairs.labels
        choices = pairs.choices if choices is None else choices
        if isinstance(position, str):
            position = int(pairs.positions[check_choice("position", position, pairs.positions)])
    if source is None or labels is None:
        raise InvalidArgumentError(
            "Expected source prompts and labels (or InterchangePairs as base); got None."
        )
    if isinstance(position, str):
        raise InvalidArgumentError(
            f"Expected an integer position (a named one, {position!r}, needs InterchangePairs "
            "with positions)."
        )
    base_rows, source_rows = prompt_rows(model, base, "base"), prompt_rows(model, source, "source")
    n = len(base_rows)
    if len(source_rows) != n:
        raise ShapeError(f"Expected one source per base prompt; got {n} and {len(source_rows)}.")
    y = label_ids(model, labels, n)
    choice_ids = None
    if choices is not None:
        choice_ids = (
            torch.tensor(
                [
                    [tokenize_answer(model, c) if isinstance(c, str) else int(c) for c in row]
                    for row in choices
                ]  # fmt: skip
            )
            if not isinstance(choices, Tensor)
            else choices.long()
        )
        if choice_ids.shape[0] != n or not bool((choice_ids == y[:, None]).any(-1).all()):
            raise ShapeError(
                f"Expected one row of choices per pair ({n}), each holding its label; got "
                f"shape {tuple(choice_ids.shape)}."
            )
    check_positive_int("steps", steps)
    check_positive_int("batch_size", batch_size)
    sources = site_activations(model, source_rows, hook_name=hook_name, position=position,
                               memory_budget=memory_budget)  # fmt: skip
    size = prompts_per_forward(model, base_rows, None, memory_budget)
    d = sources.shape[1]
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= d:
        raise InvalidArgumentError(
            f"Expected 0 <= k <= {d} (the site's width at {hook_name}); got k={k!r}."
        )
    if not 0.0 < test_fraction < 1.0 or n < 4:
        raise EmptyDatasetError(
            f"Expected at least 4 pairs and 0 < test_fraction < 1; got {n} pairs and "
            f"test_fraction={test_fraction!r}."
        )
    index = token_index(base_rows, position)
    # at a residual stream, training steps run only the blocks after the site, from the base
    # runs' streams read once (when they fit in CACHE_BYTES)
    layer_on = resume_layer(model, hook_name)
    width = max(len(r) for r in base_rows)
    streams = last = None
    if layer_on is not None and n * width * d * 4 <= CACHE_BYTES:
        streams, last = base_streams(model, base_rows, hook_name, size)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g)
    n_test = max(1, round(n * test_fraction))
    test, train = order[:n_test].tolist(), order[n_test:].tolist()

    torch.manual_seed(seed)
    device = next(model.parameters()).device
    layer = torch.nn.Linear(d, d, bias=False)
    rotation = torch.nn.utils.parametrizations.orthogonal(layer).to(device)
    boundary = torch.nn.Parameter(torch.tensor(float(max(k, 1)), device=device))
    params = list(rotation.parameters()) + ([boundary] if boundless else [])
    optimizer = torch.optim.Adam(params, lr=lr)
    coords = torch.arange(d, device=device, dtype=torch.float32)
    t_start, t_end = max(d / 8, 1.0), 0.05

    def soft_mask(step: int) -> Tensor:
        t = t_start * (t_end / t_start) ** (step / max(steps - 1, 1))
        return torch.sigmoid((boundary - coords - 0.5) / t)

    def choice_loss(logits: Tensor, rows: list[int]) -> Tensor:
        target = y[rows].to(logits.device)
        if choice_ids is None:
            return torch.nn.functional.cross_entropy(logits.float(), target)
        c = choice_ids[rows].to(logits.device)
        picked = logits.float().gather(-1, c)
        return torch.nn.functional.cross_entropy(picked, (c == target[:, None]).float().argmax(-1))

    losses = []
    cursor = len(train)
    perm: list[int] = []
    with progress_bar(steps, "DAS", enabled=progress) as bar:
        for step in range(steps):
            if cursor + batch_size > len(train):
                perm = [train[i] for i in torch.randperm(len(train), generator=g).tolist()]
                cursor = 0
            rows = perm[cursor : cursor + batch_size]
            cursor += batch_size
            r = cast(Tensor, rotation.weight)  # (d, d), orthogonal
            if boundless:
                m = soft_mask(step)

                def edit(h: Tensor, s: Tensor, r: Tensor = r, m: Tensor = m) -> Tensor:
                    return h + (((s - h) @ r.T) * m) @ r
            else:
                edit = subspace_edit(r[:k])
            if streams is not None and last is not None and layer_on is not None:
                logits = forward_resumed(model, streams[rows], last[rows], index[rows],
                                         sources[rows], edit, layer_on)  # fmt: skip
            else:
                logits = forward_swapped(
                    model, [base_rows[i] for i in rows], index[rows], sources[rows], edit,
                    hook_name,
                )  # fmt: skip
            loss = choice_loss(logits, rows)
            if boundless:
                loss = loss + 1e-3 * m.sum() / d
            optimizer.zero_grad()
            loss.backward(inputs=params)
            optimizer.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}", refresh=False)
            bar.update(1)

    with torch.no_grad():
        r = cast(Tensor, rotation.weight).detach().float().cpu()
        final_mask = soft_mask(steps - 1).detach().cpu() if boundless else None
    k_final = int((final_mask > 0.5).sum()) if final_mask is not None else k

    def iia(rows: list[int], basis: Tensor) -> float:
        logits = eval_subspace(model, base_rows, index, sources, basis, hook_name, rows, size)
        return choice_accuracy(logits, y[rows], None if choice_ids is None else choice_ids[rows])

    basis = r[:k_final]
    result = DasResult(
        r, k_final, hook_name, position,
        iia(train, basis), iia(test, basis), iia(test, torch.zeros(0, d)), iia(test, torch.eye(d)),
        torch.tensor(losses), final_mask, None,
        {"model": model_name(model), "seed": seed, "steps": steps, "lr": lr,
         "boundless": boundless, "n_train": len(train), "n_test": len(test)},
    )  # fmt: skip
    if check_illusion and k_final > 0:
        report = illusion_check(
            model, result, [base_rows[i] for i in test], [source_rows[i] for i in test],
            [int(v) for v in y[test]], weight=weight,
            choices=None if choice_ids is None else choice_ids[test],
            activations=torch.cat([site_activations(model, base_rows, hook_name=hook_name,
                                                    position=position,
                                                    memory_budget=memory_budget), sources]),
            memory_budget=memory_budget,
        )  # fmt: skip
        result = dataclasses.replace(result, illusion=report)
    return result
