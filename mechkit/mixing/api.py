"""``mk.context_mixing``: one entry point for every registered context-mixing method."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from mechkit.core.batching import each_batch, parse_budget
from mechkit.core.labels import model_name
from mechkit.core.types import Model
from mechkit.errors import InvalidArgumentError, ShapeError, check_batch_size, check_choice
from mechkit.mixing.blocks import check_decoder
from mechkit.mixing.registry import METHODS, LayerMaps, MixingRun
from mechkit.mixing.result import ContextMixing
from mechkit.tokens import token_batch, tokenize_answer

__all__ = ["context_mixing", "answer_ids"]

LONG = 64
"""Inputs from this many tokens on show a progress bar (shorter ones finish at once)."""


def answer_ids(model: Model, answer: Any, n_batch: int) -> Int[Tensor, " batch"] | None:
    """``(batch,)`` token ids from one answer or one per prompt (strings or ids); None stays None.

    Example:
        >>> answer_ids(mk.load_model("attn-only-2l"), 5, 2).tolist()
        [5, 5]
    """
    if answer is None:
        return None
    items = [answer] if isinstance(answer, str | int) else list(answer)
    ids = torch.tensor([tokenize_answer(model, a) if isinstance(a, str) else int(a) for a in items])
    if ids.numel() == 1:
        ids = ids.expand(n_batch)
    if ids.shape != (n_batch,):
        raise ShapeError(f"Expected one answer, or one per prompt ({n_batch}); got {ids.numel()}.")
    if bool(((ids < 0) | (ids >= model.cfg.d_vocab)).any()):
        raise InvalidArgumentError(
            f"Expected answer ids in [0, {model.cfg.d_vocab}); got {ids.tolist()}."
        )
    return ids


def _kept_layers(model: Model, layers: int | Sequence[int] | None) -> tuple[int, ...] | None:
    if layers is None:
        return None
    wanted = [layers] if isinstance(layers, int) else list(layers)
    n = model.cfg.n_layers
    out = []
    for layer in wanted:
        if isinstance(layer, bool) or not isinstance(layer, int) or not -n <= layer < n:
            raise InvalidArgumentError(
                f"Expected layers in [0, {n}) (negative counts from the end); got {layer!r}. "
                "Hint: layers=None keeps all of them."
            )
        out.append(layer % n)
    return tuple(out)


def _queries(mask: Tensor, positions: int | Sequence[int] | None) -> tuple[int, ...] | None:
    if positions is None:
        return None
    wanted = [positions] if isinstance(positions, int) else list(positions)
    shortest = int(mask.sum(-1).min())
    out = []
    for pos in wanted:
        if isinstance(pos, bool) or not isinstance(pos, int) or not -shortest <= pos < shortest:
            raise ShapeError(
                f"Expected positions inside every prompt (the shortest has {shortest} tokens: "
                f"-{shortest} to {shortest - 1}); got {pos!r}. Hint: -1 is the last token."
            )
        out.append(pos % shortest if pos < 0 else pos)
    return tuple(sorted(set(out)))


@torch.no_grad()
def context_mixing(
    model: Model,
    tokens: Any,
    *,
    method: str = "rollout",
    head: int | None = None,
    layers: int | Sequence[int] | None = None,
    positions: int | Sequence[int] | None = None,
    answer: Any = None,
    wrong: Any = None,
    prepend_bos: bool | None = None,
    batch_size: int | None = None,
    memory_budget: int | str | None = None,
    progress: bool = True,
) -> ContextMixing:
    """How much each earlier token contributes to each position, at every layer.

    Methods (see each module for the derivation and the paper): ``"attention"`` (raw weights,
    mean over heads or one ``head``), ``"rollout"`` and ``"flow"`` (Abnar & Zuidema 2020),
    ``"attention_norm"`` (Kobayashi et al. 2020/2021), ``"globenc"`` (Modarressi et al. 2022),
    ``"alti"`` (Ferrando et al. 2022), ``"alti_logit"`` (Ferrando et al. 2023),
    ``"value_zeroing"`` (Mohebbi et al. 2023), ``"decompx"`` (Modarressi et al. 2023) and
    ``"decompx_logit"`` (its logit shares alone, by one backward pass per query: fast).

    Args:
        model: a HookedTransformer (LayerNorm or RMSNorm, rotary or learned positions, grouped-
            query attention, gated or plain MLPs).
        tokens: a string, strings (right-padded), ``(batch, pos)`` ids or a PromptPairs.
        method: one of :data:`~mechkit.mixing.METHODS`.
        head: for ``"attention"``, ``"rollout"`` and ``"flow"``: one head instead of the mean.
        layers: which layers' maps to keep (None: all, stored in float16 to save memory).
        positions: the query positions to keep (None: all). Flow and ``"decompx_logit"``
            compute only these.
        answer, wrong: the target logit (difference) of ``"alti_logit"`` and the DecompX methods:
            a token string or id, or one per prompt; None: the model's top prediction at each
            prompt's last token.
        prepend_bos: for string input; None means the model's default.
        batch_size: prompts per pass (None: all); value zeroing: zeroed copies per pass.
        memory_budget: bytes (or ``"2GB"``) a chunk of work may take (None: 2 GiB on CPU).
        progress: a progress bar on long loops (inputs of 64 tokens or more).

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> mix = context_mixing(model, torch.tensor([[1, 2, 3, 4]]), method="rollout")
        >>> mix.maps.shape, mix.maps.dtype          # (layer, batch, query, key), all layers
        (torch.Size([2, 1, 4, 4]), torch.float16)
        >>> [round(float(x), 3) for x in mix.aggregated[0].sum(-1)]  # each row sums to 1
        [1.0, 1.0, 1.0, 1.0]
    """
    check_choice("method", method, list(METHODS))
    check_decoder(model, method)
    check_batch_size(batch_size)
    budget = parse_budget(memory_budget, model.cfg.device or "cpu")
    tok, mask = token_batch(model, tokens, prepend_bos)
    kept = _kept_layers(model, layers)
    queries = _queries(mask, positions)
    if head is not None and (
        isinstance(head, bool)
        or not isinstance(head, int)
        or not -model.cfg.n_heads <= head < model.cfg.n_heads
    ):
        raise InvalidArgumentError(
            f"Expected head in [0, {model.cfg.n_heads}) or None (the mean); got {head!r}."
        )
    if head is not None and method not in ("attention", "rollout", "flow"):
        raise InvalidArgumentError(
            f"Expected head=None for method={method!r}: one head is read only by 'attention', "
            "'rollout' and 'flow'. Hint: the norm-based methods already weigh every head."
        )
    n_batch = tok.shape[0]
    ans = answer_ids(model, answer, n_batch)
    wro = answer_ids(model, wrong, n_batch)
    device = model.cfg.device
    function = METHODS[method]
    parts: list[LayerMaps] = []
    per_prompt = method in ("flow", "value_zeroing")  # their own loops are over one prompt

    def work(rows: slice) -> None:
        run = MixingRun(
            tokens=tok[rows].to(device),
            mask=mask[rows].to(device),
            head=None if head is None else head % model.cfg.n_heads,
            answer=None if ans is None else ans[rows].to(device),
            wrong=None if wro is None else wro[rows].to(device),
            queries=queries,
            memory_budget=budget,
            progress=progress and tok.shape[1] >= LONG,
            batch_size=batch_size,
        )
        parts.append(function(model, run))

    each_batch(n_batch, 1 if per_prompt else batch_size, work)
    first = parts[0]
    maps = torch.cat([p.maps.float().cpu() for p in parts], dim=1)
    aggregated = torch.cat([p.aggregated.float().cpu() for p in parts])
    logit = logit_rest = None
    if first.logit is not None:
        logit = torch.cat([p.logit.float().cpu() for p in parts if p.logit is not None])
        logit_rest = torch.cat(
            [p.logit_rest.float().cpu() for p in parts if p.logit_rest is not None]
        )
    rows_kept = list(queries) if queries is not None else list(range(tok.shape[1]))
    layer_index = list(range(len(first.layers)))
    if kept is not None:
        missing = [layer for layer in kept if layer not in first.layers]
        if missing:
            raise InvalidArgumentError(
                f"Expected layers this method keeps {list(first.layers)}; got {missing}. "
                f"Hint: {method} keeps only those."
            )
        layer_index = [first.layers.index(layer) for layer in kept]
    maps = maps[layer_index][:, :, rows_kept]
    if kept is None:
        maps = maps.half()  # every layer: (layer, batch, query, key) in half the memory
    mask_cpu = mask.cpu()
    if model.tokenizer is not None:
        str_tokens = tuple(
            tuple(str(t) for t in model.to_str_tokens(row[m]))
            for row, m in zip(tok, mask_cpu, strict=True)
        )
    else:
        str_tokens = tuple(
            tuple(str(t) for t in row[m].tolist()) for row, m in zip(tok, mask_cpu, strict=True)
        )
    return ContextMixing(
        method=method,
        maps=maps,
        layers=tuple(first.layers[i] for i in layer_index),
        aggregated=aggregated[:, rows_kept],
        aggregation=first.aggregation,
        cumulative=first.cumulative,
        queries=tuple(rows_kept),
        tokens=tok.cpu(),
        mask=mask_cpu,
        str_tokens=str_tokens,
        logit=None if logit is None else logit[:, rows_kept],
        logit_rest=None if logit_rest is None else logit_rest[:, rows_kept],
        model=model_name(model),
    )
