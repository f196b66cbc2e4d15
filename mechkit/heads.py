"""Head detection: score every attention head of a model for a known behaviour, in a few passes.

Five kinds of head, each scored in ``[0, 1]`` with 1.0 for a perfect head of the kind:

* ``"previous_token"``: mean attention from each position to the one just before it.
* ``"duplicate_token"``: mean attention from a token to all earlier positions holding the same
  token.
* ``"induction"``: the prefix-matching score of Olsson et al. (2022), "In-context Learning and
  Induction Heads": mean attention from a token to the positions right after its earlier
  occurrences (where the previous occurrence's continuation sits).
* ``"copying"``: does the head's OV circuit, read on its own (the direct path to the logits),
  raise the logit of the token it attends to? Score: the fraction of sampled tokens ``t`` whose
  own logit is among the ``top_k`` largest (over the whole vocabulary) of ``x_t W_V W_O W_U``.
  Olsson et al. measure copying by the positive eigenvalues of the same circuit; the top-k form
  is used here because it reads as a fraction, has a chance level (``top_k / d_vocab``) and
  makes a perfect copying head score exactly 1.0.
* ``"successor"``: Gould et al. (2023), "Successor Heads: Recurring, Interpretable Attention Heads
  In The Wild". On ordinal sequences (numbers, number words, ordinals, days, months, letters, in
  each spelling that is one token per item), the fraction of items whose successor gets a larger
  logit from the head's OV circuit than every other item of the same sequence (the item itself
  included, so a copying head scores 0).

Attention scores are means over the (prompt, query position) rows that *have* a target: the
BOS row, first-half rows of a repeated sequence, tokens with no earlier duplicate are left out
rather than counted as zeros (TransformerLens's ``head_detector.detect_head`` counts them, so a
perfect induction head scores about 0.48 there). The default data is ``n_prompts`` rows of
``[BOS] + r + r``, ``r`` being ``seq_len`` distinct random ordinary tokens (seeded). All heads are
scored from one forward pass per batch of prompts; hooks reduce each layer's pattern to per-head
sums on the spot, so no pattern outlives its layer, and the forward stops before the unembedding.

OV scores (copying, successor) read a token ``t`` as ``x_t = W_E[t] + MLP0(norm(W_E[t]))``, the
residual stream after block 0 with block 0's attention left out: Gould et al. pass tokens through
MLP0 (an "effective embedding"), which in real models acts as part of the embedding.
``effective_embedding=False``, or an attention-only model, gives the bare ``W_E[t]``. Each
layer's own input norm is applied to ``x_t`` before ``W_V``. The head's output reaches the logits
through ``W_U`` after the final norm's centring (LayerNorm models) and weights (if not folded),
without its scale (a positive factor changes no ranking) and without ``b_V``, ``b_O``, ``b_U``
(they add the same logits whatever the token). Computed in float32, all heads of a layer at once.
Cost: copying multiplies ``W_O`` by ``W_U`` in every layer: ``n_layers * n_heads *
min(d_head, n_tokens) * d_model * d_vocab`` multiply-adds (0.5 T for SmolLM2-135M at 64 tokens
or more: tens of seconds on a laptop CPU, a blink on a GPU; fewer tokens than ``d_head`` go
through ``W_U`` as residual vectors instead, in proportion).

Example:
    >>> model = mk.load_model("attn-only-2l")
    >>> scores = detect_heads(model, "induction", n_prompts=4, seq_len=10)
    >>> scores.scores.shape                              # (layer, head)
    torch.Size([2, 4])
    >>> [name for name, _ in scores.top(2)]
    ['L1H1', 'L1H0']
"""

from __future__ import annotations

import dataclasses
import html as html_module
import os
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mechkit.atomic_io import write_text_atomically
from mechkit.core.batching import each_batch
from mechkit.core.labels import model_name
from mechkit.core.names import head_name, parse_node
from mechkit.core.progress import progress_bar
from mechkit.core.results import rank
from mechkit.core.types import Model
from mechkit.errors import (
    EmptyDatasetError,
    InvalidSiteError,
    ShapeError,
    UnknownKindError,
    check_batch_size,
    did_you_mean,
)
from mechkit.hook_scope import hook_scope
from mechkit.interventions import capture
from mechkit.sites import Site
from mechkit.tokens import bos_token_id, encode

__all__ = [
    "KINDS",
    "AttentionView",
    "HeadKind",
    "HeadScores",
    "attention_targets",
    "detect_heads",
    "render_attention",
    "score_patterns",
]

HeadKind = Literal["previous_token", "duplicate_token", "induction", "copying", "successor"]
KINDS: tuple[str, ...] = get_args(HeadKind)
_ATTENTION_KINDS = ("previous_token", "duplicate_token", "induction")

# Ordinal sequences for successor heads, lower-case; each is tried with and without a leading
# space and capitalized, and kept up to its first item that is not a single token.
_ORDINAL_SEQUENCES: dict[str, str] = {
    "numbers": " ".join(str(i) for i in range(1, 21)),
    "number words": "one two three four five six seven eight nine ten eleven twelve",
    "ordinals": "first second third fourth fifth sixth seventh eighth ninth tenth",
    "days": "monday tuesday wednesday thursday friday saturday sunday",
    "months": "january february march april may june july august september october november "
    "december",
    "letters": " ".join("abcdefghijklmnopqrstuvwxyz"),
}
_MIN_SEQUENCE = 3  # shorter sequences hold too few candidates to say anything
_LOGIT_BUDGET = 1 << 24  # floats of logits held at once by the OV scores (64 MiB in float32)


@dataclasses.dataclass(frozen=True, eq=False)
class HeadScores:
    """One score per attention head, for one kind of head.

    Attributes:
        kind: the kind scored (``"induction"``...).
        scores: ``(layer, head)`` float scores on the CPU, 1.0 for a perfect head of the kind.
        model_name: the model's name (mechkit's load name, else ``model.cfg.model_name``).

    Example:
        >>> hs = HeadScores("induction", torch.tensor([[0.125, 0.25], [0.75, 0.5]]), "toy")
        >>> hs.top(2)
        [('L1H0', 0.75), ('L1H1', 0.5)]
    """

    kind: HeadKind
    scores: Float[Tensor, "layer head"]
    model_name: str

    def __post_init__(self) -> None:
        if self.scores.ndim != 2:
            raise ShapeError(
                f"Expected scores of shape (layer, head); got {tuple(self.scores.shape)}."
            )

    def label(self, layer: int, head: int) -> str:
        """The label of a head, e.g. ``L1H4`` (:func:`mechkit.core.head_name`)."""
        return head_name(layer, head)

    def top(self, n: int = 10, *, absolute: bool = True) -> list[tuple[str, float]]:
        """The ``n`` highest-scoring heads as ``(label, score)``, by :func:`mechkit.core.rank`
        (NaN scores last; scores are in [0, 1], so ``absolute`` changes nothing here)."""
        n_layers, n_heads = self.scores.shape
        labels = [self.label(layer, head) for layer in range(n_layers) for head in range(n_heads)]
        return rank(labels, self.scores.flatten(), n, absolute=absolute)

    def to_dataframe(self) -> Any:
        """A pandas DataFrame with one row per head: ``layer, head, label, score``."""
        import pandas as pd

        n_layers, n_heads = self.scores.shape
        return pd.DataFrame(
            [
                {
                    "layer": layer,
                    "head": head,
                    "label": self.label(layer, head),
                    "score": float(self.scores[layer, head]),
                }
                for layer in range(n_layers)
                for head in range(n_heads)
            ]
        )

    def plot(self) -> Any:
        """A plotly heatmap, layer by head, on the fixed range [0, 1]."""
        import plotly.graph_objects as go

        n_layers, n_heads = self.scores.shape
        fig = go.Figure(
            go.Heatmap(
                z=self.scores.numpy(),
                x=list(range(n_heads)),
                y=list(range(n_layers)),
                zmin=0.0,
                zmax=1.0,
                colorscale="Blues",
                colorbar={"title": "score"},
                hovertemplate="L%{y}H%{x}: %{z:.3f}<extra></extra>",
            )
        )
        fig.update_layout(
            title=f"{self.kind} scores: {self.model_name}",
            xaxis_title="head",
            yaxis_title="layer",
            yaxis={"autorange": "reversed"},
        )
        return fig


# ----------------------------------------------------------------------------------------------
# Attention-pattern scores
# ----------------------------------------------------------------------------------------------


def attention_targets(
    tokens: Int[Tensor, "batch pos"], kind: HeadKind
) -> Bool[Tensor, "batch query key"]:
    """Where a perfect head of ``kind`` attends: True at each query's target key positions.

    Inferred from the tokens alone. A query row with no True entry has no target (position 0;
    for duplicate and induction, a token with no earlier occurrence) and is left out of scores.

    Example:
        >>> attention_targets(torch.tensor([[0, 7, 8, 7, 8]]), "induction")[0, 3].tolist()
        [False, False, True, False, False]
    """
    _check_kind(kind, _ATTENTION_KINDS)
    if tokens.ndim != 2:
        raise ShapeError(f"Expected tokens of shape (batch, pos); got {tuple(tokens.shape)}.")
    batch, n_pos = tokens.shape
    if kind == "previous_token":
        previous = torch.ones(n_pos - 1, dtype=torch.bool, device=tokens.device).diag(-1)
        return previous.expand(batch, n_pos, n_pos)  # [q, q - 1] for q >= 1
    earlier = torch.ones(n_pos, n_pos, dtype=torch.bool, device=tokens.device).tril(-1)
    duplicate = (tokens[:, :, None] == tokens[:, None, :]) & earlier  # (batch, query, key)
    if kind == "duplicate_token":
        return duplicate
    induction = torch.zeros_like(duplicate)
    induction[:, :, 1:] = duplicate[:, :, :-1]  # the key right after each earlier occurrence
    return induction


def _target_attention(
    pattern: Float[Tensor, "batch head query key"], targets: Bool[Tensor, "batch query key"]
) -> tuple[Float[Tensor, " head"], int]:
    """Per head, the attention on the targets summed over the rows with a target; the row count."""
    on_target = (pattern.float() * targets[:, None].float()).sum(-1)  # (batch, head, query)
    valid = targets.any(-1)  # (batch, query)
    return (on_target * valid[:, None].float()).sum((0, 2)), int(valid.sum())


def score_patterns(
    pattern: Float[Tensor, "batch head query key"], targets: Bool[Tensor, "batch query key"]
) -> Float[Tensor, " head"]:
    """Mean attention on the targets, over the (batch, query) rows that have a target.

    Args:
        pattern: attention patterns (softmax output, rows sum to 1), as in ``hook_pattern``.
        targets: where a perfect head attends (:func:`attention_targets`).

    Raises:
        ShapeError: the shapes do not match.
        EmptyDatasetError: no row has a target.

    Example:
        >>> tokens = torch.tensor([[0, 5, 6, 5, 6]])
        >>> perfect = attention_targets(tokens, "previous_token")[:, None].float()
        >>> perfect[:, :, 0, 0] = 1.0                      # the BOS row attends to itself
        >>> score_patterns(perfect, attention_targets(tokens, "previous_token"))
        tensor([1.])
    """
    b, _, q, k = pattern.shape if pattern.ndim == 4 else (None, None, None, None)
    if pattern.ndim != 4 or targets.shape != (b, q, k):
        raise ShapeError(
            f"Expected pattern (batch, head, query, key) and targets (batch, query, key) with "
            f"matching sizes; got pattern {tuple(pattern.shape)}, targets "
            f"{tuple(targets.shape)}."
        )
    total, rows = _target_attention(pattern, targets.to(pattern.device))
    if rows == 0:
        raise EmptyDatasetError(
            "Expected at least one query position with a target; got none. Hint: induction and "
            "duplicate-token scores need tokens that occur more than once."
        )
    return total / rows


def _attention_scores(
    model: Model,
    tokens: Int[Tensor, "batch pos"],
    kind: HeadKind,
    batch_size: int | None,
    bar: Any,
) -> Float[Tensor, "layer head"]:
    """All heads' scores, one forward pass per batch of prompts."""
    cfg = model.cfg
    total = torch.zeros(cfg.n_layers, cfg.n_heads, dtype=torch.float64)
    rows = 0

    def run(chunk: slice) -> None:
        nonlocal total, rows
        batch = tokens[chunk].to(cfg.device)  # (batch, pos)
        targets = attention_targets(batch, kind)  # (batch, query, key)
        part = torch.zeros_like(total)  # kept only once the whole pass fitted (each_batch)

        def reduce(pattern: Tensor, hook: Any) -> None:
            layer_total, _ = _target_attention(pattern, targets)  # pattern: (b, head, q, k)
            part[hook.layer()] += layer_total.double().cpu()

        hooks = [(f"blocks.{layer}.attn.hook_pattern", reduce) for layer in range(cfg.n_layers)]
        with hook_scope(model, fwd_hooks=hooks):
            model(batch, stop_at_layer=cfg.n_layers)  # all blocks; no final norm or unembed
        total += part
        rows += int(targets.any(-1).sum())
        bar.update(batch.shape[0])

    each_batch(tokens.shape[0], batch_size, run)
    if rows == 0:
        raise EmptyDatasetError(
            f"Expected tokens in which some query position has a target for {kind!r}; got none. "
            "Hint: duplicate-token and induction scores need repeated tokens; leave tokens=None "
            "for repeated random tokens."
        )
    return (total / rows).float()


def _ordinary_token_ids(model: Model) -> Int[Tensor, " n"]:
    """Token ids that are neither BOS nor special (nor unused embedding rows past the tokenizer)."""
    tokenizer = model.tokenizer
    n_vocab = model.cfg.d_vocab
    excluded = {bos_token_id(model)}
    if tokenizer is not None:
        n_vocab = min(n_vocab, len(tokenizer))
        excluded |= set(tokenizer.all_special_ids)
        excluded |= set(getattr(tokenizer, "added_tokens_decoder", {}))
    keep = torch.ones(n_vocab, dtype=torch.bool)
    keep[[i for i in excluded if i < n_vocab]] = False
    return keep.nonzero().squeeze(-1)


def _repeated_random_tokens(
    model: Model, n_prompts: int, seq_len: int, seed: int
) -> Int[Tensor, "batch pos"]:
    """``[BOS] + r + r`` per prompt, ``r`` being ``seq_len`` distinct random ordinary tokens."""
    _check_positive(n_prompts=n_prompts, seq_len=seq_len)
    if 2 * seq_len + 1 > model.cfg.n_ctx:
        raise ShapeError(
            f"Expected 2 * seq_len + 1 <= n_ctx = {model.cfg.n_ctx}; got seq_len={seq_len}."
        )
    allowed = _ordinary_token_ids(model)
    if seq_len > len(allowed):
        raise ShapeError(f"Expected seq_len <= {len(allowed)} (ordinary tokens); got {seq_len}.")
    generator = torch.Generator().manual_seed(seed)
    weights = torch.ones(n_prompts, len(allowed))
    picks = torch.multinomial(weights, seq_len, replacement=False, generator=generator)
    segment = allowed[picks]  # (batch, seq_len)
    bos = torch.full((n_prompts, 1), bos_token_id(model), dtype=torch.long)
    return torch.cat([bos, segment, segment], dim=1)  # (batch, 1 + 2 * seq_len)


# ----------------------------------------------------------------------------------------------
# OV-circuit scores
# ----------------------------------------------------------------------------------------------


def _token_inputs(
    model: Model, ids: Int[Tensor, " n"], effective_embedding: bool
) -> Float[Tensor, "n d_model"]:
    """How a head sees token ``t`` at the position it attends to: the (effective) embedding."""
    x = model.embed(ids[None].to(model.cfg.device))  # (1, n, d_model)
    if effective_embedding and not model.cfg.attn_only:
        block = model.blocks[0]
        out = block.mlp(block.ln2(x))
        if getattr(model.cfg, "use_normalization_before_and_after", False):
            out = block.ln2_post(out)  # Gemma normalizes the MLP's output before adding it
        x = x + out  # the residual after block 0, attention left out
    return x[0]


def _head_outputs(model: Model, layer: int) -> Float[Tensor, "head d_head d_model"]:
    """``W_O`` as the logits read it: times the weights of the norm Gemma applies to the
    attention's output (its per-token scale is positive and changes no ranking), then the
    final norm's linear part."""
    block = model.blocks[layer]
    W_O = block.attn.W_O.float()
    post = getattr(getattr(block, "ln1_post", None), "w", None)
    if getattr(model.cfg, "use_normalization_before_and_after", False) and post is not None:
        W_O = W_O * post.float()
    return _to_logit_basis(model, W_O)


def _to_logit_basis(model: Model, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
    """The linear part of the final norm (centring, unfolded weights), before ``W_U``."""
    if model.cfg.normalization_type in ("LN", "LNPre"):
        x = x - x.mean(-1, keepdim=True)
    weight = getattr(getattr(model, "ln_final", None), "w", None)
    return x * weight if isinstance(weight, Tensor) else x


def _ov_values(
    model: Model, layer: int, inputs: Float[Tensor, "n d_model"]
) -> Float[Tensor, "head n d_head"]:
    """Each head's value vectors for ``inputs`` (the layer's input norm applied, no bias)."""
    block = model.blocks[layer]
    normed = block.ln1(inputs[None])[0].float()  # (n, d_model)
    return torch.einsum("nm,hmd->hnd", normed, block.attn.W_V.float())  # W_V expanded for GQA


def _copying_scores(
    model: Model, ids: Int[Tensor, " n"], top_k: int, effective_embedding: bool, bar: Any
) -> Float[Tensor, "layer head"]:
    """Fraction of ``ids`` whose own logit is in the head's OV top-k over the whole vocabulary."""
    cfg = model.cfg
    ids = ids.to(cfg.device)
    inputs = _token_inputs(model, ids, effective_embedding)
    W_U = model.W_U.float()  # (d_model, d_vocab)
    n, n_vocab = len(ids), W_U.shape[1]
    chunk = max(1, min(n_vocab, _LOGIT_BUDGET // (cfg.n_heads * n)))
    out = torch.zeros(cfg.n_layers, cfg.n_heads)
    for layer in range(cfg.n_layers):
        values = _ov_values(model, layer, inputs)  # (head, n, d_head)
        W_O = _head_outputs(model, layer)  # (head, d_head, d_model)
        n_heads, d_head = W_O.shape[:2]
        # logits = values @ W_O @ W_U, associated so that the product with W_U (the cost) has
        # min(d_head, n) rows per head: W_O @ W_U for many tokens, the head outputs for few
        few = n < d_head
        if few:
            rows = (values @ W_O).reshape(n_heads * n, -1)  # (head * n, d_model)
            own = (rows * W_U[:, ids].T.repeat(n_heads, 1)).sum(-1).view(n_heads, n)
        else:
            rows = W_O.reshape(n_heads * d_head, -1)  # one matrix product for every head
            own_dir = (rows @ W_U[:, ids]).view(n_heads, d_head, n)  # (head, d_head, n)
            own = torch.einsum("hnd,hdn->hn", values, own_dir)  # (head, n): logit of t itself
        at_least = torch.zeros(cfg.n_heads, n, dtype=torch.long, device=cfg.device)
        for lo in range(0, n_vocab, chunk):
            hi = min(lo + chunk, n_vocab)
            if few:
                logits = (rows @ W_U[:, lo:hi]).view(n_heads, n, hi - lo)
            else:
                logits = values @ (rows @ W_U[:, lo:hi]).view(n_heads, d_head, hi - lo)
            beats = (logits >= own[..., None]).sum(-1)  # ties count against t ...
            # ... but t's own column does not: taken back where t lies in this chunk
            inside = (ids >= lo) & (ids < hi)  # (n,)
            column = (ids - lo).clamp(0, hi - lo - 1)[None, :, None].expand(n_heads, n, 1)
            self_counted = (logits.gather(-1, column)[..., 0] >= own) & inside
            at_least += beats - self_counted.long()
        out[layer] = (at_least < top_k).float().mean(-1).cpu()
        bar.update(1)
    return out


def _ordinal_families(model: Model) -> list[list[int]]:
    """Token ids of the built-in ordinal sequences, in every spelling that is one token each."""
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise EmptyDatasetError(
            "Expected ordinal sequences of token ids for a model without a tokenizer; got none. "
            "Hint: detect_heads(model, 'successor', tokens=[[3, 4, 5, 6], [10, 11, 12]])."
        )
    families: list[list[int]] = []
    for sequence in _ORDINAL_SEQUENCES.values():
        words = sequence.split()
        for prefix in ("", " "):
            for spell in (str.lower, str.capitalize):
                ids: list[int] = []
                for word in words:
                    piece = tokenizer.encode(prefix + spell(word), add_special_tokens=False)
                    if len(piece) != 1:
                        break
                    ids.append(piece[0])
                if len(ids) >= _MIN_SEQUENCE and ids not in families:
                    families.append(ids)
    return families


def _successor_scores(
    model: Model, families: list[list[int]], effective_embedding: bool, bar: Any
) -> Float[Tensor, "layer head"]:
    """Fraction of items whose successor beats every other item of its sequence (OV logits)."""
    cfg = model.cfg
    flat = torch.tensor([t for fam in families for t in fam], device=cfg.device)  # (n,)
    member = torch.tensor([i for i, fam in enumerate(families) for _ in fam], device=cfg.device)
    candidates = flat.unique()  # (u,)
    column = torch.searchsorted(candidates, flat)  # (n,) each item's column among candidates
    # candidate c is allowed for item j when c belongs to j's sequence (a token may sit in several)
    same_sequence = (member[:, None] == member[None]).float()  # (n, n)
    one_hot = torch.nn.functional.one_hot(column, len(candidates)).float()  # (n, u)
    allowed = (same_sequence @ one_hot) > 0  # (n, u)
    scored = torch.ones(len(flat), dtype=torch.bool, device=cfg.device)
    scored[torch.tensor([len(f) for f in families], device=cfg.device).cumsum(0) - 1] = False
    successor = column.roll(-1)[scored]  # (m,) the successor's column, last items left out
    others = allowed[scored].clone()
    others[torch.arange(len(successor), device=cfg.device), successor] = False

    inputs = _token_inputs(model, flat, effective_embedding)
    W_U = model.W_U[:, candidates].float()  # (d_model, u)
    out = torch.zeros(cfg.n_layers, cfg.n_heads)
    for layer in range(cfg.n_layers):
        values = _ov_values(model, layer, inputs[scored])  # (head, m, d_head)
        W_O = _head_outputs(model, layer)  # (head, d_head, d_model)
        logits = values @ (W_O @ W_U)  # (head, m, u)
        target = logits.gather(-1, successor[None, :, None].expand(cfg.n_heads, -1, 1))[..., 0]
        best_other = logits.masked_fill(~others, float("-inf")).amax(-1)  # (head, m)
        out[layer] = (target > best_other).float().mean(-1).cpu()
        bar.update(1)
    return out


def _as_families(tokens: Any) -> list[list[int]]:
    rows = tokens.tolist() if isinstance(tokens, Tensor) else list(tokens)
    rows = [r.tolist() if isinstance(r, Tensor) else r for r in rows]
    if not rows or any(not isinstance(r, list | tuple) or len(r) < 2 for r in rows):
        raise ShapeError(
            "Expected successor tokens as ordinal sequences of ids, each at least 2 long "
            "([[id_1, id_2, ...], ...]); got something else."
        )
    return [[int(t) for t in r] for r in rows]


# ----------------------------------------------------------------------------------------------
# The entry point
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def detect_heads(
    model: Model,
    kind: HeadKind,
    *,
    tokens: Int[Tensor, "batch pos"] | Sequence[Sequence[int]] | None = None,
    n_prompts: int = 16,  # 16 x 80 rows: SmolLM2's scores move by about 0.02 between seeds
    seq_len: int = 40,  # each prompt is [BOS] + 40 random tokens, twice: 81 positions
    seed: int = 0,
    batch_size: int | None = 8,  # prompts per forward pass; lower it to save memory
    n_tokens: int = 256,  # copying: a fraction of 256 tokens, standard error at most 0.03
    top_k: int = 5,  # copying: the token's own logit must be in the top 5
    effective_embedding: bool = True,  # OV scores read tokens through MLP0 (Gould et al.)
    progress: bool = True,
) -> HeadScores:
    """Score every attention head of ``model`` for one kind of behaviour.

    Args:
        model: a HookedTransformer (on any device).
        kind: ``"previous_token"``, ``"duplicate_token"``, ``"induction"``, ``"copying"`` or
            ``"successor"`` (see the module docstring for each score).
        tokens: the data; None for the defaults. Attention kinds: ``(batch, pos)`` prompts,
            targets inferred from the tokens. ``"copying"``: the token ids to test (any shape;
            duplicates dropped). ``"successor"``: ordinal sequences, ``[[id_1, id_2, ...], ...]``.
        n_prompts, seq_len, seed: the default attention data, ``n_prompts`` rows of
            ``[BOS] + r + r`` with ``r`` of ``seq_len`` random tokens; ``seed`` also picks the
            copying tokens.
        batch_size: prompts per forward pass.
        n_tokens: how many random ordinary tokens the copying score samples.
        top_k: copying counts token ``t`` when its logit is among the ``top_k`` largest.
        effective_embedding: for copying and successor, read a token as its embedding plus block
            0's MLP output on it; False for the bare embedding (no effect on attention-only
            models).
        progress: show a bar (over the prompts for attention kinds, over the layers for
            ``"copying"`` and ``"successor"``).

    Returns:
        The :class:`HeadScores`, ``scores`` of shape ``(layer, head)``.

    Raises:
        UnknownKindError: ``kind`` is not one of the five.
        ShapeError: tokens of the wrong shape, or sizes out of range.
        EmptyDatasetError: no row of the tokens has a target, or no successor data.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> scores = detect_heads(model, "previous_token", n_prompts=4, seq_len=10)
        >>> scores.scores.shape, [name for name, _ in scores.top(1)]   # (layer, head)
        (torch.Size([2, 4]), ['L0H2'])
    """
    _check_kind(kind, KINDS)
    check_batch_size(batch_size)  # None: one pass
    _check_positive(n_tokens=n_tokens, top_k=top_k)
    if kind in _ATTENTION_KINDS:
        if tokens is None:
            data = _repeated_random_tokens(model, n_prompts, seq_len, seed)
        else:
            data = _as_prompts(model, tokens)
        with progress_bar(len(data), f"{kind} heads", enabled=progress, unit="prompt") as bar:
            scores = _attention_scores(model, data, kind, batch_size, bar)
    elif kind == "copying":
        if tokens is None:
            allowed = _ordinary_token_ids(model)
            generator = torch.Generator().manual_seed(seed)
            ids = allowed[torch.randperm(len(allowed), generator=generator)[:n_tokens]]
        else:
            ids = _as_ids(model, tokens).flatten().unique()
        with progress_bar(
            model.cfg.n_layers, "copying heads", enabled=progress, unit="layer"
        ) as bar:
            scores = _copying_scores(model, ids, top_k, effective_embedding, bar)
    else:
        families = _ordinal_families(model) if tokens is None else _as_families(tokens)
        _as_ids(model, [t for fam in families for t in fam])
        with progress_bar(
            model.cfg.n_layers, "successor heads", enabled=progress, unit="layer"
        ) as bar:
            scores = _successor_scores(model, families, effective_embedding, bar)
    return HeadScores(kind=kind, scores=scores, model_name=model_name(model))


def _as_ids(model: Model, tokens: Any) -> Int[Tensor, "..."]:
    """Token ids as a long tensor, checked to be integers inside the vocabulary."""
    if isinstance(tokens, str):
        raise ShapeError(
            "Expected token ids, not text. Hint: tokens=model.to_tokens(text) (random tokens "
            "repeated make the cleanest test: leave tokens=None)."
        )
    ids = torch.as_tensor(tokens)
    if ids.numel() == 0 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ShapeError(
            f"Expected integer token ids; got dtype {ids.dtype}, shape {tuple(ids.shape)}."
        )
    if int(ids.min()) < 0 or int(ids.max()) >= model.cfg.d_vocab:
        raise ShapeError(
            f"Expected token ids in [0, {model.cfg.d_vocab}); got ids from {int(ids.min())} to "
            f"{int(ids.max())}."
        )
    return ids.long()


def _as_prompts(model: Model, tokens: Any) -> Int[Tensor, "batch pos"]:
    """Prompts as ``(batch, pos)`` ids (one prompt may come as ``(pos,)``)."""
    ids = _as_ids(model, tokens)
    ids = ids[None] if ids.ndim == 1 else ids
    if ids.ndim != 2 or not 2 <= ids.shape[1] <= model.cfg.n_ctx:
        raise ShapeError(
            f"Expected prompts of shape (batch, pos) with 2 <= pos <= n_ctx = {model.cfg.n_ctx}; "
            f"got {tuple(ids.shape)}."
        )
    return ids


def _check_kind(kind: Any, kinds: tuple[str, ...]) -> None:
    if kind not in kinds:
        raise UnknownKindError(
            f"Expected a head kind among {', '.join(kinds)}; got {kind!r}."
            f"{did_you_mean(str(kind), kinds)}"
        )


def _check_positive(**sizes: int) -> None:
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ShapeError(f"Expected {name} to be a positive integer; got {value!r}.")


# ----------------------------------------------------------------------------------------------
# Rendering attention patterns
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class AttentionView:
    """Rendered attention patterns: the HTML file written, and inline display in notebooks.

    Attributes:
        path: the self-contained HTML file (CircuitsVis's JavaScript inlined; works offline).
        html: the HTML fragment CircuitsVis rendered (what notebooks display).
        heads: the ``(layer, head)`` pairs shown, in order.
        tokens: the token strings on the axes.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> view = mk.render_attention(model, [0, 5, 6, 5, 6], heads=["L1H0"])
        >>> view.heads, view.tokens                          # no tokenizer: ids as labels
        (((1, 0),), ('0', '5', '6', '5', '6'))
    """

    path: Path
    html: str
    heads: tuple[tuple[int, int], ...]
    tokens: tuple[str, ...]

    def _repr_html_(self) -> str:
        return self.html  # the inlined version: CircuitsVis's own would probe the network


@torch.no_grad()
def render_attention(
    model: Model,
    tokens_or_text: str | Int[Tensor, " pos"] | Sequence[int],
    heads: Sequence[tuple[int, int] | str | Site],
    *,
    path: str | os.PathLike | None = None,
) -> AttentionView:
    """Render the attention patterns of chosen heads on one prompt to an HTML file.

    Uses CircuitsVis's ``attention_heads`` view (its ``attention_patterns`` is deprecated and
    cannot name the heads): one thumbnail per head, labelled ``L{layer}H{head}``.

    Args:
        model: a HookedTransformer.
        tokens_or_text: one prompt, as text (tokenized with the model's defaults) or token ids.
        heads: ``(layer, head)`` pairs (negative layers count from the end), head names
            (``"L18H6"``; the older ``"a18.h6"`` and ``"18.6"`` are read too) or Sites.
        path: the HTML file to write; None for a new file in the system's temp folder. Written
            to a temporary name beside it and renamed into place.

    Returns:
        An :class:`AttentionView` with ``.path``; a notebook displays it inline.

    Example:
        >>> model = mk.load_model("smollm2-135m")
        >>> view = render_attention(model, "The cat sat. The cat", heads=["L18H6", (-1, 0)])
        >>> view.path.suffix, view.heads   # a notebook shows `view` as the patterns
        ('.html', ((18, 6), (29, 0)))
    """
    from circuitsvis.attention import attention_heads

    if isinstance(tokens_or_text, str):
        ids = torch.tensor([encode(model, tokens_or_text)])  # (1, pos); BOS as the model's default
    else:
        ids = _as_prompts(model, tokens_or_text)
    if ids.shape[0] != 1:
        raise ShapeError(f"Expected one prompt; got {ids.shape[0]} (shape {tuple(ids.shape)}).")
    if not heads:
        raise ShapeError("Expected at least one (layer, head) pair in heads; got none.")
    sites = [_pattern_site(head).resolve(model) for head in heads]
    chosen = tuple((int(s.layer or 0), int(s.head or 0)) for s in sites)  # resolved: both set
    with capture(model, *sites) as patterns:
        model(ids.to(model.cfg.device), stop_at_layer=max(layer for layer, _ in chosen) + 1)
    attention = torch.stack([patterns[s][0].float().cpu() for s in sites])  # (head, q, k)
    if model.tokenizer is not None:
        labels = tuple(str(t) for t in model.to_str_tokens(ids[0]))
    else:
        labels = tuple(str(t) for t in ids[0].tolist())
    names = [head_name(layer, head) for layer, head in chosen]
    rendered = attention_heads(attention=attention, tokens=list(labels), attention_head_names=names)
    html = rendered.local_src
    title = html_module.escape(f"{model_name(model)}: {', '.join(names)}")
    document = (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>{title}</title></head>\n<body>\n{html}\n</body></html>\n"
    )
    target = write_text_atomically(Path(path) if path is not None else _fresh_html_path(), document)
    return AttentionView(
        path=target,
        html=html,
        heads=chosen,
        tokens=labels,
    )


def _pattern_site(head: tuple[int, int] | str | Site) -> Site:
    """The attention-pattern site of a head given as ``(layer, head)``, a name (``"L18H6"``,
    or any form :func:`mechkit.core.parse_node` reads) or a :class:`Site` with a head."""
    if isinstance(head, Site):
        if head.head is None or head.layer is None:
            raise InvalidSiteError(f"Expected a Site with a layer and a head; got {head!r}.")
        return Site("pattern", layer=head.layer, head=head.head)
    if isinstance(head, str):
        node = parse_node(head)
        if node.kind != "head" or node.port is not None:
            raise InvalidSiteError(
                f"Expected an attention head such as 'L18H6'; got {head!r} ({node.kind})."
            )
        assert node.layer is not None and node.index is not None  # set for every head
        return Site("pattern", layer=node.layer, head=node.index)
    layer, index = head
    return Site("pattern", layer=int(layer), head=int(index))


def _fresh_html_path() -> Path:
    return Path(tempfile.gettempdir()) / f"mechkit-attention-{uuid.uuid4().hex[:12]}.html"
