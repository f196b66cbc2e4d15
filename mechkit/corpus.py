"""An offline text corpus: the Python reference documentation that ships with Python itself.

Every CPython install carries ``pydoc_data.topics``: the text of the language reference's
topics (statements, expressions, the data model...), 79 documents and about 465,000
characters (~110,000 SmolLM2 tokens) of English prose with code. It needs no download, is the
same on every machine with the same Python minor version, and is real text, not samples from
the model. mechkit uses it wherever a method needs token data: training a tuned lens,
evaluating lenses on held-out text.

The split is by document: every fifth topic, in sorted order, is held out (``split="test"``),
so held-out sequences never share a document with training ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from mechkit.errors import check_choice
from mechkit.tokens import tokenizer_of

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = ["corpus_documents", "corpus_tokens"]

Split = Literal["train", "test", "all"]


def corpus_documents(split: Split = "all") -> list[str]:
    """The documents of the corpus in a fixed order (sorted by topic name).

    Example:
        >>> docs = corpus_documents("test")
        >>> isinstance(docs[0], str), len(docs) < len(corpus_documents("all"))
        (True, True)
    """
    from pydoc_data.topics import topics

    check_choice("split", split, ["train", "test", "all"])
    names = sorted(topics)
    if split == "test":
        names = names[::5]
    elif split == "train":
        names = [n for i, n in enumerate(names) if i % 5 != 0]
    return [topics[n] for n in names]


def corpus_tokens(
    model: HookedTransformer,
    *,
    seq_len: int = 128,
    split: Split = "train",
    max_sequences: int | None = None,
    seed: int | None = 0,
) -> Tensor:
    """Token sequences ``(n, seq_len)`` cut from the corpus with the model's tokenizer.

    Each document is tokenized, documents are joined with the EOS token (BOS first when the
    model prepends one), and the stream is cut into consecutive windows of ``seq_len``. With a
    ``seed`` the windows are shuffled (reproducibly); ``max_sequences`` keeps the first ones.

    Example:
        >>> model = mk.load_model("smollm2-135m")
        >>> corpus_tokens(model, seq_len=64, split="test", max_sequences=4).shape   # (n, 64)
        torch.Size([4, 64])
    """
    tokenizer = tokenizer_of(model)
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    stream: list[int] = []
    for doc in corpus_documents(split):
        stream.extend(tokenizer.encode(doc, add_special_tokens=False))
        stream.append(sep)
    prefix = [tokenizer.bos_token_id] if model.cfg.default_prepend_bos else []
    width = seq_len - len(prefix)
    n = len(stream) // width
    windows = torch.tensor(stream[: n * width], dtype=torch.long).reshape(n, width)
    if prefix:
        windows = torch.cat([torch.full((n, 1), prefix[0], dtype=torch.long), windows], dim=1)
    if seed is not None:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        windows = windows[order]
    return windows[:max_sequences] if max_sequences is not None else windows
