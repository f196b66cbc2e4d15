"""Interchange interventions on a subspace of one site: the operation under DAS and its checks.

The base run's activation ``h`` at one token gets the source run's coordinates ``s`` in the
subspace spanned by the orthonormal rows of ``B``: ``h' = h + (s - h) B^T B`` (Geiger et al.
2023). With ``B = I`` this is activation patching of the whole activation; with ``k = 0`` rows
it changes nothing.

Example:
    >>> model = mk.load_model("attn-only-2l")
    >>> base, source = [[1, 2, 3]] * 4, [[4, 5, 6]] * 4
    >>> hook = "blocks.1.hook_resid_pre"
    >>> logits = interchange(model, base, source, torch.eye(128), hook_name=hook)
    >>> logits.shape                                                        # (batch, d_vocab)
    torch.Size([4, 500])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from mechkit.core.batching import each_batch
from mechkit.core.types import Model
from mechkit.errors import (
    EmptyDatasetError,
    PromptLengthError,
    ShapeError,
    SiteNotFoundError,
    did_you_mean,
)
from mechkit.hook_scope import hook_scope, run_with_cache
from mechkit.probing.datasets import prompts_per_forward
from mechkit.tokens import encode, pad_right, tokenize_answer

__all__ = ["interchange", "site_activations", "subspace_iia"]

Prompt = str | Sequence[int]


def prompt_rows(model: Model, prompts: Sequence[Prompt], what: str) -> list[list[int]]:
    if isinstance(prompts, str):
        raise ShapeError(f"Expected {what} to be a list of prompts; got the string {prompts!r}.")
    rows = [encode(model, p) if isinstance(p, str) else [int(i) for i in p] for p in prompts]
    if not rows:
        raise EmptyDatasetError(f"Expected at least one prompt in {what}; got none.")
    return rows


def pad_id(model: Model) -> int:
    tokenizer = getattr(model, "tokenizer", None)
    return 0 if tokenizer is None or tokenizer.pad_token_id is None else tokenizer.pad_token_id


def token_index(rows: list[list[int]], position: int) -> Tensor:
    out = []
    for row in rows:
        i = len(row) + position if position < 0 else position
        if not 0 <= i < len(row):
            raise PromptLengthError(
                f"Expected position {position} inside every prompt; one has {len(row)} tokens. "
                f"Hint: positions index the model's tokens, in [{-len(row)}, {len(row)})."
            )
        out.append(i)
    return torch.tensor(out)


def check_hook(model: Model, hook_name: str) -> None:
    if hook_name not in model.hook_dict:
        raise SiteNotFoundError(
            f"Expected a hook of the model; got {hook_name!r}."
            f"{did_you_mean(hook_name, model.hook_dict) or ' Hint: see model.hook_dict.'}"
        )


def site_activations(
    model: Model,
    prompts: Sequence[Prompt],
    *,
    hook_name: str,
    position: int = -1,
    batch_size: int | None = None,
    memory_budget: int | str | None = None,
) -> Float[Tensor, "batch d"]:
    """Each prompt's activation at ``hook_name`` and one token (flattened to ``(batch, d)``),
    ``batch_size`` prompts per forward pass (None: as many as ``memory_budget`` holds, 2 GiB
    on CPU by default).

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> site_activations(model, [[1, 2], [3, 4, 5]], hook_name="blocks.0.hook_resid_post").shape
        torch.Size([2, 128])
    """
    check_hook(model, hook_name)
    rows = prompt_rows(model, prompts, "prompts")
    index = token_index(rows, position)
    device = next(model.parameters()).device
    out: list[Tensor] = []

    def read(chunk: slice) -> None:
        tokens, _ = pad_right(rows[chunk], pad_id(model))
        with torch.no_grad():
            _, cache = run_with_cache(model, tokens.to(device), names_filter=hook_name)
        act = cache[hook_name]
        act = act.reshape(act.shape[0], act.shape[1], -1)  # (batch, pos, d)
        out.append(act[torch.arange(act.shape[0]), index[chunk].to(act.device)].float().cpu())

    each_batch(len(rows), prompts_per_forward(model, rows, batch_size, memory_budget), read)
    return torch.cat(out)


def forward_swapped(
    model: Model,
    rows: list[list[int]],
    index: Tensor,
    sources: Tensor,
    edit: Any,
    hook_name: str,
) -> Tensor:
    """Logits ``(batch, d_vocab)`` at each base's last token, the base's activation at
    ``index`` replaced by ``edit(h, s)`` (with gradients if the caller wants them)."""
    tokens, mask = pad_right(rows, pad_id(model))
    device = next(model.parameters()).device
    last = mask.sum(-1) - 1

    def hook(act: Tensor, hook: Any) -> Tensor:
        shape = act.shape
        flat = act.reshape(shape[0], shape[1], -1)  # (batch, pos, d)
        ar = torch.arange(shape[0], device=act.device)
        h = flat[ar, index.to(act.device)]
        new = edit(h.float(), sources.to(act.device)).to(act.dtype)
        flat = flat.clone()
        flat[ar, index.to(act.device)] = new
        return flat.reshape(shape)

    with hook_scope(model, fwd_hooks=[(hook_name, hook)]):
        logits = model(tokens.to(device))
    return logits[torch.arange(len(rows), device=logits.device), last.to(logits.device)]


def subspace_edit(basis: Tensor) -> Any:
    def edit(h: Tensor, s: Tensor) -> Tensor:
        b = basis.to(h.device, h.dtype)  # (k, d)
        return h + ((s - h) @ b.T) @ b

    return edit


def interchange(
    model: Model,
    base: Sequence[Prompt],
    source: Sequence[Prompt],
    basis: Float[Tensor, "k d"],
    *,
    hook_name: str,
    position: int = -1,
    batch_size: int | None = None,
    memory_budget: int | str | None = None,
) -> Float[Tensor, "batch d_vocab"]:
    """The interchange intervention on the subspace spanned by ``basis``'s (orthonormal) rows:
    each base run's activation at ``hook_name`` and ``position`` gets the source run's
    coordinates in that subspace (``h + (s - h) B^T B``). Returns the logits at each base's
    last token. ``k = 0`` is the unchanged base run; ``basis = I`` patches the whole activation.
    ``batch_size`` pairs per forward pass (None: as many as ``memory_budget`` holds, 2 GiB on
    CPU by default).

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> out = interchange(model, [[1, 2, 3]], [[4, 5, 6]], torch.zeros(0, 128),
        ...                   hook_name="blocks.0.hook_resid_post")
        >>> torch.allclose(out, model(torch.tensor([[1, 2, 3]]))[:, -1], atol=1e-5)
        True
    """
    check_hook(model, hook_name)
    base_rows, source_rows = prompt_rows(model, base, "base"), prompt_rows(model, source, "source")
    if len(base_rows) != len(source_rows):
        raise ShapeError(
            f"Expected one source per base prompt; got {len(base_rows)} bases and "
            f"{len(source_rows)} sources."
        )
    sources = site_activations(
        model, source, hook_name=hook_name, position=position, batch_size=batch_size,
        memory_budget=memory_budget,
    )  # fmt: skip
    basis = torch.as_tensor(basis).float()
    if basis.ndim != 2 or basis.shape[1] != sources.shape[1]:
        raise ShapeError(
            f"Expected a basis of shape (k, {sources.shape[1]}); got {tuple(basis.shape)}."
        )
    index = token_index(base_rows, position)
    out: list[Tensor] = []

    def work(chunk: slice) -> None:
        with torch.no_grad():
            logits = forward_swapped(
                model, base_rows[chunk], index[chunk], sources[chunk], subspace_edit(basis),
                hook_name,
            )  # fmt: skip
        out.append(logits.float().cpu())

    size = prompts_per_forward(model, base_rows, batch_size, memory_budget)
    each_batch(len(base_rows), size, work)
    return torch.cat(out)


def label_ids(model: Model, labels: Sequence[Any], n: int) -> Tensor:
    if len(labels) != n:
        raise ShapeError(
            f"Expected one counterfactual label per pair ({n}); got {len(labels)}. Hint: the "
            "high-level model gives each (base, source) pair the label the intervened run "
            "should output."
        )
    return torch.tensor(
        [tokenize_answer(model, v) if isinstance(v, str) else int(v) for v in labels]
    )


def choice_accuracy(logits: Tensor, labels: Tensor, choices: Tensor | None) -> float:
    if choices is None:
        return float((logits.argmax(-1) == labels).double().mean())
    picked = logits.gather(-1, choices)  # (batch, n_choices)
    chosen = choices.gather(-1, picked.argmax(-1, keepdim=True))[:, 0]
    return float((chosen == labels).double().mean())


def eval_subspace(
    model: Model,
    base_rows: list[list[int]],
    index: Tensor,
    sources: Tensor,
    basis: Tensor,
    hook_name: str,
    rows: list[int],
    size: int,
) -> Tensor:
    out: list[Tensor] = []

    def work(chunk: slice) -> None:
        picked = rows[chunk]
        with torch.no_grad():
            logits = forward_swapped(
                model, [base_rows[i] for i in picked], index[picked], sources[picked],
                subspace_edit(basis), hook_name,
            )  # fmt: skip
        out.append(logits.float().cpu())

    each_batch(len(rows), size, work)
    return torch.cat(out)


def subspace_iia(
    model: Model,
    base: Sequence[Prompt],
    source: Sequence[Prompt],
    labels: Sequence[str | int],
    basis: Float[Tensor, "k d"],
    *,
    hook_name: str,
    position: int = -1,
    choices: Tensor | None = None,
    memory_budget: int | str | None = None,
) -> float:
    """IIA of the interchange on ``basis``'s span: the share of pairs whose intervened run
    gives its label (among ``choices`` when given); forward passes as large as
    ``memory_budget`` holds (2 GiB on CPU by default).

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> src = [[4, 5, 6], [7, 8, 9]]
        >>> labels = model(torch.tensor(src)).argmax(-1)[:, -1].tolist()
        >>> subspace_iia(model, [[1, 2, 3]] * 2, src, labels, torch.eye(128),
        ...              hook_name="blocks.1.hook_resid_post")     # the whole last state
        1.0
    """
    logits = interchange(model, base, source, basis, hook_name=hook_name, position=position,
                         memory_budget=memory_budget)  # fmt: skip
    y = label_ids(model, labels, len(logits))
    return choice_accuracy(logits, y, choices)
