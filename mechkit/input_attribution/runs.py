"""The runs every input-attribution method is made of, batched to a memory budget.

Two kinds of run: the target on many *perturbed* copies of one prompt (some features removed,
by deletion or by replacement with a baseline token: occlusion, LIME, SHAP and the faithfulness
measures), and the target and its gradient on many *embeddings* of one prompt (points on an
integrated-gradients path). Both go through :func:`mechkit.core.each_batch` (a pass that runs
out of memory is split) with rows per pass from ``batch_size`` or the ``memory_budget``.

A *feature* is what is removed together: a token, a span of tokens, or a word. Positions that
are never removed (a leading BOS, padding, the appended tokens of a continuation) are not
features.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mechkit.core.batching import each_batch, parse_budget
from mechkit.core.types import Model
from mechkit.errors import InvalidArgumentError
from mechkit.hook_scope import hook_scope
from mechkit.input_attribution.targets import Target
from mechkit.lens.logit_lens import decode_residual

__all__ = ["PromptRun", "rows_per_pass", "word_starts"]

Removal = Literal["delete", "replace"]


def rows_per_pass(
    model: Model,
    length: int,
    batch_size: int | None,
    memory_budget: int | str | None,
    *,
    backward: bool = False,
) -> int:
    """Sequences of ``length`` tokens per forward pass: ``batch_size`` if given, else as many as
    the memory budget holds by a rough count of a pass's float32 activations (the logits, the
    residual stream and the MLP and attention activations, all layers' when a backward pass
    keeps them).

    Example:
        >>> rows_per_pass(mk.load_model("attn-only-2l"), 10, 4, None)
        4
    """
    if batch_size is not None:
        return batch_size
    cfg = model.cfg
    d_mlp = cfg.d_mlp or 0
    layer = 16 * cfg.d_model + 6 * d_mlp + 4 * cfg.n_heads * length  # generous: 2x a count
    per_row = 4 * length * (cfg.d_vocab * 2 + layer * (cfg.n_layers if backward else 2))
    budget = parse_budget(memory_budget, cfg.device or "cpu")
    return max(1, int(budget // max(1, per_row)))


def word_starts(model: Model, tokens: list[int]) -> list[bool]:
    """Whether each token starts a word: its text starts with a space or a newline, or it (or
    the token before it) is not alphanumeric. Without a tokenizer every token is a word.

    Example:
        >>> word_starts(mk.load_model("attn-only-2l"), [1, 2, 3])
        [True, True, True]
    """
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        return [True] * len(tokens)
    texts = [tokenizer.decode([t]) for t in tokens]
    starts = []
    for k, text in enumerate(texts):
        prev = texts[k - 1] if k else ""
        alnum = any(c.isalnum() for c in text)
        prev_alnum = any(c.isalnum() for c in prev)
        starts.append(k == 0 or text[:1].isspace() or not alnum or not prev_alnum)
    return starts


@dataclasses.dataclass(eq=False)
class PromptRun:
    """One prompt's runs: its tokens, target and features, and the batched passes over them.

    Attributes:
        model, target, i: the model, the resolved target and the prompt's index in it.
        positions: the prompt positions that can be removed (all but a leading BOS).
        groups: the features, each a list of positions (tokens, spans or words).
        removal: ``"delete"`` drops a removed feature's tokens (a prompt with every token
            deleted is ``replacement`` alone), ``"replace"`` puts ``replacement`` in their
            place.
        size: rows per forward pass; ``grad_size`` per pass with a backward pass.
        bar: the progress bar, advanced by one per row run.
        memo: perturbed prompts already run (their token ids) and their target values. Runs
            of the same model, target and prompt may share one within a call that changes
            neither (``mk.compare_input_attributions`` measures every method's faithfulness
            so, and runs each erased prompt once); None: nothing is kept between calls.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> from mechkit.input_attribution.targets import resolve_target
        >>> run = PromptRun.build(model, resolve_target(model, [[1, 2, 3, 4]], 5), 0)
        >>> run.groups, tuple(run.values(torch.ones(1, 4, dtype=torch.bool)).shape)  # (row, step)
        ([[0], [1], [2], [3]], (1, 1))
    """

    model: Model
    target: Target
    i: int
    positions: list[int]
    groups: list[list[int]]
    removal: Removal = "delete"
    replacement: int = 0
    size: int = 64
    grad_size: int = 8
    bar: Any = None
    memo: dict[tuple[int, ...], Tensor] | None = None

    @classmethod
    def build(
        cls,
        model: Model,
        target: Target,
        i: int,
        *,
        unit: str | int = "token",
        skip_bos: int | None = None,
        removal: Removal = "delete",
        replacement: int = 0,
        batch_size: int | None = None,
        memory_budget: int | str | None = None,
        bar: Any = None,
    ) -> PromptRun:
        """The runs of prompt ``i``: features by ``unit`` (``"token"``, ``"word"`` or a span
        length); ``skip_bos``: a token id never removed when it comes first."""
        tokens = target.prompts[i]
        first = 1 if skip_bos is not None and tokens[0] == skip_bos and len(tokens) > 1 else 0
        positions = list(range(first, len(tokens)))
        groups: list[list[int]] = []
        if unit == "token":
            groups = [[p] for p in positions]
        elif unit == "word":
            starts = word_starts(model, tokens)
            for p in positions:
                if not groups or starts[p]:
                    groups.append([])
                groups[-1].append(p)
        elif isinstance(unit, int) and not isinstance(unit, bool) and unit >= 1:
            groups = [positions[k : k + unit] for k in range(0, len(positions), unit)]
        else:
            raise InvalidArgumentError(
                f"Expected unit 'token', 'word' or a span length >= 1; got {unit!r}."
            )
        length = len(tokens) + len(target.appended(i))
        size = rows_per_pass(model, length, batch_size, memory_budget)
        grad_size = rows_per_pass(model, length, batch_size, memory_budget, backward=True)
        return cls(model, target, i, positions, groups, removal, replacement, size, grad_size, bar)

    @property
    def n_features(self) -> int:
        return len(self.groups)

    @property
    def n_steps(self) -> int:
        return self.target.n_steps(self.i)

    def spread(self, feature_scores: Float[Tensor, "... feature"]) -> Float[Tensor, "... pos"]:
        """Feature scores onto prompt positions: each feature's score shared equally by its
        tokens (so scores still add up over a prompt), 0 at positions never removed."""
        n = len(self.target.prompts[self.i])
        out = torch.zeros(*feature_scores.shape[:-1], n, dtype=feature_scores.dtype)
        for f, group in enumerate(self.groups):
            out[..., group] = feature_scores[..., f : f + 1].cpu() / len(group)
        return out

    def keep_mask(self, kept: Bool[Tensor, "row feature"]) -> Bool[Tensor, "row pos"]:
        """Which prompt positions a row keeps, from which features it keeps."""
        n = len(self.target.prompts[self.i])
        mask = torch.ones(kept.shape[0], n, dtype=torch.bool)
        for f, group in enumerate(self.groups):
            mask[:, group] = kept[:, f : f + 1].cpu()
        return mask

    def values(self, kept: Bool[Tensor, "row feature"]) -> Float[Tensor, "row step"]:
        """The target on the prompt with only the ``kept`` features of each row (no gradient)."""
        return self.values_of_positions(self.keep_mask(kept))

    def values_of_positions(self, keep: Bool[Tensor, "row pos"]) -> Float[Tensor, "row step"]:
        """The target with only the prompt positions ``keep`` of each row (True: kept).

        Identical perturbed prompts run once (and not at all when ``memo`` holds them), and the
        distinct ones run longest first, so each pass is padded only to its own longest row
        (the rows of LIME and KernelSHAP vary in length by the features they delete)."""
        tokens = self.target.prompts[self.i]
        tail = self.target.appended(self.i)
        distinct: dict[tuple[int, ...], int] = {}
        index: list[int] = []
        for row in keep.tolist():
            if self.removal == "delete":
                kept = [t for t, k in zip(tokens, row, strict=True) if k]
                kept = kept or [self.replacement]  # nothing left: the baseline token alone
            else:
                kept = [t if k else self.replacement for t, k in zip(tokens, row, strict=True)]
            index.append(distinct.setdefault(tuple(kept + tail), len(distinct)))
        rows = list(distinct)
        memo = {} if self.memo is None else self.memo
        todo = [k for k, row in enumerate(rows) if row not in memo]
        order = sorted(todo, key=lambda k: -len(rows[k]))  # longest first
        device = self.model.cfg.device
        values = torch.zeros(len(rows), self.n_steps)

        def work(part: slice) -> None:
            chosen = [rows[k] for k in order[part]]
            ends = torch.tensor([len(r) - len(tail) for r in chosen])
            batch = torch.zeros(len(chosen), len(chosen[0]), dtype=torch.long)
            for k, r in enumerate(chosen):
                batch[k, : len(r)] = torch.tensor(r)  # right padding: real positions unchanged
            with torch.no_grad():
                value = self.target_values(batch.to(device), ends)
            values[order[part]] = value.cpu()
            if self.bar is not None:
                self.bar.update(part.stop - part.start)

        each_batch(len(order), self.size, work)
        for k, row in enumerate(rows):
            if row in memo:
                values[k] = memo[row]
        for k in todo:
            memo[rows[k]] = values[k].clone()
        return values[index]

    def target_values(self, tokens: Tensor, ends: Int[Tensor, " row"]) -> Tensor:
        """The target ``(row, step)`` of rows of ``tokens`` whose prompt part has ``ends``
        tokens. The blocks run on every position; the final norm and the unembedding only on
        the positions the target reads (``ends - 1 + s`` for step ``s``): on SmolLM2 the
        unembedding is a quarter of a forward pass."""
        model = self.model
        resid = model(tokens, stop_at_layer=model.cfg.n_layers)  # (row, pos, d_model)
        steps = torch.arange(self.n_steps, device=resid.device)
        at = (ends.to(resid.device) - 1)[:, None] + steps  # (row, step)
        picked = resid.gather(1, at[..., None].expand(-1, -1, resid.shape[-1]))
        logits = decode_residual(model, picked)  # (row, step, d_vocab)
        first = torch.ones(len(ends), dtype=torch.long)  # step s sits at position s
        return self.target.values(self.i, logits, first)

    # ------------------------------------------------------------------------------ gradients

    def tokens_tensor(self) -> Tensor:
        """The prompt and its appended tokens, ``(1, pos)``, on the model's device."""
        ids = self.target.prompts[self.i] + self.target.appended(self.i)
        return torch.tensor([ids], device=self.model.cfg.device)

    def embeddings(self, tokens: Tensor | None = None) -> Float[Tensor, "pos d_model"]:
        """The token embeddings (``hook_embed``) of the prompt and its appended tokens."""
        tokens = self.tokens_tensor() if tokens is None else tokens
        with torch.no_grad():
            return self.model.embed(tokens)[0].detach()

    def embedding_values(self, embeds: Float[Tensor, "row pos d_model"]) -> Tensor:
        """The target ``(row, step)`` with the token embeddings replaced by ``embeds`` (no
        gradient)."""
        tokens = self.tokens_tensor()
        n_prompt = len(self.target.prompts[self.i])
        out: list[Tensor] = []

        def work(part: slice) -> None:
            chunk = embeds[part]

            def put(act: Tensor, hook: Any) -> Tensor:
                return chunk

            with torch.no_grad(), hook_scope(self.model, fwd_hooks=[("hook_embed", put)]):
                ends = torch.full((chunk.shape[0],), n_prompt)
                out.append(self.target_values(tokens.expand(chunk.shape[0], -1), ends).cpu())
            if self.bar is not None:
                self.bar.update(part.stop - part.start)

        each_batch(embeds.shape[0], self.size, work)
        return torch.cat(out)

    def gradients(
        self,
        embeds: Float[Tensor, "row pos d_model"],
        steps: bool,
        on_batch: Callable[[slice, Tensor, Tensor], None],
    ) -> None:
        """Forward passes with the token embeddings replaced by ``embeds`` (every row), and the
        gradient of the target at them: ``on_batch(rows, values (row, step), grads)`` with
        ``grads`` of shape ``(row, step + 1, pos, d_model)``: the total's gradient first, then
        each step's when ``steps`` (and there is more than one step)."""
        tokens = self.tokens_tensor()
        n_prompt = len(self.target.prompts[self.i])
        n_steps = self.n_steps
        each_step = steps and n_steps > 1

        def work(part: slice) -> None:
            chunk = embeds[part].detach().clone().requires_grad_(True)

            def put(act: Tensor, hook: Any) -> Tensor:
                return chunk

            rows = chunk.shape[0]
            with torch.enable_grad(), hook_scope(self.model, fwd_hooks=[("hook_embed", put)]):
                ends = torch.full((rows,), n_prompt)
                value = self.target_values(tokens.expand(rows, -1), ends)  # (row, step)
                outputs = [value.sum()]
                if each_step:
                    outputs += [value[:, s].sum() for s in range(n_steps)]
                grads = [
                    torch.autograd.grad(o, chunk, retain_graph=k < len(outputs) - 1)[0]
                    for k, o in enumerate(outputs)
                ]
            on_batch(part, value.detach().cpu(), torch.stack(grads, 1).detach())
            if self.bar is not None:
                self.bar.update(rows)

        each_batch(embeds.shape[0], self.grad_size, work)
