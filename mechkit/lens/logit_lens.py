"""The logit lens: what the residual stream predicts at every layer (nostalgebraist 2020).

The residual stream before block ``l`` (and after the last block) is decoded as if it were the
final one: ``logits_l = W_U · norm_final(h_l) + b_U``. The final normalization is **recomputed
on h_l**: RMSNorm/LayerNorm divide by the scale of the vector they are given, and an early
layer's residual has a much smaller norm than the last one's. Reusing the final layer's cached
scale (what ``ActivationCache.accumulated_resid(apply_ln=True)`` does) shrinks the early
layers' logits and flattens their distributions; it is not the logit lens.

Layer entries are ``n_layers + 1``: ``resid_pre`` of each block, then ``resid_post`` of the
last block, whose decoding is the model's own output (tested to 1e-4).

Memory: logits are computed one layer and one chunk of positions at a time; only what was asked
for is kept (top-k, targets' rank/probability/logit, and the full ``[layer, batch, pos,
d_vocab]`` tensor only with ``keep_logits=True``).

Example:
    >>> model = mk.load_model("smollm2-135m")
    >>> lens = mk.logit_lens(model, "The Eiffel Tower is located in the city of", top_k=3)
    >>> lens.top_ids.shape                 # (layer, batch, pos, k)
    torch.Size([31, 1, 10, 3])
    >>> lens.top_tokens[-1][0][-1]         # final layer, prompt 0, last position
    (' Paris', ' Mont', ' Mar')
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens.utilities.activation_functions import apply_softcap

from mechkit.core.results import rank
from mechkit.core.types import Model
from mechkit.errors import InvalidArgumentError, ShapeError, check_choice
from mechkit.hook_scope import run_with_cache
from mechkit.tokens import token_batch, tokenize_answer

__all__ = ["LogitLens", "logit_lens", "decode_residual", "lens_layer_labels"]


def lens_layer_labels(n_layers: int) -> list[str]:
    """Labels of the lens's layer entries: ``resid_pre 0 .. resid_pre n-1, final``.

    Example:
        >>> lens_layer_labels(2)
        ['resid_pre 0', 'resid_pre 1', 'final']
    """
    return [f"resid_pre {i}" for i in range(n_layers)] + ["final"]


def decode_residual(
    model: Model, resid: Float[Tensor, "... d_model"]
) -> Float[Tensor, "... d_vocab"]:
    """Logits for a residual-stream vector, as the model's own head makes them: the final norm
    recomputed on ``resid``, the unembedding, and the model's logit soft-cap if it has one.

    (``resid @ W_U`` reads the unembedding in place; TransformerLens's ``unembed`` copies its
    transpose, 113 MB for SmolLM2, on every call.)

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> _, cache = model.run_with_cache(torch.tensor([[1, 2, 3]]))
        >>> final = cache["blocks.1.hook_resid_post"]   # (batch, pos, d_model)
        >>> bool(torch.allclose(decode_residual(model, final), model(torch.tensor([[1, 2, 3]])),
        ...                     atol=1e-4))
        True
    """
    if model.cfg.normalization_type is not None:
        resid = model.ln_final(resid)  # recomputes the scale from resid itself
    logits = resid @ model.W_U + model.b_U
    return apply_softcap(logits, model.cfg.output_logits_soft_cap)


@dataclasses.dataclass(frozen=True, eq=False)
class LogitLens:
    """Per-layer decodings of the residual stream.

    Attributes:
        tokens: ``(batch, pos)`` the input ids (right-padded).
        mask: ``(batch, pos)`` True at real tokens.
        layer_labels: ``n_layers + 1`` labels (``resid_pre 0``, ..., ``final``).
        top_ids, top_probs: ``(layer, batch, pos, k)`` the top-k tokens and their probabilities.
        target_ids: ``(batch, pos, n_targets)`` the tracked tokens, or None.
        target_ranks: ``(layer, batch, pos, n_targets)`` rank (0 = top) of each tracked token.
        target_probs, target_logits: ``(layer, batch, pos, n_targets)``.
        logits: ``(layer, batch, pos, d_vocab)`` when ``keep_logits=True``, else None.
        token_strs: the decoded input tokens per prompt (None without a tokenizer).
        top_tokens: the decoded top-k tokens, ``[layer][batch][pos] -> tuple`` (None without a
            tokenizer).

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> lens = mk.logit_lens(model, torch.tensor([[1, 2, 3]]), targets=[7])
        >>> lens.target_ranks.shape                          # (layer, batch, pos, n_targets)
        torch.Size([3, 1, 3, 1])
    """

    tokens: Int[Tensor, "batch pos"]
    mask: Bool[Tensor, "batch pos"]
    layer_labels: tuple[str, ...]
    top_ids: Int[Tensor, "layer batch pos k"]
    top_probs: Float[Tensor, "layer batch pos k"]
    target_ids: Int[Tensor, "batch pos n_targets"] | None
    target_ranks: Int[Tensor, "layer batch pos n_targets"] | None
    target_probs: Float[Tensor, "layer batch pos n_targets"] | None
    target_logits: Float[Tensor, "layer batch pos n_targets"] | None
    logits: Float[Tensor, "layer batch pos d_vocab"] | None
    token_strs: tuple[tuple[str, ...], ...] | None
    top_tokens: tuple | None

    @property
    def probs(self) -> Float[Tensor, "layer batch pos d_vocab"]:
        """Softmax of the kept logits (needs ``keep_logits=True``)."""
        if self.logits is None:
            raise InvalidArgumentError(
                "Expected a lens run with keep_logits=True; this one kept only top-k and targets "
                "to save memory. Hint: mk.logit_lens(model, tokens, keep_logits=True)."
            )
        return self.logits.softmax(-1)

    def top(
        self,
        n: int = 10,
        *,
        absolute: bool = True,
        layer: int = -1,
        prompt: int = 0,
        position: int = -1,
    ) -> list[tuple[str | int, float]]:
        """The tokens the lens predicts at one cell, ``(token, probability)``, ranked by
        :func:`mechkit.core.rank` (probabilities are never negative, so ``absolute`` changes
        nothing). Only the kept ``top_k`` tokens can be returned. ``layer`` indexes the layer
        entries (-1: the model's output), ``position`` the prompt's real tokens (-1: its last).
        Tokens are strings when the model has a tokenizer, else ids.
        """
        if position < 0:
            position = int(self.mask[prompt].sum()) + position
        ids = self.top_ids[layer, prompt, position].tolist()
        labels: list[str | int] = list(ids)
        if self.top_tokens is not None:
            labels = list(self.top_tokens[layer][prompt][position])
        return rank(labels, self.top_probs[layer, prompt, position], n, absolute=absolute)

    def to_dataframe(self) -> Any:
        """One row per (layer, prompt, position): the top token and the targets' statistics."""
        import pandas as pd

        n_layer, n_batch, n_pos, _ = self.top_ids.shape
        rows = []
        for layer in range(n_layer):
            for b in range(n_batch):
                for p in range(n_pos):
                    if not self.mask[b, p]:
                        continue
                    row = {
                        "layer": layer,
                        "layer_label": self.layer_labels[layer],
                        "prompt": b,
                        "pos": p,
                        "token": self.token_strs[b][p]
                        if self.token_strs
                        else int(self.tokens[b, p]),
                        "top_token": self.top_tokens[layer][b][p][0]
                        if self.top_tokens
                        else int(self.top_ids[layer, b, p, 0]),
                        "top_prob": float(self.top_probs[layer, b, p, 0]),
                    }
                    if (
                        self.target_ids is not None
                        and self.target_ranks is not None
                        and self.target_probs is not None
                        and self.target_logits is not None
                    ):
                        for t in range(self.target_ids.shape[-1]):
                            row[f"target{t}_id"] = int(self.target_ids[b, p, t])
                            row[f"target{t}_rank"] = int(self.target_ranks[layer, b, p, t])
                            row[f"target{t}_prob"] = float(self.target_probs[layer, b, p, t])
                            row[f"target{t}_logit"] = float(self.target_logits[layer, b, p, t])
                    rows.append(row)
        return pd.DataFrame(rows)

    def plot(self, prompt: int = 0) -> Any:
        """The layer x position grid: each cell's top token, coloured by its probability."""
        import plotly.graph_objects as go

        n_pos = int(self.mask[prompt].sum())
        probs = self.top_probs[:, prompt, :n_pos, 0].numpy()  # (layer, pos)
        if self.top_tokens is not None:
            text = [[layer[prompt][p][0] for p in range(n_pos)] for layer in self.top_tokens]
        else:
            text = self.top_ids[:, prompt, :n_pos, 0].tolist()
        inputs = (
            self.token_strs[prompt][:n_pos] if self.token_strs else self.tokens[prompt].tolist()
        )
        x = [f"{p}: {inputs[p]!r}" for p in range(n_pos)]
        fig = go.Figure(
            go.Heatmap(
                z=probs,
                x=x,
                y=list(self.layer_labels),
                text=[[repr(t)[1:-1] if isinstance(t, str) else t for t in row] for row in text],
                texttemplate="%{text}",
                colorscale="Blues",
                zmin=0,
                zmax=1,
                colorbar={"title": "p(top)"},
                hovertemplate="%{y}<br>input %{x}<br>top %{text} p=%{z:.3f}<extra></extra>",
            )
        )
        fig.update_layout(
            title="Logit lens: top next-token prediction by layer",
            xaxis_title="input position (token)",
            yaxis_title="residual stream",
            height=max(400, 22 * len(self.layer_labels) + 150),
            width=max(700, 70 * n_pos + 200),
        )
        return fig

    def plot_target(
        self, target: int = 0, *, prompt: int = 0, position: int = -1, value: str = "rank"
    ) -> Any:
        """A line plot of one tracked token's rank (or ``"prob"``, ``"logit"``) by layer."""
        import plotly.graph_objects as go

        if (
            self.target_ids is None
            or self.target_ranks is None
            or self.target_probs is None
            or self.target_logits is None
        ):
            raise InvalidArgumentError(
                "Expected a lens run with targets=...; this one tracked none."
            )
        series = {"rank": self.target_ranks, "prob": self.target_probs, "logit": self.target_logits}
        check_choice("value", value, series)
        if position < 0:
            position = int(self.mask[prompt].sum()) + position
        y = series[value][:, prompt, position, target].tolist()
        fig = go.Figure(go.Scatter(x=list(self.layer_labels), y=y, mode="lines+markers"))
        fig.update_layout(
            title=f"Logit lens: {value} of token {int(self.target_ids[prompt, position, target])} "
            f"at position {position}",
            xaxis_title="residual stream",
            yaxis_title=value,
            yaxis_type="log" if value == "rank" else None,
        )
        return fig


def _as_targets(model: Model, targets: Any, shape: tuple[int, int]) -> Tensor | None:
    """Targets as ``(batch, pos, n_targets)`` ids."""
    if targets is None:
        return None
    if isinstance(targets, str):
        targets = [targets]
    if isinstance(targets, Sequence) and not isinstance(targets, Tensor):
        targets = [tokenize_answer(model, t) if isinstance(t, str) else int(t) for t in targets]
    t = torch.as_tensor(targets, dtype=torch.long)
    if t.ndim == 0:
        t = t[None]
    if t.ndim == 1:  # the same tokens tracked at every position
        return t.expand(*shape, t.shape[0]).clone()
    if t.ndim == 2 and tuple(t.shape) == shape:  # one target per position
        return t[..., None]
    if t.ndim == 3 and tuple(t.shape[:2]) == shape:
        return t
    raise ShapeError(
        f"Expected targets as token strings, a list of ids, a (batch, pos) = {shape} tensor, or "
        f"(batch, pos, n_targets); got shape {tuple(t.shape)}."
    )


@torch.no_grad()
def logit_lens(
    model: Model,
    tokens: str | Sequence[str] | Int[Tensor, "batch pos"],
    *,
    targets: Any = None,
    top_k: int = 5,
    keep_logits: bool = False,
    prepend_bos: bool | None = None,
    chunk_tokens: int = 512,
) -> LogitLens:
    """Decode the residual stream at every layer and position with the final norm and unembedding.

    Args:
        model: a HookedTransformer.
        tokens: a string, a list of strings (right-padded), or ``(batch, pos)`` token ids.
        targets: tokens to track: strings or ids (tracked at every position), a ``(batch, pos)``
            tensor (one per position, e.g. the next tokens), or ``(batch, pos, n_targets)``.
        top_k: how many top tokens to keep per cell.
        keep_logits: also keep the full ``(layer, batch, pos, d_vocab)`` logits.
        prepend_bos: for string input; None means the model's default.
        chunk_tokens: decode this many (batch x position) cells at a time, bounding the memory
            to ``chunk_tokens x d_vocab`` floats beyond what is kept.

    Returns:
        A :class:`LogitLens`; its last layer entry is the model's own output.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> lens = logit_lens(model, torch.tensor([[1, 2, 3, 4]]), top_k=2)
        >>> lens.top_ids.shape, lens.layer_labels     # (layer, batch, pos, k)
        (torch.Size([3, 1, 4, 2]), ('resid_pre 0', 'resid_pre 1', 'final'))
        >>> [token for token, _ in lens.top(2)] == lens.top_ids[-1, 0, -1].tolist()
        True
    """
    tok, mask = token_batch(model, tokens, prepend_bos)
    device = model.cfg.device
    n_layers = model.cfg.n_layers
    names = [f"blocks.{i}.hook_resid_pre" for i in range(n_layers)]
    names.append(f"blocks.{n_layers - 1}.hook_resid_post")
    _, cache = run_with_cache(model, tok.to(device), names_filter=lambda n: n in names)
    resid = torch.stack([cache[n] for n in names])  # (layer, batch, pos, d_model)
    del cache
    n_layer, n_batch, n_pos, d_model = resid.shape
    target_ids = _as_targets(model, targets, (n_batch, n_pos))
    flat = resid.reshape(n_layer, n_batch * n_pos, d_model)  # (layer, cells, d_model)

    top_ids = torch.empty(n_layer, n_batch * n_pos, top_k, dtype=torch.long)
    top_probs = torch.empty(n_layer, n_batch * n_pos, top_k)
    if target_ids is not None:
        flat_targets = target_ids.reshape(n_batch * n_pos, -1).to(resid.device)
        shape_t = (n_layer, n_batch * n_pos, flat_targets.shape[-1])
        ranks = torch.empty(shape_t, dtype=torch.long)
        t_probs, t_logits = torch.empty(shape_t), torch.empty(shape_t)
    kept = torch.empty(n_layer, n_batch * n_pos, model.cfg.d_vocab) if keep_logits else None

    for layer in range(n_layer):
        for start in range(0, n_batch * n_pos, chunk_tokens):
            cells = slice(start, start + chunk_tokens)
            logits = decode_residual(model, flat[layer, cells]).float()  # (cells, d_vocab)
            logprobs = logits.log_softmax(-1)
            top = logprobs.topk(top_k, dim=-1)
            top_ids[layer, cells] = top.indices.cpu()
            top_probs[layer, cells] = top.values.exp().cpu()
            if target_ids is not None:
                tl = logits.gather(-1, flat_targets[cells])  # (cells, n_targets)
                ranks[layer, cells] = (logits[:, None, :] > tl[:, :, None]).sum(-1).cpu()
                t_logits[layer, cells] = tl.cpu()
                t_probs[layer, cells] = logprobs.gather(-1, flat_targets[cells]).exp().cpu()
            if kept is not None:
                kept[layer, cells] = logits.cpu()

    def grid(x: Tensor) -> Tensor:
        return x.reshape(n_layer, n_batch, n_pos, *x.shape[2:])

    tokenizer = getattr(model, "tokenizer", None)
    token_strs = top_tokens = None
    if tokenizer is not None:
        token_strs = tuple(tuple(tokenizer.decode([t]) for t in row) for row in tok.tolist())
        vocab = {}
        ids = top_ids.reshape(n_layer, n_batch, n_pos, top_k).tolist()

        def dec(t: int) -> str:
            if t not in vocab:
                vocab[t] = tokenizer.decode([t])
            return vocab[t]

        top_tokens = tuple(
            tuple(tuple(tuple(dec(t) for t in cell) for cell in row) for row in layer_ids)
            for layer_ids in ids
        )
    return LogitLens(
        tokens=tok,
        mask=mask,
        layer_labels=tuple(lens_layer_labels(n_layers)),
        top_ids=grid(top_ids),
        top_probs=grid(top_probs),
        target_ids=target_ids,
        target_ranks=grid(ranks) if target_ids is not None else None,
        target_probs=grid(t_probs) if target_ids is not None else None,
        target_logits=grid(t_logits) if target_ids is not None else None,
        logits=grid(kept) if kept is not None else None,
        token_strs=token_strs,
        top_tokens=top_tokens,
    )
