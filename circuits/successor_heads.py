"""Successor heads (Gould et al. 2023, "Successor Heads: Recurring, Interpretable Attention Heads
In The Wild").

A successor head is an attention head whose OV circuit maps a token of an ordinal sequence to its
successor: read "Monday" and write "Tuesday", "3" to "4", "March" to "April". Gould et al. find
one in every model they look at and show that it increments in natural text. This module follows
their method on any model mechkit loads, with mechkit's public API only:

1. the succession dataset: ordinal sequences (numbers, number words, ordinal words, days, months,
   letters), each in every spelling (leading space or not, lower or capitalised) the model's
   tokenizer writes as one token per item, cut at the first item that is not one token;
2. the **succession score** of every head (their sec. 3.1): a token ``t`` is read through its
   effective embedding ``x_t = W_E[t] + MLP0(W_E[t])`` (the residual after block 0 with its
   attention left out); the head's OV circuit maps it to logits ``x_t W_V W_O W_U``; the score
   is the fraction of items ``t`` (the last of each sequence left out) whose successor has the
   largest logit among **all the tokens of the dataset**. ``mk.detect_heads(model,
   "successor")`` scores the same circuit against the items of ``t``'s own sequence only; both
   are reported, and must rank the heads alike;
3. the effect of mean-ablating the top successor heads on incrementation prompts, lists whose
   next item is not in the prompt ("Monday, Tuesday, Wednesday," -> " Thursday"), beside
   ablating as many random heads;
4. the paper's **mod-10 structure** (their sec. 3.2: SAE features of numeric tokens' effective
   embeddings that fire on tokens sharing an index mod 10, "3", "third", "thirteen", "March"):
   tested here with linear probes on the effective embeddings, trained on items with index 1-10
   of every sequence and tested on the items with index 11-20 ("eleven", "November", "k"...)
   against the index mod 10. SmolLM2's tokenizer writes numbers digit by digit, so its only
   two-digit items are words and letters; the report states what the probe finds, including
   nothing.

    python -m circuits.successor_heads --model smollm2-135m --out reports/successor_heads
    python -m circuits.successor_heads --model gemma3-270m --out reports/successor_heads_gemma3

GPT-2 small's published successor head (``PAPER_GPT2``) is kept as data.
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import json
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

import mechkit as mk
from mechkit.core import head_name, parse_node

__all__ = [
    "ORDINAL_SEQUENCES",
    "PAPER_GPT2",
    "SuccessionDataset",
    "SuccessorReport",
    "succession_dataset",
    "effective_embeddings",
    "succession_scores",
    "reproduce",
]

# ----------------------------------------------------------------------------------- data


def _items(text: str) -> tuple[str, ...]:
    return tuple(text.split())


ORDINAL_SEQUENCES: dict[str, tuple[str, ...]] = {
    "numbers": tuple(str(i) for i in range(1, 21)),
    "number words": _items(
        "one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen twenty"
    ),
    "ordinals": _items(
        "first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth "
        "thirteenth fourteenth fifteenth sixteenth seventeenth eighteenth nineteenth twentieth"
    ),
    "days": _items("monday tuesday wednesday thursday friday saturday sunday"),
    "months": _items(
        "january february march april may june july august september october november december"
    ),
    "letters": tuple("abcdefghijklmnopqrstuvwxyz"),
}
# what the incrementation prompt calls an item of each sequence
_KIND_WORD = {
    "numbers": "number",
    "number words": "number",
    "ordinals": "place",
    "days": "day",
    "months": "month",
    "letters": "letter",
}
_MIN_SEQUENCE = 3

# Gould et al. 2023 on GPT-2 small ("layer.head"): the successor head they study throughout.
PAPER_GPT2: dict[str, Any] = {"model": "gpt2", "successor_heads": ["9.1"]}


@dataclasses.dataclass(frozen=True)
class SuccessionDataset:
    """Ordinal sequences as token ids, one row per (sequence, spelling).

    Attributes:
        names: the sequence each row spells (``"days"``).
        spellings: ``"lower"``, ``" lower"``, ``"Capital"`` or ``" Capital"``.
        words: the items as text.
        ids: the items' token ids.
    """

    names: tuple[str, ...]
    spellings: tuple[str, ...]
    words: tuple[tuple[str, ...], ...]
    ids: tuple[tuple[int, ...], ...]

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def from_ids(cls, sequences: Sequence[Sequence[int]]) -> SuccessionDataset:
        """A dataset of ordinal sequences given as token ids (for a model without a tokenizer,
        or sequences of your own).

        Example:
            >>> data = SuccessionDataset.from_ids([[3, 4, 5, 6], [10, 11, 12]])
            >>> len(data), data.n_items, data.names
            (2, 7, ('sequence 0', 'sequence 1'))
        """
        rows = tuple(tuple(int(t) for t in row) for row in sequences)
        if any(len(row) < 2 for row in rows):
            raise mk.ShapeError(
                f"Expected ordinal sequences of at least 2 token ids; got lengths "
                f"{[len(row) for row in rows]}."
            )
        names = tuple(f"sequence {i}" for i in range(len(rows)))
        words = tuple(tuple(str(t) for t in row) for row in rows)
        return cls(names, ("ids",) * len(rows), words, rows)

    @property
    def n_items(self) -> int:
        return sum(len(row) for row in self.ids)


def succession_dataset(model: Any) -> SuccessionDataset:
    """Every spelling of :data:`ORDINAL_SEQUENCES` that ``model``'s tokenizer writes one token
    per item (cut at the first item that is not; kept from 3 items up).

    Raises:
        InvalidArgumentError: the model has no tokenizer (use
            :meth:`SuccessionDataset.from_ids`).

    Example:
        >>> succession_dataset(mk.load_model("attn-only-2l"))   # a toy without a tokenizer
        Traceback (most recent call last):
        ...
        mechkit.errors.InvalidArgumentError: Expected a model with a tokenizer ...
    """
    if model.tokenizer is None:
        raise mk.InvalidArgumentError(
            "Expected a model with a tokenizer to spell the ordinal sequences; this one has "
            "none. Hint: SuccessionDataset.from_ids([[id_1, id_2, ...], ...])."
        )
    names, spellings, words, ids = [], [], [], []
    for name, sequence in ORDINAL_SEQUENCES.items():
        for prefix in ("", " "):
            for label, spell in (("lower", str.lower), ("Capital", str.capitalize)):
                row_words: list[str] = []
                row_ids: list[int] = []
                for word in sequence:
                    text = prefix + spell(word)
                    piece = model.to_tokens(text, prepend_bos=False)[0].tolist()
                    if len(piece) != 1:
                        break
                    row_words.append(text)
                    row_ids.append(int(piece[0]))
                if len(row_ids) >= _MIN_SEQUENCE and tuple(row_ids) not in ids:
                    names.append(name)
                    spellings.append(prefix + label)
                    words.append(tuple(row_words))
                    ids.append(tuple(row_ids))
    return SuccessionDataset(tuple(names), tuple(spellings), tuple(words), tuple(ids))


# ----------------------------------------------------------------------------------- scores


@torch.no_grad()
def effective_embeddings(model: Any, ids: Int[Tensor, " n"]) -> Float[Tensor, "n d_model"]:
    """Gould et al.'s effective embedding: the residual after block 0 with its attention left
    out, ``W_E[t] + MLP0(norm(W_E[t]))`` (``W_E[t]`` in attention-only models).

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> tuple(effective_embeddings(model, torch.tensor([3, 4])).shape)
        (2, 128)
    """
    x = model.embed(ids[None].to(model.cfg.device))  # (1, n, d_model)
    if not model.cfg.attn_only:
        block = model.blocks[0]
        out = block.mlp(block.ln2(x))
        if getattr(model.cfg, "use_normalization_before_and_after", False):
            out = block.ln2_post(out)  # Gemma normalizes the MLP's output before adding it
        x = x + out
    return x[0].float()


@torch.no_grad()
def ov_logits(
    model: Any, layer: int, ids: Int[Tensor, " n"], columns: Int[Tensor, " u"]
) -> Float[Tensor, "head n u"]:
    """Every head of ``layer``'s OV circuit on the effective embeddings of ``ids``, read at the
    unembedding columns ``columns``: ``norm(x_t) W_V W_O W_U`` (no biases, the final norm's
    linear part only: a positive scale changes no ranking).

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> tuple(ov_logits(model, 1, torch.tensor([3, 4]), torch.arange(10)).shape)
        (4, 2, 10)
    """
    block = model.blocks[layer]
    x = block.ln1(effective_embeddings(model, ids)[None])[0]  # (n, d_model)
    out = torch.einsum("nm,hmd,hde->hne", x, block.attn.W_V.float(), block.attn.W_O.float())
    # Gemma's norm of the attention output: its weights (its positive scale changes no ranking)
    post = getattr(getattr(block, "ln1_post", None), "w", None)
    if getattr(model.cfg, "use_normalization_before_and_after", False) and post is not None:
        out = out * post.float()
    if model.cfg.normalization_type in ("LN", "LNPre"):
        out = out - out.mean(-1, keepdim=True)  # the final LayerNorm's centring
    weight = getattr(getattr(model, "ln_final", None), "w", None)
    if isinstance(weight, Tensor):
        out = out * weight.float()
    return out @ model.W_U[:, columns.to(model.cfg.device)].float()  # (head, n, u)


@torch.no_grad()
def succession_scores(
    model: Any,
    data: SuccessionDataset,
    *,
    within_sequence: bool = False,
    any_spelling: bool = False,
) -> Float[Tensor, "layer head"]:
    """Each head's succession score (module docstring): the fraction of items whose successor
    has the largest OV logit among every token of the dataset (``within_sequence``: among the
    items of the item's own sequence, the score of ``detect_heads(model, "successor")``;
    ``any_spelling``: the top token counts when it is the successor in any spelling, " Tuesday"
    for "Monday").

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> data = SuccessionDataset.from_ids([[3, 4, 5, 6], [10, 11, 12]])
        >>> scores = succession_scores(model, data)
        >>> tuple(scores.shape), bool(((scores >= 0) & (scores <= 1)).all())
        ((2, 4), True)
    """
    items = [(row, i) for row, ids in enumerate(data.ids) for i in range(len(ids) - 1)]
    if not items:
        raise mk.EmptyDatasetError("Expected ordinal sequences; the dataset has none.")
    ids = torch.tensor([data.ids[row][i] for row, i in items])
    successors = torch.tensor([data.ids[row][i + 1] for row, i in items])
    candidates = torch.tensor(sorted({t for row in data.ids for t in row}))
    target = torch.searchsorted(candidates, successors)  # (n,) the successor's column
    allowed = torch.ones(len(items), len(candidates), dtype=torch.bool)
    if within_sequence:
        for k, (row, _) in enumerate(items):
            allowed[k] = torch.isin(candidates, torch.tensor(data.ids[row]))
    others = allowed.clone()
    others[torch.arange(len(items)), target] = False
    # any spelling: (item, column) is a hit when the column's token is the item's successor
    # in some spelling of the same sequence
    hit = torch.zeros(len(items), len(candidates), dtype=torch.bool)
    hit[torch.arange(len(items)), target] = True
    if any_spelling:
        column_of = {int(t): c for c, t in enumerate(candidates.tolist())}
        next_of = {}  # (sequence name, index) -> columns
        for row, ids_row in enumerate(data.ids):
            for i, t in enumerate(ids_row):
                next_of.setdefault((data.names[row], i), set()).add(column_of[t])
        for k, (row, i) in enumerate(items):
            hit[k, list(next_of[(data.names[row], i + 1)])] = True
    out = torch.zeros(model.cfg.n_layers, model.cfg.n_heads)
    for layer in range(model.cfg.n_layers):
        logits = ov_logits(model, layer, ids, candidates).cpu()  # (head, n, u)
        if any_spelling:
            top = logits.masked_fill(~allowed, float("-inf")).argmax(-1)  # (head, n)
            out[layer] = hit.gather(1, top.T).T.float().mean(-1)
            continue
        best_other = logits.masked_fill(~others, float("-inf")).amax(-1)  # (head, n)
        out[layer] = (logits[:, torch.arange(len(items)), target] > best_other).float().mean(-1)
    return out


def _spearman(a: Tensor, b: Tensor) -> float:
    """Spearman's rank correlation (ties by average rank)."""
    from scipy.stats import spearmanr

    if bool((a == a.flatten()[0]).all()) or bool((b == b.flatten()[0]).all()):
        return float("nan")  # a constant score ranks nothing
    return float(spearmanr(a.flatten().numpy(), b.flatten().numpy()).statistic)


# ----------------------------------------------------------------------------------- ablation


def incrementation_prompts(data: SuccessionDataset) -> tuple[list[str], list[int], list[str]]:
    """``("Monday, Tuesday, Wednesday,", id of " Thursday", "days")``: three items of a
    sequence in a list, the next one to predict; one prompt per position of every
    space-prefixed spelling (the next item is never in the prompt: copying cannot solve it).

    Example:
        >>> data = SuccessionDataset(("days",), (" Capital",),
        ...     ((" Monday", " Tuesday", " Wednesday", " Thursday"),), ((1, 2, 3, 4),))
        >>> incrementation_prompts(data)
        (['Monday, Tuesday, Wednesday,'], [4], ['days'])
    """
    texts, answers, names = [], [], []
    for name, spelling, words, ids in zip(
        data.names, data.spellings, data.words, data.ids, strict=True
    ):
        if not spelling.startswith(" "):
            continue
        for i in range(len(words) - 3):
            texts.append(f"{words[i].lstrip()},{words[i + 1]},{words[i + 2]},")
            answers.append(ids[i + 3])
            names.append(name)
    return texts, answers, names


@torch.no_grad()
def _incrementation(
    model: Any,
    tokens: Tensor,
    lengths: Tensor,
    answers: Tensor,
    options: Tensor,
    edits: Sequence[Any],
) -> dict[str, Tensor]:
    """Per prompt, at its last token: whether the successor is the model's top token, whether
    it beats the other items of its sequence (``options``, ``(batch, d_vocab)`` bool), and its
    log-probability. Only the last tokens are unembedded."""
    with mk.intervene(model, *edits):
        resid = model(tokens, stop_at_layer=model.cfg.n_layers)  # (batch, pos, d_model)
    rows = torch.arange(len(tokens), device=resid.device)
    final = resid[rows, (lengths - 1).to(resid.device)][:, None]  # (batch, 1, d_model)
    last = model.unembed(model.ln_final(final))[:, 0].log_softmax(-1)  # (batch, d_vocab)
    answers = answers.to(last.device)
    among = last.masked_fill(~options.to(last.device), float("-inf")).argmax(-1)
    return {
        "accuracy": (last.argmax(-1) == answers).float().cpu(),
        "accuracy_among_items": (among == answers).float().cpu(),
        "log_prob": last[rows, answers].cpu(),
    }


def _mean_over(values: dict[str, Tensor], rows: Tensor) -> dict[str, float]:
    """The per-prompt values of :func:`_incrementation` averaged over ``rows`` (bool)."""
    return {key: float(v[rows].mean()) for key, v in values.items()}


def _head_means(model: Any, tokens: Tensor, lengths: Tensor) -> list[Tensor]:
    """Each layer's z averaged over every real token of the prompts: ``(head, d_head)``."""
    sites = [mk.Site("z", layer=layer) for layer in range(model.cfg.n_layers)]
    mask = torch.arange(tokens.shape[1])[None] < lengths[:, None]  # (batch, pos)
    with torch.no_grad(), mk.capture(model, *sites) as acts:
        model(tokens, stop_at_layer=model.cfg.n_layers)  # z only: no unembedding
    return [acts[s][mask].mean(0) for s in sites]  # (head, d_head) each


def _ablate(heads: Sequence[tuple[int, int]], means: list[Tensor]) -> list[Any]:
    edits = []
    for layer in sorted({layer for layer, _ in heads}):
        chosen = [h for lay, h in heads if lay == layer]
        mask = torch.zeros(means[layer].shape[0], dtype=torch.bool)
        mask[chosen] = True
        edits.append(
            mk.Transform(
                mk.Site("z", layer=layer),
                lambda z, m=mask[:, None], v=means[layer]: torch.where(m.to(z.device), v.to(z), z),
            )
        )
    return edits


# ----------------------------------------------------------------------------------- mod 10


def _mod10_probe(model: Any, data: SuccessionDataset, seed: int) -> dict[str, Any]:
    """Linear probes for the index mod 10 on the effective embeddings (module docstring)."""
    from sklearn.linear_model import LogisticRegression

    index = [(row, i + 1) for row, ids in enumerate(data.ids) for i in range(len(ids))]
    ids = torch.tensor([data.ids[row][i - 1] for row, i in index])
    x = effective_embeddings(model, ids).cpu()
    x = (x / x.norm(dim=-1, keepdim=True)).numpy()  # direction only: norms differ by family
    label = torch.tensor([i % 10 for _, i in index]).numpy()
    position = torch.tensor([i for _, i in index])
    train = (position <= 10).numpy()
    test = ((position > 10) & (position <= 20)).numpy()
    out: dict[str, Any] = {"n_train": int(train.sum()), "n_test": int(test.sum())}
    if train.sum() < 10 or test.sum() == 0 or len(set(label[train])) < 2:
        out.update(accuracy=None, chance=None, families_tested=[])
        return out
    probe = LogisticRegression(C=1.0, max_iter=2000, random_state=seed).fit(x[train], label[train])
    predicted = probe.predict(x[test])
    out["accuracy"] = float((predicted == label[test]).mean())
    # chance: the most frequent test label's share (a constant guess)
    counts = torch.bincount(torch.tensor(label[test]), minlength=10)
    out["chance"] = float(counts.max()) / int(test.sum())
    # a control: the same probe with the labels shuffled among the training items
    rng = random.Random(seed)
    shuffled = list(label[train])
    rng.shuffle(shuffled)
    control = LogisticRegression(C=1.0, max_iter=2000, random_state=seed).fit(x[train], shuffled)
    out["control_accuracy"] = float((control.predict(x[test]) == label[test]).mean())
    tested = sorted({f"{data.names[row]} ({data.spellings[row]})" for row, i in index if i > 10})
    out["families_tested"] = tested
    # the probe's guesses for a few two-digit items, for the report
    test_items = [(row, i) for row, i in index if 10 < i <= 20]
    out["examples"] = [
        {"item": data.words[row][i - 1], "index": i, "predicted_mod_10": int(p)}
        for (row, i), p in list(zip(test_items, predicted.tolist(), strict=True))[:12]
    ]
    return out


# ----------------------------------------------------------------------------------- method


@dataclasses.dataclass(frozen=True, eq=False)
class SuccessorReport:
    """Every number of the reproduction.

    Attributes:
        scores: the paper's succession score, ``(layer, head)``.
        any_spelling: the same, a top token counting when it is the successor in any spelling.
        detected: ``mk.detect_heads(model, "successor")`` on the same sequences.
        agreement: rank correlation and top-head overlap of the two.
        heads: the successor heads found (score at least ``threshold``), best first.
        ablation: accuracy and log-probability of the successor on the incrementation prompts,
            clean, with the successor heads mean-ablated, and with as many random heads.
        mod10: the mod-10 probe's numbers.
    """

    model_name: str
    dataset: SuccessionDataset
    scores: Tensor
    any_spelling: Tensor
    detected: Tensor
    agreement: dict[str, Any]
    heads: list[dict[str, Any]]
    ablation: dict[str, Any]
    mod10: dict[str, Any]
    seconds: float

    def top(self, n: int = 10, *, any_spelling: bool = False) -> list[tuple[str, float]]:
        """The ``n`` heads with the largest succession scores (``any_spelling``: of the
        spelling-invariant score)."""
        scores = self.any_spelling if any_spelling else self.scores
        flat = scores.flatten()
        n_heads = scores.shape[1]
        order = flat.argsort(descending=True)[:n]
        return [(head_name(int(i) // n_heads, int(i) % n_heads), float(flat[i])) for i in order]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "dataset": [
                {"sequence": n, "spelling": s, "items": list(w)}
                for n, s, w in zip(
                    self.dataset.names, self.dataset.spellings, self.dataset.words, strict=True
                )
            ],
            "n_items": self.dataset.n_items,
            "successor_heads": self.heads,
            "top_heads": [{"head": h, "succession_score": s} for h, s in self.top(10)],
            "top_heads_any_spelling": [
                {"head": h, "any_spelling_score": s} for h, s in self.top(10, any_spelling=True)
            ],
            "agreement_with_detect_heads": self.agreement,
            "ablation": self.ablation,
            "mod10": self.mod10,
            "scores": self.scores.tolist(),
            "any_spelling_scores": self.any_spelling.tolist(),
            "detect_heads_scores": self.detected.tolist(),
            "seconds": self.seconds,
            "paper_gpt2": PAPER_GPT2,
        }

    def plot(self) -> Any:
        """The succession score of every head, layer x head."""
        import plotly.express as px

        return px.imshow(
            self.scores.numpy(),
            labels={"x": "head", "y": "layer", "color": "succession score"},
            zmin=0.0,
            zmax=1.0,
            aspect="auto",
            title=f"Succession scores (Gould et al.), {self.model_name}",
        )

    def write(self, out: str | Path) -> Path:
        """Write ``index.html``, the score figure and ``successor_heads.json`` into ``out``."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "successor_heads.json").write_text(json.dumps(self.to_dict(), indent=1))
        self.plot().write_html(out / "scores.html", include_plotlyjs="directory")
        index = out / "index.html"
        index.write_text(_page(self))
        return index


def reproduce(
    model: Any,
    data: SuccessionDataset | None = None,
    *,
    threshold: float = 0.5,
    max_heads: int = 4,
    random_draws: int = 5,
    seed: int = 0,
) -> SuccessorReport:
    """Gould et al.'s successor-head analysis of ``model`` (module docstring).

    Args:
        model: a HookedTransformer.
        data: the ordinal sequences; None: :func:`succession_dataset` (needs a tokenizer).
            Without a tokenizer no incrementation prompts are written (the ablation is
            skipped).
        threshold: a head with a succession score at least this is a successor head (the best
            head is reported whatever its score); at most ``max_heads`` of them.
        random_draws: sets of as many random heads ablated for the control.
        seed: the random heads and the probes.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> data = SuccessionDataset.from_ids([[3, 4, 5, 6, 7], [10, 11, 12, 13]])
        >>> report = reproduce(model, data)
        >>> len(report.heads) >= 1, tuple(report.scores.shape)
        (True, (2, 4))
    """
    start = time.perf_counter()
    data = succession_dataset(model) if data is None else data
    if not data.ids:
        raise mk.EmptyDatasetError(
            "Expected ordinal sequences the tokenizer writes one token per item; found none."
        )
    scores = succession_scores(model, data)
    any_spelling = succession_scores(model, data, any_spelling=True)
    families = [list(row) for row in data.ids]
    detected = mk.detect_heads(model, "successor", tokens=families, progress=False).scores
    ours_within = succession_scores(model, data, within_sequence=True)
    n_top = min(5, scores.numel())
    top_ours = set(scores.flatten().topk(n_top).indices.tolist())
    top_theirs = set(detected.flatten().topk(n_top).indices.tolist())
    agreement = {
        "spearman": _spearman(scores, detected),
        "top5_overlap": len(top_ours & top_theirs) / n_top,
        "within_sequence_max_abs_difference": float((ours_within - detected).abs().max()),
    }

    ranked = [(parse_node(name), value) for name, value in SuccessorReport(
        "", data, scores, any_spelling, detected, {}, [], {}, {}, 0.0).top(max_heads)]  # fmt: skip
    picked = [(node, v) for i, (node, v) in enumerate(ranked) if i == 0 or v >= threshold]
    heads = [
        {
            "head": str(node),
            "succession_score": round(v, 4),
            "any_spelling_score": round(float(any_spelling[node.layer, node.index]), 4),
            "detect_heads_score": round(float(detected[node.layer, node.index]), 4),
        }
        for node, v in picked
    ]
    cells = [(int(node.layer), int(node.index)) for node, _ in picked]  # type: ignore[arg-type]

    # 3. mean-ablate them on incrementation prompts, beside as many random heads
    texts, answers, names = (
        incrementation_prompts(data) if model.tokenizer is not None else ([], [], [])
    )
    ablation: dict[str, Any] = {"n_prompts": len(texts), "heads": [str(n) for n, _ in picked]}
    runs = ("clean", "successor heads ablated", "random heads ablated")
    if texts:
        tokens = model.to_tokens(texts, padding_side="right")
        lengths = torch.tensor([len(model.to_tokens(t)[0]) for t in texts])
        answer_ids = torch.tensor(answers, device=tokens.device)
        # the options of each prompt: the items of its sequence (every spelling with a space)
        options = torch.zeros(len(texts), model.cfg.d_vocab, dtype=torch.bool)
        for k, name in enumerate(names):
            for row, ids_row in enumerate(data.ids):
                if data.names[row] == name and data.spellings[row].startswith(" "):
                    options[k, list(ids_row)] = True
        means = _head_means(model, tokens, lengths)
        rng = random.Random(seed)
        everything = [(a, b) for a in range(model.cfg.n_layers) for b in range(model.cfg.n_heads)]
        others = [c for c in everything if c not in cells]
        random_sets = [rng.sample(others, len(cells)) for _ in range(random_draws)]

        # each run once over every prompt; each sequence's numbers are its prompts' share
        args = (tokens, lengths, answer_ids, options)
        clean = _incrementation(model, *args, [])
        ablated = _incrementation(model, *args, _ablate(cells, means))
        draws = [_incrementation(model, *args, _ablate(c, means)) for c in random_sets]

        def measure(rows: Tensor) -> dict[str, Any]:
            means_of_draws = [_mean_over(d, rows) for d in draws]
            return {
                "n_prompts": int(rows.sum()),
                "clean": _mean_over(clean, rows),
                "successor heads ablated": _mean_over(ablated, rows),
                "random heads ablated": {
                    key: sum(d[key] for d in means_of_draws) / len(draws)
                    for key in means_of_draws[0]
                }
                if draws
                else {},
            }

        ablation.update(measure(torch.ones(len(texts), dtype=torch.bool)))
        ablation["per_sequence"] = {
            name: measure(torch.tensor([n == name for n in names])) for name in sorted(set(names))
        }
    else:
        for key in runs:
            ablation[key] = {"accuracy": float("nan"), "log_prob": float("nan")}

    mod10 = _mod10_probe(model, data, seed)
    return SuccessorReport(
        model_name=str(getattr(model.cfg, "model_name", "model")),
        dataset=data,
        scores=scores,
        any_spelling=any_spelling,
        detected=detected,
        agreement=agreement,
        heads=heads,
        ablation=ablation,
        mod10=mod10,
        seconds=time.perf_counter() - start,
    )


# ----------------------------------------------------------------------------------- report


def _table(rows: list[list[Any]], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _page(report: SuccessorReport) -> str:
    data = report.dataset
    sequences = _table(
        [
            [n, s, len(w), " ".join(w).strip()[:80]]
            for n, s, w in zip(data.names, data.spellings, data.words, strict=True)
        ],  # fmt: skip
        ["sequence", "spelling", "items", "items (start)"],
    )
    heads = _table(
        [
            [h["head"], h["succession_score"], h["any_spelling_score"], h["detect_heads_score"]]
            for h in report.heads
        ],  # fmt: skip
        [
            "head",
            "succession score (all dataset tokens)",
            "any spelling",
            "detect_heads (own sequence)",
        ],  # fmt: skip
    )
    top = _table(
        [
            [*a, *b] for a, b in zip(report.top(10), report.top(10, any_spelling=True), strict=True)
        ],  # fmt: skip
        ["head", "succession score", "head", "any-spelling score"],
    )
    a = report.ablation
    keys = ("accuracy", "accuracy_among_items", "log_prob")
    runs = ("clean", "successor heads ablated", "random heads ablated")
    ablation = _table(
        [[k, *(a[k].get(key, float("nan")) for key in keys)] for k in runs],
        [
            "run",
            "successor is the top token",
            "successor beats the sequence's other items",
            "mean log-probability",
        ],  # fmt: skip
    )
    per = _table(
        [
            [
                name,
                v["n_prompts"],
                *(v[run]["accuracy_among_items"] for run in runs),
                *(v[run]["log_prob"] for run in runs),
            ]
            for name, v in a.get("per_sequence", {}).items()
        ],  # fmt: skip
        [
            "sequence",
            "prompts",
            "beats items: clean",
            "heads ablated",
            "random ablated",
            "log-prob: clean",
            "heads ablated",
            "random ablated",
        ],  # fmt: skip
    )
    m = report.mod10
    if m.get("accuracy") is None:
        mod10 = "<p>Too few items past index 10 to test the mod-10 structure.</p>"
    else:
        mod10 = (
            f"<p>A logistic-regression probe trained on the {m['n_train']} items with index "
            f"1-10 predicts the index mod 10 of the {m['n_test']} items with index 11-20 "
            f"({html.escape(', '.join(m['families_tested']))}) with accuracy "
            f"{m['accuracy']:.1%}; a constant guess scores {m['chance']:.1%}, the same probe "
            f"on shuffled labels {m['control_accuracy']:.1%}.</p>"
            + _table(
                [[e["item"], e["index"], e["predicted_mod_10"]] for e in m["examples"]],
                ["item", "index", "probe's index mod 10"],
            )
        )
    g = report.agreement
    paper = ", ".join(str(parse_node(h)) for h in PAPER_GPT2["successor_heads"])
    return f"""<!doctype html><html><head><meta charset="utf-8">
<title>Successor heads: {html.escape(report.model_name)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px}}</style></head>
<body><h1>Successor heads: {html.escape(report.model_name)}</h1>
<p>Gould et al. 2023. {len(data)} spellings of ordinal sequences, {data.n_items} items;
{report.seconds:.0f} s. Figure: <a href="scores.html">scores.html</a>; every number in
<a href="successor_heads.json">successor_heads.json</a>. GPT-2 small's successor head in the
paper: {html.escape(paper)}.</p>
<h2>Successor heads</h2>{heads}
<p>The ten best heads by each score:</p>{top}
<p>Agreement with <code>mk.detect_heads(model, "successor")</code> on the same sequences (which
ranks the successor against its own sequence only): Spearman {g["spearman"]:.2f} over all
heads, top-5 overlap {g["top5_overlap"]:.0%}; this module's score restricted to the own
sequence differs from it by at most {g["within_sequence_max_abs_difference"]:.1e}.</p>
<h2>Ablation on incrementation prompts</h2>
<p>{a["n_prompts"]} prompts such as "Monday, Tuesday, Wednesday,"; the heads' z mean-ablated
(mean over every token of the prompts).</p>{ablation}{per}
<h2>Mod-10 structure</h2>{mod10}
<h2>Sequences</h2>{sequences}
</body></html>
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Find successor heads (Gould et al. 2023).")
    parser.add_argument(
        "--model", default="smollm2-135m",
        help="a name mk.load_model knows: smollm2-135m (default), gemma3-270m (Gemma 3 270M, "
        "converted offline from its GGUF file, about 80 s), ...",
    )  # fmt: skip
    parser.add_argument("--out", default="reports/successor_heads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    model = mk.load_model(args.model)
    report = reproduce(model, seed=args.seed)
    index = report.write(args.out)
    for h in report.heads:
        print(f"{h['head']:8s} succession score {h['succession_score']:.2f}")
    a = report.ablation
    print(
        f"successor beats the sequence's other items: {a['clean']['accuracy_among_items']:.1%}"
        f", successor heads ablated {a['successor heads ablated']['accuracy_among_items']:.1%}"
        f", random heads ablated {a['random heads ablated']['accuracy_among_items']:.1%}"
    )
    print(f"wrote {index}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
