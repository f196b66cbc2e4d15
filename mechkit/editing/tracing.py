"""Causal tracing: where in the network a model recalls a fact.

Meng et al. (2022), *Locating and Editing Factual Associations in GPT* (ROME, arXiv:2202.05262),
section 2. Three runs of each factual prompt: the **clean** run; a **corrupted** run, where
Gaussian noise (``noise`` times the standard deviation of the subjects' token embeddings, 3 in
the paper) is added to the embeddings of the subject's tokens, so the model loses the fact; and
**corrupted-with-restoration** runs, where one state of the corrupted run is set back to its
clean value. A state's *indirect effect* is ``P(object | corrupted, state restored) -
P(object | corrupted)``; the *total effect* is ``P(object | clean) - P(object | corrupted)``.

Three kinds of state are restored: the hidden state (the residual stream after block ``l``,
``blocks.l.hook_resid_post``) at one token, and the MLP or attention outputs at one token over a
window of ``window`` layers centred on ``l`` (the paper's 10), which shows the layers where
those modules matter without the hidden state's running sum. Tokens are grouped as in the
paper's figure: the subject's first, middle and last tokens, the first token after the subject,
further tokens, and the prompt's last token.

The runs go through the patching engine (:mod:`mechkit.patching.engine`): the corrupted run of
all noise samples of a fact is run once, block by block, and every restoration joins it as rows
of a batch from its own block and token on, so nothing before a restored state is recomputed
and many cells share one forward. ``replacement`` swaps the subject for another one of the same
length in tokens instead of adding noise (one sample).

GPT-2 XL (1000 facts): average total effect 18.6%; the indirect effect peaks at the last subject
token (~8.7%, layer ~15), and its MLP part at the last subject token in the middle layers (6.6%),
while attention matters at the last token of the prompt, in later layers.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from mechkit.atomic_io import write_atomically
from mechkit.core.batching import check_budget, parse_budget
from mechkit.core.labels import model_name
from mechkit.core.progress import progress_bar
from mechkit.core.results import rank
from mechkit.core.types import Model
from mechkit.editing.facts import Fact, TokenizedFact, tokenize_facts
from mechkit.errors import (
    InvalidArgumentError,
    UnsupportedModelError,
    check_choice,
    check_positive_int,
)
from mechkit.hook_scope import hook_scope, run_with_cache
from mechkit.metrics import CrossEntropy
from mechkit.patching import engine
from mechkit.reading import read_safetensors, reading

__all__ = ["causal_trace", "TraceResult", "TOKEN_CLASSES", "KINDS", "restore_hook_names"]

Kind = Literal["hidden", "mlp", "attn"]
KINDS: tuple[Kind, ...] = ("hidden", "mlp", "attn")
TOKEN_CLASSES: tuple[str, ...] = (
    "first subject",
    "middle subject",
    "last subject",
    "first after",
    "further",
    "last",
)
_HOOKS = {"hidden": "hook_resid_post", "mlp": "hook_mlp_out", "attn": "hook_attn_out"}


def restore_hook_names(kind: str, layer: int, n_layers: int, window: int) -> list[str]:
    """The hook names a restoration of ``kind`` centred on ``layer`` sets back to clean: one
    for ``"hidden"``, the ``window`` layers ``[layer - window // 2, layer - window // 2 +
    window)`` (clipped to the model) for ``"mlp"`` and ``"attn"``, as the paper.

    Example:
        >>> restore_hook_names("mlp", 1, 30, 4)
        ['blocks.0.hook_mlp_out', 'blocks.1.hook_mlp_out', 'blocks.2.hook_mlp_out']
        >>> restore_hook_names("hidden", 5, 30, 10)
        ['blocks.5.hook_resid_post']
    """
    if kind == "hidden":
        return [f"blocks.{layer}.hook_resid_post"]
    low = max(0, layer - window // 2)
    high = min(n_layers, layer - window // 2 + window)
    return [f"blocks.{layer_}.{_HOOKS[kind]}" for layer_ in range(low, high)]


def token_classes(fact: TokenizedFact) -> list[list[int]]:
    """For each of :data:`TOKEN_CLASSES`, the positions of ``fact`` it holds (maybe none). A
    one-token subject is both the first and the last subject token; the prompt's last token is
    only "last".

    Example:
        >>> token_classes(TokenizedFact(torch.arange(7), (1, 4), target=0))
        [[1], [2], [3], [4], [5], [6]]
    """
    start, stop = fact.subject
    last = fact.n_tokens - 1
    subject = [p for p in range(start, stop)]
    after = [p for p in range(stop, last)]
    return [
        [start] if start != last else [],
        [p for p in subject[1:-1] if p != last],
        [stop - 1] if stop - 1 != last else [],
        after[:1],
        after[1:],
        [last],
    ]


@dataclasses.dataclass(frozen=True, eq=False)
class TraceResult:
    """The restored probabilities of a causal trace, and the clean and corrupted ones.

    Attributes:
        scores: ``(kind, layer, token_class)``: ``P(object)`` with that state restored, averaged
            over the facts (a class a fact lacks, such as the middle of a one-token subject, is
            left out of that fact's average).
        per_fact: ``(fact, kind, layer, token_class)``: each fact's value (NaN where it lacks
            the class).
        clean_prob, corrupt_prob: ``(fact,)``: ``P(object)`` on the clean and corrupted runs.
        kinds: the kinds of state restored (``"hidden"``, ``"mlp"``, ``"attn"``).
        token_classes: the names of the token classes (:data:`TOKEN_CLASSES`).
        prompts: each fact's prompt.
        window: the window of MLP and attention restorations.
        noise: the noise's multiplier of the embedding std (None with a replacement subject).
        noise_std: the noise's standard deviation (multiplier times embedding std).
        samples: the noise samples per fact.
        model_name: the model's name.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> fact = mk.editing.TokenizedFact(torch.tensor([0, 5, 6, 7, 8, 9]), (1, 3), target=7)
        >>> r = mk.causal_trace(model, fact, kinds=("hidden", "attn"), samples=2, progress=False)
        >>> tuple(r.scores.shape), r.kinds    # (kind, layer, token_class)
        ((2, 2, 6), ('hidden', 'attn'))
        >>> r.top(1)[0][0]  # doctest: +ELLIPSIS
        {'kind': ..., 'layer': ..., 'token': ...}
    """

    scores: Float[Tensor, "kind layer token_class"]
    per_fact: Float[Tensor, "fact kind layer token_class"]
    clean_prob: Float[Tensor, " fact"]
    corrupt_prob: Float[Tensor, " fact"]
    kinds: tuple[str, ...]
    token_classes: tuple[str, ...]
    prompts: tuple[str, ...]
    window: int
    noise: float | None
    noise_std: float
    samples: int
    model_name: str

    def __repr__(self) -> str:
        return (
            f"TraceResult({len(self.prompts)} facts, {self.model_name}, kinds={self.kinds}, "
            f"total effect={self.total_effect:.3f})"
        )

    @property
    def total_effect(self) -> float:
        """``P(object | clean) - P(object | corrupted)``, averaged over the facts."""
        return float((self.clean_prob - self.corrupt_prob).mean())

    @property
    def indirect_effect(self) -> Float[Tensor, "kind layer token_class"]:
        """``P(object | restored) - P(object | corrupted)``, averaged over the facts."""
        effect = self.per_fact - self.corrupt_prob[:, None, None, None]
        return effect.nanmean(0)

    def peak(self, kind: str = "mlp") -> dict[str, Any]:
        """Where the indirect effect of ``kind`` is largest: ``{"layer", "token", "effect"}``.

        Example:
            >>> r = TraceResult(torch.tensor([[[0.1, 0.5]]]), torch.tensor([[[[0.1, 0.5]]]]),
            ...                 torch.tensor([0.9]), torch.tensor([0.1]), ("mlp",),
            ...                 ("last subject", "last"), ("p",), 10, 3.0, 1.0, 10, "m")
            >>> r.peak("mlp")  # doctest: +ELLIPSIS
            {'layer': 0, 'token': 'last', 'effect': 0.4...}
        """
        check_choice("kind", kind, self.kinds)
        effect = self.indirect_effect[self.kinds.index(kind)]
        flat = int(torch.nan_to_num(effect, nan=-math.inf).argmax())
        layer, token = divmod(flat, effect.shape[1])
        return {
            "layer": layer,
            "token": self.token_classes[token],
            "effect": float(effect.flatten()[flat]),
        }

    def top(self, n: int = 10, *, absolute: bool = True) -> list[tuple[dict[str, Any], float]]:
        """The ``n`` cells of largest indirect effect, as ``({"kind", "layer", "token"},
        effect)`` pairs, ranked by :func:`~mechkit.core.rank`."""
        labels = [
            {"kind": k, "layer": layer, "token": t}
            for k in self.kinds
            for layer in range(self.scores.shape[1])
            for t in self.token_classes
        ]
        return rank(labels, self.indirect_effect.flatten(), n, absolute=absolute)

    def to_dataframe(self) -> Any:
        """One row per (kind, layer, token class): ``probability`` and ``indirect_effect``.

        Example:
            >>> r = TraceResult(torch.tensor([[[0.1, 0.5]]]), torch.tensor([[[[0.1, 0.5]]]]),
            ...                 torch.tensor([0.9]), torch.tensor([0.1]), ("mlp",),
            ...                 ("last subject", "last"), ("p",), 10, 3.0, 1.0, 10, "m")
            >>> r.to_dataframe().columns.tolist()
            ['kind', 'layer', 'token', 'probability', 'indirect_effect']
        """
        import pandas as pd

        effect = self.indirect_effect
        rows = [
            (k, layer, t, float(self.scores[i, layer, j]), float(effect[i, layer, j]))
            for i, k in enumerate(self.kinds)
            for layer in range(self.scores.shape[1])
            for j, t in enumerate(self.token_classes)
        ]
        return pd.DataFrame(
            rows, columns=["kind", "layer", "token", "probability", "indirect_effect"]
        )

    def plot(self) -> Any:
        """The paper's figure: one heatmap per kind, token classes down, layers across, the
        colour the average indirect effect (plotly)."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        names = {"hidden": "hidden state", "mlp": "MLP", "attn": "attention"}
        fig = make_subplots(
            rows=1,
            cols=len(self.kinds),
            subplot_titles=[f"restored {names[k]}" for k in self.kinds],
        )
        effect = self.indirect_effect
        for i, _kind in enumerate(self.kinds):
            fig.add_trace(
                go.Heatmap(
                    z=effect[i].T.tolist(),
                    x=list(range(effect.shape[1])),
                    y=list(self.token_classes),
                    colorscale="Purples",
                    coloraxis="coloraxis",
                ),
                row=1,
                col=i + 1,
            )
            fig.update_yaxes(autorange="reversed", row=1, col=i + 1)
            fig.update_xaxes(title_text="layer", row=1, col=i + 1)
        window = f", window {self.window}" if {"mlp", "attn"} & set(self.kinds) else ""
        fig.update_layout(
            title=f"Causal trace of {len(self.prompts)} facts on {self.model_name}: average "
            f"indirect effect on P(object){window}",
            coloraxis={"colorscale": "Purples"},
            height=320,
            width=360 * len(self.kinds),
        )
        return fig

    def save(self, path: str | Path) -> Path:
        """Write the result to ``path``: a safetensors file of the tensors, with the rest as
        JSON in its metadata.

        Example:
            >>> import tempfile
            >>> r = TraceResult(torch.tensor([[[0.1, 0.5]]]), torch.tensor([[[[0.1, 0.5]]]]),
            ...                 torch.tensor([0.9]), torch.tensor([0.1]), ("mlp",),
            ...                 ("last subject", "last"), ("p",), 10, 3.0, 1.0, 10, "m")
            >>> path = r.save(Path(tempfile.mkdtemp()) / "trace.safetensors")
            >>> TraceResult.load(path).scores.tolist() == r.scores.tolist()
            True
        """
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {
            "scores": self.scores, "per_fact": self.per_fact,
            "clean_prob": self.clean_prob, "corrupt_prob": self.corrupt_prob,
        }  # fmt: skip
        meta = {
            "kinds": list(self.kinds), "token_classes": list(self.token_classes),
            "prompts": list(self.prompts), "window": self.window, "noise": self.noise,
            "noise_std": self.noise_std, "samples": self.samples, "model_name": self.model_name,
        }  # fmt: skip
        record = {"record": json.dumps(meta)}
        write_atomically(
            path,
            lambda tmp: save_file(
                {k: v.contiguous().float() for k, v in tensors.items()}, tmp, metadata=record
            ),
        )
        return path

    @classmethod
    def load(cls, path: str | Path) -> TraceResult:
        """Read a result written by :meth:`save`."""
        hint = "write it with TraceResult.save"
        tensors, metadata = read_safetensors(path, "a causal trace", hint)
        with reading(path, "a causal trace", hint):
            meta = json.loads(metadata["record"])
            return cls(
                scores=tensors["scores"], per_fact=tensors["per_fact"],
                clean_prob=tensors["clean_prob"], corrupt_prob=tensors["corrupt_prob"],
                kinds=tuple(meta["kinds"]), token_classes=tuple(meta["token_classes"]),
                prompts=tuple(meta["prompts"]), window=int(meta["window"]), noise=meta["noise"],
                noise_std=float(meta["noise_std"]), samples=int(meta["samples"]),
                model_name=str(meta["model_name"]),
            )  # fmt: skip


def embedding_std(model: Model, facts: Sequence[TokenizedFact]) -> float:
    """The standard deviation of the token embeddings of the facts' subjects (all their tokens
    together), the unit of the paper's noise.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> fact = mk.editing.TokenizedFact(torch.tensor([0, 5, 6, 7]), (1, 3), target=7)
        >>> embedding_std(model, [fact]) == float(model.W_E[[5, 6]].detach().std())
        True
    """
    ids = torch.cat([f.tokens[f.subject[0] : f.subject[1]] for f in facts]).to(model.W_E.device)
    return float(model.W_E[ids].detach().std())


def subject_noise(
    n_samples: int, n_subject: int, d_model: int, std: float, seed: int
) -> Float[Tensor, "sample subject d_model"]:
    """The noise added to one fact's subject embeddings: ``std * randn(n_samples, n_subject,
    d_model)`` from a generator seeded with ``seed`` (:func:`causal_trace` uses ``seed + i`` for
    its ``i``-th fact), so a trace can be reproduced by hand.

    Example:
        >>> subject_noise(2, 3, 4, 1.0, 0).shape   # (sample, subject token, d_model)
        torch.Size([2, 3, 4])
    """
    gen = torch.Generator().manual_seed(seed)
    return std * torch.randn((n_samples, n_subject, d_model), generator=gen)


def _setter(value: Tensor, position: int) -> engine.Edit:
    def edit(rows: Tensor, first: int) -> None:
        rows[:, position - first] = value

    return edit


def causal_trace(
    model: Model,
    facts: Fact | TokenizedFact | Sequence[Fact | TokenizedFact],
    *,
    kinds: Sequence[Kind] = KINDS,
    noise: float = 3.0,
    samples: int = 10,
    window: int = 10,
    replacement: str | None = None,
    seed: int = 0,
    memory_budget: int | str | None = None,
    progress: bool = True,
) -> TraceResult:
    """Causally trace ``facts``: restore each state of a corrupted run and measure how much of
    ``P(object)`` comes back (module docstring).

    Args:
        model: a HookedTransformer.
        facts: :class:`~mechkit.editing.Fact` s (text; the model needs a tokenizer) or
            :class:`~mechkit.editing.TokenizedFact` s, or one of either.
        kinds: which states to restore: ``"hidden"``, ``"mlp"``, ``"attn"``.
        noise: the noise's standard deviation as a multiple of the subjects' token embeddings'
            std (3, as the paper); 0 corrupts nothing.
        samples: noise samples per fact (the paper's 10); each cell is their mean.
        window: layers of MLP or attention outputs restored together, centred on the cell's.
        replacement: a subject put in place of each fact's subject (same number of tokens)
            instead of noise; then one sample.
        seed: fact ``i``'s noise comes from a generator seeded ``seed + i``
            (:func:`subject_noise`).
        memory_budget: bytes (or ``"2GB"``) a batch of restorations may use; None: 2 GiB on
            CPU, 60% of free memory on CUDA.
        progress: show a progress bar.

    Returns:
        A :class:`TraceResult`.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> fact = mk.editing.TokenizedFact(torch.tensor([0, 5, 6, 7, 8, 9]), (1, 3), target=7)
        >>> r = mk.causal_trace(model, fact, kinds=("hidden",), noise=0.0, samples=1,
        ...                     progress=False)
        >>> float(r.indirect_effect.abs().nan_to_num().max()) < 1e-6   # no noise: no effect
        True
    """
    check_budget(memory_budget)
    kinds = tuple(kinds)
    if not kinds:
        raise InvalidArgumentError("Expected at least one kind of state to restore; got none.")
    for kind in kinds:
        check_choice("kinds", kind, KINDS)
    if isinstance(noise, bool) or not isinstance(noise, int | float) or noise < 0:
        raise InvalidArgumentError(
            f"Expected noise to be a number >= 0 (a multiple of the embedding std); got {noise!r}."
        )
    samples = check_positive_int("samples", samples)
    window = check_positive_int("window", window)
    cfg = model.cfg
    if cfg.attn_only and "mlp" in kinds:
        raise UnsupportedModelError(
            "Expected a model with MLPs to restore MLP outputs; this model is attention-only. "
            "Hint: kinds=('hidden', 'attn')."
        )
    prepared = tokenize_facts(model, facts)
    replaced: list[TokenizedFact] | None = None
    if replacement is not None:
        replaced = [_with_subject(model, f, replacement) for f in prepared]
        samples = 1
    std = embedding_std(model, prepared) * float(noise)
    budget = parse_budget(memory_budget, cfg.device or "cpu")
    n_layers = cfg.n_layers
    n_facts = len(prepared)
    per_fact = torch.full((n_facts, len(kinds), n_layers, len(TOKEN_CLASSES)), float("nan"))
    clean_prob = torch.zeros(n_facts)
    corrupt_prob = torch.zeros(n_facts)
    n_cells = sum(len(kinds) * n_layers * (f.n_tokens - f.subject[0]) for f in prepared)
    with progress_bar(n_cells, "causal trace", enabled=progress, unit="cell") as bar:
        for i, fact in enumerate(prepared):
            other = replaced[i] if replaced is not None else None
            cells, clean_prob[i], corrupt_prob[i] = _trace_one(
                model, fact, other, kinds, samples, window, std, seed + i, budget, bar
            )
            for c, positions in enumerate(token_classes(fact)):
                if positions:
                    per_fact[i, :, :, c] = cells[
                        :, :, [p - fact.subject[0] for p in positions]
                    ].mean(-1)
    return TraceResult(
        scores=per_fact.nanmean(0),
        per_fact=per_fact,
        clean_prob=clean_prob,
        corrupt_prob=corrupt_prob,
        kinds=kinds,
        token_classes=TOKEN_CLASSES,
        prompts=tuple(_prompt_text(model, f) for f in prepared),
        window=window,
        noise=None if replacement is not None else float(noise),
        noise_std=std if replacement is None else 0.0,
        samples=samples,
        model_name=model_name(model),
    )


def _prompt_text(model: Model, fact: TokenizedFact) -> str:
    if fact.fact is not None:
        return fact.fact.text
    return " ".join(str(t) for t in fact.tokens.tolist())


def _with_subject(model: Model, fact: TokenizedFact, subject: str) -> TokenizedFact:
    if fact.fact is None:
        raise InvalidArgumentError(
            "Expected facts as text (Fact) to put a replacement subject in; got token ids. "
            "Hint: use noise instead, or pass Fact objects."
        )
    other = tokenize_facts(model, dataclasses.replace(fact.fact, subject=subject, new_target=None))[
        0
    ]
    if other.n_tokens != fact.n_tokens or other.subject != fact.subject:
        raise InvalidArgumentError(
            f"Expected a replacement subject of as many tokens as {fact.fact.subject!r} "
            f"({fact.subject[1] - fact.subject[0]}); {subject!r} has "
            f"{other.subject[1] - other.subject[0]}. Hint: pick one of the same length."
        )
    return other


@torch.no_grad()
def _trace_one(
    model: Model,
    fact: TokenizedFact,
    replaced: TokenizedFact | None,
    kinds: tuple[str, ...],
    samples: int,
    window: int,
    std: float,
    seed: int,
    budget: int,
    bar: Any,
) -> tuple[Tensor, float, float]:
    """One fact: ``(kind, layer, position - subject start)`` restored probabilities, and the
    clean and corrupted probabilities."""
    device = model.cfg.device
    tokens = fact.tokens.to(device)[None]  # (1, pos)
    names = {
        n for k in kinds for n in (f"blocks.{l_}.{_HOOKS[k]}" for l_ in range(model.cfg.n_layers))
    }
    logits, clean = run_with_cache(model, tokens, names_filter=lambda name: name in names)
    clean_p = float(logits[0, -1].float().softmax(-1)[fact.target])
    start, stop = fact.subject
    if replaced is not None:
        base_tokens = replaced.tokens.to(device)[None]
        hooks: list[tuple[str, Any]] = []
    else:
        base_tokens = tokens.repeat(samples, 1)
        shift = subject_noise(samples, stop - start, model.cfg.d_model, std, seed)
        shift = shift.to(device=device, dtype=model.W_E.dtype)

        def corrupt(embed: Tensor, hook: Any) -> Tensor:
            embed = embed.clone()
            embed[:, start:stop] += shift  # (sample, subject, d_model)
            return embed

        hooks = [("hook_embed", corrupt)]
    with hook_scope(model, fwd_hooks=hooks):
        base = engine.run_base(model, base_tokens)
    n = base_tokens.shape[0]
    positions = torch.full((n,), fact.n_tokens - 1, dtype=torch.long)
    reader = engine.MetricReader(CrossEntropy(torch.full((n,), fact.target), positions), base)
    _, base_ce = engine.base_score(reader, base)
    assert base_ce is not None
    corrupt_p = float(torch.exp(-base_ce).mean())
    jobs = []
    for k, kind in enumerate(kinds):
        for layer in range(model.cfg.n_layers):
            hook_names = restore_hook_names(kind, layer, model.cfg.n_layers, window)
            first = int(hook_names[0].split(".")[1])
            for p in range(start, fact.n_tokens):
                edits = {h: _setter(clean[h][0, p], p) for h in hook_names}
                jobs.append(engine.PatchJob((k, layer, p - start), first, p, edits))
    cells = torch.zeros(len(kinds), model.cfg.n_layers, fact.n_tokens - start)
    for chunk in engine.run_jobs(model, base, jobs, reader, budget=budget, progress=bar):
        for result in chunk:
            assert result.per_prompt is not None
            cells[result.key] = torch.exp(-result.per_prompt).mean()
    return cells, clean_p, corrupt_p
