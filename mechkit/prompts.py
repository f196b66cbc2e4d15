"""Prompt pairs: the clean and corrupt inputs of a patching experiment, with their answers.

A :class:`PromptPairs` holds, for each example, a clean prompt and a corrupt prompt (token ids,
padded into batches with attention masks), the answer token the clean prompt should produce,
the wrong answer the corrupt prompt points to, and the position whose logits predict them.

Prompts of different lengths share a batch by **right padding**: a causal model's outputs at the
real tokens are then exactly those of the unpadded prompt (no real token attends to a pad, and
positions keep their indices), and the answer position is each prompt's last real token. Methods
that patch position by position need each clean prompt to have its corrupt prompt's length;
:meth:`PromptPairs.require_aligned` checks it, and ``aligned=True`` (the default) checks it at
construction.

Example:
    >>> model = mk.load_model("smollm2-135m")
    >>> pairs = mk.PromptPairs.from_lists(
    ...     model,
    ...     clean=["When Mary and John went to the store, John gave a drink to"],
    ...     corrupt=["When Alice and Bob went to the store, Carl gave a drink to"],
    ...     answers=[" Mary"], wrongs=[" John"])
    >>> pairs.clean_tokens.shape   # (batch, pos)
    torch.Size([1, 14])

A JSONL file holds one ``{"clean", "corrupt", "answer", "wrong"}`` object a line
(:meth:`PromptPairs.from_jsonl`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from mechkit.errors import (
    DatasetFormatError,
    EmptyDatasetError,
    PromptLengthError,
    ShapeError,
    check_choice,
)
from mechkit.tokens import (
    check_token_ids,
    check_tokens,
    encode,
    pad_right,
    tokenize_answer,
    tokenizer_of,
)

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = ["PromptPairs"]

_FIELDS = ("clean", "corrupt", "answer", "wrong")


@dataclasses.dataclass(frozen=True, eq=False)
class PromptPairs:
    """Clean and corrupt token batches with answers and answer positions.

    Attributes:
        clean_tokens: ``(batch, pos)`` token ids, right-padded with ``pad_token_id``.
        corrupt_tokens: ``(batch, pos)``, the same layout.
        clean_mask: ``(batch, pos)`` True at real tokens, False at padding.
        corrupt_mask: ``(batch, pos)``.
        answer: ``(batch,)`` the token the clean prompt should predict next.
        wrong: ``(batch,)`` the competing token (the corrupt prompt's answer, in IOI the subject).
        clean_texts, corrupt_texts, answer_texts, wrong_texts: the strings, when built from text.
        pad_token_id: the id used for padding (never read by a causal model at real tokens).

    Example:
        >>> pairs = PromptPairs.from_tokens(torch.tensor([[1, 2, 3]]), torch.tensor([[1, 5, 3]]),
        ...                                 answers=[7], wrongs=[8])
        >>> len(pairs), pairs.clean_tokens.shape, pairs.answer_positions().tolist()
        (1, torch.Size([1, 3]), [2])
    """

    clean_tokens: Int[Tensor, "batch pos"]
    corrupt_tokens: Int[Tensor, "batch pos"]
    clean_mask: Bool[Tensor, "batch pos"]
    corrupt_mask: Bool[Tensor, "batch pos"]
    answer: Int[Tensor, " batch"]
    wrong: Int[Tensor, " batch"]
    clean_texts: tuple[str, ...] | None = None
    corrupt_texts: tuple[str, ...] | None = None
    answer_texts: tuple[str, ...] | None = None
    wrong_texts: tuple[str, ...] | None = None
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        n = self.clean_tokens.shape[0]
        if n == 0:
            raise EmptyDatasetError(
                "Expected at least one prompt pair; got an empty dataset. Hint: check the "
                "lists or the file you built it from."
            )
        shapes = {
            "corrupt_tokens": (self.corrupt_tokens.shape[0],),
            "clean_mask": tuple(self.clean_mask.shape),
            "corrupt_mask": tuple(self.corrupt_mask.shape),
            "answer": tuple(self.answer.shape),
            "wrong": tuple(self.wrong.shape),
        }
        expected = {
            "corrupt_tokens": (n,),
            "clean_mask": tuple(self.clean_tokens.shape),
            "corrupt_mask": tuple(self.corrupt_tokens.shape),
            "answer": (n,),
            "wrong": (n,),
        }
        bad = {k: v for k, v in shapes.items() if v != expected[k]}
        if bad:
            raise ShapeError(
                "PromptPairs fields disagree in shape: "
                + "; ".join(f"{k} expected {expected[k]}, got {bad[k]}" for k in bad)
            )

    # ----------------------------------------------------------------------------- building

    @classmethod
    def from_tokens(
        cls,
        clean: Sequence[Sequence[int]] | Tensor,
        corrupt: Sequence[Sequence[int]] | Tensor,
        answers: Sequence[int] | Tensor,
        wrongs: Sequence[int] | Tensor,
        *,
        aligned: bool = True,
        pad_token_id: int = 0,
    ) -> PromptPairs:
        """From token id lists (of any lengths) or ``(batch, pos)`` tensors (no padding)."""
        clean_rows = _rows(clean)
        corrupt_rows = _rows(corrupt)
        answer = torch.as_tensor(answers, dtype=torch.long).reshape(-1)
        wrong = torch.as_tensor(wrongs, dtype=torch.long).reshape(-1)
        counts = {len(clean_rows), len(corrupt_rows), len(answer), len(wrong)}
        if len(counts) > 1:
            raise ShapeError(
                f"Expected as many clean prompts, corrupt prompts, answers and wrong answers; got "
                f"{len(clean_rows)}, {len(corrupt_rows)}, {len(answer)} and {len(wrong)}."
            )
        if not clean_rows:
            raise EmptyDatasetError("Expected at least one prompt pair; got none.")
        if any(not row for row in clean_rows + corrupt_rows):
            raise ShapeError("Expected every prompt to have at least one token; got an empty one.")
        clean_tokens, clean_mask = pad_right(clean_rows, pad_token_id)
        corrupt_tokens, corrupt_mask = pad_right(corrupt_rows, pad_token_id)
        pairs = cls(
            clean_tokens,
            corrupt_tokens,
            clean_mask,
            corrupt_mask,
            answer,
            wrong,
            pad_token_id=pad_token_id,
        )
        if aligned:
            pairs.require_aligned()
        return pairs

    @classmethod
    def from_lists(
        cls,
        model: HookedTransformer,
        clean: Sequence[str],
        corrupt: Sequence[str],
        answers: Sequence[str],
        wrongs: Sequence[str],
        *,
        aligned: bool = True,
        prepend_bos: bool | None = None,
    ) -> PromptPairs:
        """From strings, tokenized with the model's tokenizer.

        Args:
            model: a HookedTransformer with a tokenizer.
            clean, corrupt: the prompts.
            answers, wrongs: the answer strings, each a single token (e.g. ``" Mary"``).
            aligned: require each clean prompt to have its corrupt prompt's token length.
            prepend_bos: add the BOS token; None means the model's default.

        Raises:
            EmptyDatasetError: no pairs.
            MultiTokenAnswerError: an answer that is not a single token.
            PromptLengthError: with ``aligned``, a clean and a corrupt prompt of different lengths.
            ShapeError: lists of different lengths, or a single string instead of a list.
            ContextLengthError: a prompt longer than the model's ``n_ctx``.
        """
        tokenizer = tokenizer_of(model)
        lists = {"clean": clean, "corrupt": corrupt, "answers": answers, "wrongs": wrongs}
        for key, value in lists.items():
            if isinstance(value, str):
                raise ShapeError(f"Expected a list of strings for {key}; got a single string.")
        if not clean:
            raise EmptyDatasetError(
                "Expected at least one prompt pair; got empty lists. Hint: pass one clean and "
                "one corrupt prompt per example."
            )

        answer_ids = [tokenize_answer(model, a) for a in answers]
        wrong_ids = [tokenize_answer(model, w) for w in wrongs]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        pairs = cls.from_tokens(
            [encode(model, t, prepend_bos) for t in clean],
            [encode(model, t, prepend_bos) for t in corrupt],
            answer_ids,
            wrong_ids,
            aligned=False,
            pad_token_id=pad,
        )
        pairs = dataclasses.replace(
            pairs,
            clean_texts=tuple(clean),
            corrupt_texts=tuple(corrupt),
            answer_texts=tuple(answers),
            wrong_texts=tuple(wrongs),
        )
        pairs.check_fits(model)
        if aligned:
            pairs.require_aligned()
        return pairs

    @classmethod
    def from_jsonl(
        cls,
        model: HookedTransformer,
        path: str | Path,
        *,
        aligned: bool = True,
        prepend_bos: bool | None = None,
    ) -> PromptPairs:
        """From a JSONL file: one ``{"clean", "corrupt", "answer", "wrong"}`` object a line.

        Blank lines are skipped. A line that is not a JSON object or lacks a field raises
        :class:`DatasetFormatError` naming the file and the line number.
        """
        path = Path(path)
        if path.is_dir():
            raise DatasetFormatError(
                f"Expected a JSONL file of prompt pairs; {str(path)!r} is a directory. Hint: "
                "pass the path of the .jsonl file inside it."
            )
        if not path.is_file():
            raise DatasetFormatError(
                f"Expected a JSONL file of prompt pairs; {str(path)!r} does not exist."
            )
        rows: dict[str, list[str]] = {k: [] for k in _FIELDS}
        for lineno, line in enumerate(_read_utf8_lines(path), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetFormatError(
                    f"{path}:{lineno}: expected a JSON object; the line is not valid JSON "
                    f"({exc.msg} at column {exc.colno}). Hint: one object per line."
                ) from None
            except (RecursionError, ValueError) as exc:
                what = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
                raise DatasetFormatError(
                    f"{path}:{lineno}: expected a flat JSON object of strings; the line could "
                    f"not be read ({what}). Hint: one {{clean, corrupt, answer, wrong}} object "
                    "per line."
                ) from None
            if not isinstance(record, dict):
                raise DatasetFormatError(
                    f"{path}:{lineno}: expected a JSON object with keys {list(_FIELDS)}; "
                    f"got a {type(record).__name__}."
                )
            missing = [k for k in _FIELDS if k not in record]
            if missing:
                raise DatasetFormatError(
                    f"{path}:{lineno}: expected keys {list(_FIELDS)}; missing {missing} "
                    f"(the line has {sorted(record)})."
                )
            for k in _FIELDS:
                if not isinstance(record[k], str):
                    raise DatasetFormatError(
                        f"{path}:{lineno}: expected a string for {k!r}; got "
                        f"{type(record[k]).__name__}."
                    )
                try:
                    record[k].encode("utf-8")
                except UnicodeEncodeError:
                    raise DatasetFormatError(
                        f"{path}:{lineno}: expected text for {k!r}; it holds a lone surrogate "
                        f"escape ({record[k]!r}), which is not a character. Hint: escape "
                        "characters outside the BMP as a surrogate pair, or write them as UTF-8."
                    ) from None
                rows[k].append(record[k])
        if not rows["clean"]:
            raise EmptyDatasetError(
                f"Expected at least one prompt pair in {path}; the file has none."
            )
        return cls.from_lists(
            model,
            rows["clean"],
            rows["corrupt"],
            rows["answer"],
            rows["wrong"],
            aligned=aligned,
            prepend_bos=prepend_bos,
        )

    # ----------------------------------------------------------------------------- using

    def __len__(self) -> int:
        return self.clean_tokens.shape[0]

    def __getitem__(self, rows: int | slice | Sequence[int] | Tensor) -> PromptPairs:
        """The pairs at ``rows``, trimmed of padding columns no row needs."""
        if isinstance(rows, int):
            rows = slice(rows, rows + 1 if rows != -1 else None)
        index: slice | Tensor
        if isinstance(rows, slice):
            index = rows
            picked: Sequence[int] = range(len(self))[rows]
        else:
            index = torch.as_tensor(rows, dtype=torch.long)
            picked = index.tolist()

        def texts(values: tuple[str, ...] | None) -> tuple[str, ...] | None:
            return None if values is None else tuple(values[i] for i in picked)

        clean_len = int(self.clean_mask[index].sum(-1).max())
        corrupt_len = int(self.corrupt_mask[index].sum(-1).max())
        return PromptPairs(
            self.clean_tokens[index, :clean_len],
            self.corrupt_tokens[index, :corrupt_len],
            self.clean_mask[index, :clean_len],
            self.corrupt_mask[index, :corrupt_len],
            self.answer[index],
            self.wrong[index],
            texts(self.clean_texts),
            texts(self.corrupt_texts),
            texts(self.answer_texts),
            texts(self.wrong_texts),
            self.pad_token_id,
        )

    @property
    def clean_lengths(self) -> Int[Tensor, " batch"]:
        """The number of real tokens of each clean prompt."""
        return self.clean_mask.sum(-1)

    @property
    def corrupt_lengths(self) -> Int[Tensor, " batch"]:
        return self.corrupt_mask.sum(-1)

    @property
    def is_aligned(self) -> bool:
        """Whether each clean prompt has its corrupt prompt's token length."""
        return bool((self.clean_lengths == self.corrupt_lengths).all())

    @property
    def is_padded(self) -> bool:
        """Whether any prompt is shorter than its batch (so masks matter)."""
        return not (bool(self.clean_mask.all()) and bool(self.corrupt_mask.all()))

    def answer_positions(self, run: Literal["clean", "corrupt"] = "clean") -> Int[Tensor, " batch"]:
        """The position whose logits predict the answer: each prompt's last real token."""
        check_choice("run", run, ["clean", "corrupt"])
        lengths = self.clean_lengths if run == "clean" else self.corrupt_lengths
        return lengths - 1

    def require_aligned(self) -> None:
        """Raise :class:`PromptLengthError` unless each clean prompt matches its corrupt one."""
        bad = (self.clean_lengths != self.corrupt_lengths).nonzero().flatten().tolist()
        if not bad:
            return
        i = bad[0]
        shown = ""
        if self.clean_texts is not None and self.corrupt_texts is not None:
            shown = f" (clean {self.clean_texts[i]!r}, corrupt {self.corrupt_texts[i]!r})"
        raise PromptLengthError(
            f"Expected each clean prompt to have as many tokens as its corrupt prompt, since "
            f"positions are patched one for one; {len(bad)} pair(s) differ, first pair {i}: "
            f"{int(self.clean_lengths[i])} clean vs {int(self.corrupt_lengths[i])} corrupt "
            f"tokens{shown}. Hint: use names and words that are single tokens, or pass "
            "aligned=False to methods that do not patch by position."
        )

    def check_fits(self, model: HookedTransformer) -> None:
        """Raise unless ``model`` can run these pairs: token and answer ids inside its
        vocabulary (:class:`InvalidTokenError`) and prompts no longer than its context
        (:class:`ContextLengthError`)."""
        check_tokens(model, self.clean_tokens, self.clean_mask)
        check_tokens(model, self.corrupt_tokens, self.corrupt_mask)
        check_token_ids(model, self.answer, "answer ids")
        check_token_ids(model, self.wrong, "wrong-answer ids")

    def to(self, device: str | torch.device) -> PromptPairs:
        """The same pairs with every tensor on ``device``."""
        changes = {
            f.name: getattr(self, f.name).to(device)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return dataclasses.replace(self, **changes)

    def to_dataframe(self) -> Any:
        """One row per pair: the texts (when known), token lengths and answer ids."""
        import pandas as pd

        data: dict[str, Any] = {}
        if self.clean_texts is not None:
            data["clean"] = self.clean_texts
            data["corrupt"] = self.corrupt_texts
            data["answer"] = self.answer_texts
            data["wrong"] = self.wrong_texts
        data["clean_len"] = self.clean_lengths.tolist()
        data["corrupt_len"] = self.corrupt_lengths.tolist()
        data["answer_id"] = self.answer.tolist()
        data["wrong_id"] = self.wrong.tolist()
        return pd.DataFrame(data)

    def __repr__(self) -> str:
        return (
            f"PromptPairs(n={len(self)}, clean_pos={self.clean_tokens.shape[1]}, "
            f"corrupt_pos={self.corrupt_tokens.shape[1]}, aligned={self.is_aligned}, "
            f"padded={self.is_padded})"
        )


def _read_utf8_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file (a byte-order mark is skipped), or
    :class:`DatasetFormatError` naming the line that is not UTF-8."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        lineno = data[: exc.start].count(b"\n") + 1
        if data.startswith((b"\xff\xfe", b"\xfe\xff")):
            found = "the file looks like UTF-16 (it starts with a UTF-16 byte-order mark)"
        else:
            found = f"byte {data[exc.start]:#04x} is not UTF-8 (Latin-1 or another encoding?)"
        raise DatasetFormatError(
            f"{path}:{lineno}: expected UTF-8 text; {found}. Hint: save the file as UTF-8."
        ) from None
    return text.split("\n")  # only newlines end a line (JSON strings may hold U+2028)


def _rows(batch: Sequence[Sequence[int]] | Tensor) -> list[list[int]]:
    if isinstance(batch, Tensor):
        if batch.ndim != 2:
            raise ShapeError(f"Expected a (batch, pos) token tensor; got {tuple(batch.shape)}.")
        return batch.tolist()
    return [list(map(int, row)) for row in batch]
