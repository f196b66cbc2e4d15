"""Activations for training sparse dictionaries: any hook of any loaded model over a token corpus,
in shuffled batches, optionally cached on disk so several runs share one forward pass.

:class:`ActivationStore` runs the model over token sequences a chunk at a time (stopping after
the last block it needs), keeps the activations of one hook (or, for transcoders, the pairs
input hook / output hook from the same pass) and serves them through a *shuffle buffer*: chunks
are read in a seeded random order into a pool; whenever the pool holds ``buffer_size`` rows it
is permuted and half of it is served. Every activation is served exactly once per epoch; epochs
repeat with new orders. The order depends only on the seed, the same with or without the cache.

With ``cache_dir`` the first pass writes the activations to a memory-mapped ``.npy`` file
(``(rows, d_in + d_out)``) beside a small JSON header naming the model, hooks, token hash and
dtype; a later store with the same header reads the file instead of running the model. Called
on every rank of a ``torch.distributed`` group (``torchrun``), the ranks fill the file in
parallel, each its share of the chunks (the folder must be one they all see), and
:meth:`ActivationStore.rank_share` gives each rank its rows of every batch for data-parallel
training.

:func:`sae_corpus_tokens` is a larger offline corpus than :func:`mechkit.corpus_tokens`: the
Python reference documentation (``pydoc_data``, ~110k SmolLM2 tokens of prose) followed by the
source files of Python's own standard library (code, comments and docstrings, several million
tokens), both shipped with every Python install.

Example (the toy model's residual stream after block 0; ``cache_dir="..."`` would keep it):

    >>> model = mk.load_model("attn-only-2l")
    >>> tokens = torch.randint(1, 500, (16, 32), generator=torch.Generator().manual_seed(0))
    >>> store = ActivationStore(model, "blocks.0.hook_resid_post", tokens, batch_size=64)
    >>> next(iter(store)).shape                                  # (batch, d_model)
    torch.Size([64, 128])
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from mechkit.atomic_io import write_text_atomically
from mechkit.core.progress import progress_bar
from mechkit.core.types import Model
from mechkit.corpus import corpus_documents
from mechkit.distributed.data_parallel import barrier, rank_and_world
from mechkit.errors import (
    ActivationCacheError,
    EmptyDatasetError,
    ShapeError,
    SiteNotFoundError,
    check_choice,
    did_you_mean,
)
from mechkit.hook_scope import run_with_cache
from mechkit.tokens import tokenizer_of

__all__ = ["ActivationStore", "RankShare", "sae_corpus_tokens", "stdlib_documents"]

HEADER = "header.json"
DATA = "activations.npy"
_NP_DTYPES = {"float32": np.float32, "float16": np.float16}


def _hook_layer(name: str) -> int | None:
    match = re.match(r"blocks\.(\d+)\.", name)
    return None if match is None else int(match.group(1))


class ActivationStore:
    """Shuffled batches of one hook's activations (or input/output pairs) over token sequences.

    Args:
        model: a HookedTransformer.
        hook_name: the input hook (``blocks.15.hook_resid_post``).
        tokens: ``(n_sequences, seq_len)`` token ids, e.g. from :func:`sae_corpus_tokens`.
        out_hook_name: for transcoders, the hook it predicts (``blocks.L.hook_mlp_out``); batches
            are then ``(x, y)`` pairs from the same forward pass.
        batch_size: rows per batch (the last batch of an epoch may be smaller).
        buffer_size: rows in the shuffle pool before half of it is served (a multiple of
            ``2 * batch_size``; None: ``16 * batch_size``).
        model_batch_size: sequences per forward pass (a "chunk").
        seed: the order of chunks and rows.
        exclude_bos: drop position 0 of every sequence (the BOS token, whose activations are
            outliers that a dictionary should not spend latents on).
        cache_dir: folder of the memory-mapped cache (written on first use, read afterwards).
        cache_dtype: ``"float32"`` (exact) or ``"float16"`` (half the disk).

    Example:
        >>> model = mk.load_model("attn-only-2l")           # a transcoder's pairs: block 0's
        >>> tokens = torch.randint(1, 500, (8, 16))       # attention input and output
        >>> store = ActivationStore(model, "blocks.0.ln1.hook_normalized", tokens,
        ...                         out_hook_name="blocks.0.hook_attn_out", batch_size=32)
        >>> x, y = next(iter(store))
        >>> x.shape, y.shape                                # (batch, d_model) each
        (torch.Size([32, 128]), torch.Size([32, 128]))
    """

    def __init__(
        self,
        model: Model,
        hook_name: str,
        tokens: Int[Tensor, "n seq"],
        *,
        out_hook_name: str | None = None,
        batch_size: int = 4096,
        buffer_size: int | None = None,
        model_batch_size: int = 16,
        seed: int = 0,
        exclude_bos: bool = True,
        cache_dir: str | Path | None = None,
        cache_dtype: Literal["float32", "float16"] = "float32",
    ) -> None:
        for name in (hook_name, out_hook_name):
            if name is not None and name not in model.hook_dict:
                raise SiteNotFoundError(
                    f"Expected a hook of the model; got {name!r}."
                    f"{did_you_mean(name, model.hook_dict) or ' Hint: see model.hook_dict.'}"
                )
        if not isinstance(tokens, Tensor) or tokens.ndim != 2 or tokens.dtype.is_floating_point:
            raise ShapeError(
                "Expected tokens as an integer (n_sequences, seq_len) tensor; got "
                f"{tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__}."
            )
        if tokens.shape[0] == 0 or tokens.shape[1] <= int(exclude_bos):
            raise EmptyDatasetError(
                f"Expected at least one sequence with a position to keep; got tokens of shape "
                f"{tuple(tokens.shape)} (exclude_bos={exclude_bos})."
            )
        for name, value in (("batch_size", batch_size), ("model_batch_size", model_batch_size)):
            if not isinstance(value, int) or value <= 0:
                raise ShapeError(f"Expected {name} to be a positive int; got {value!r}.")
        buffer_size = 16 * batch_size if buffer_size is None else buffer_size
        if buffer_size <= 0 or buffer_size % (2 * batch_size):
            raise ShapeError(
                f"Expected buffer_size to be a positive multiple of 2 * batch_size "
                f"({2 * batch_size}); got {buffer_size}."
            )
        check_choice("cache_dtype", cache_dtype, list(_NP_DTYPES))
        self.model = model
        self.hook_name, self.out_hook_name = hook_name, out_hook_name
        self.tokens = tokens.cpu()
        self.batch_size, self.buffer_size = batch_size, buffer_size
        self.model_batch_size, self.seed = model_batch_size, seed
        self.exclude_bos = exclude_bos
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.cache_dtype = cache_dtype
        self.rows_per_sequence = tokens.shape[1] - int(exclude_bos)
        self.n_rows = tokens.shape[0] * self.rows_per_sequence
        self.n_chunks = math.ceil(tokens.shape[0] / model_batch_size)
        self.batches_per_epoch = math.ceil(self.n_rows / batch_size)
        probe = self._forward(self.tokens[:1, : min(2, tokens.shape[1])], keep_all=True)
        self.d_in = probe[0].shape[-1]
        self.d_out = None if probe[1] is None else probe[1].shape[-1]
        self._memmap: np.ndarray | None = None

    # -- forward passes ------------------------------------------------------------------------

    @torch.no_grad()
    def _forward(self, tokens: Tensor, keep_all: bool = False) -> tuple[Tensor, Tensor | None]:
        """``(rows, d_in)`` (and ``(rows, d_out)``) activations of ``tokens``, on the CPU."""
        names = [n for n in (self.hook_name, self.out_hook_name) if n is not None]
        layers = [_hook_layer(n) for n in names]
        known = [la for la in layers if la is not None]
        stop = max(known) + 1 if len(known) == len(layers) else None
        if stop is not None and stop >= self.model.cfg.n_layers:
            stop = None
        device = next(self.model.parameters()).device
        _, cache = run_with_cache(
            self.model, tokens.to(device), names_filter=names, stop_at_layer=stop, return_type=None
        )
        start = 0 if keep_all or not self.exclude_bos else 1
        out = []
        for name in names:
            act = cache[name][:, start:]  # (batch, pos, ...) -> (batch * pos, width)
            out.append(act.reshape(act.shape[0] * act.shape[1], -1).float().cpu())
        return out[0], (out[1] if len(out) > 1 else None)

    def _chunk_rows(self, chunk: int) -> tuple[int, int]:
        first = chunk * self.model_batch_size
        last = min(first + self.model_batch_size, self.tokens.shape[0])
        return first * self.rows_per_sequence, last * self.rows_per_sequence

    def _chunk(self, chunk: int) -> Tensor:
        """Chunk ``chunk``'s rows as ``(rows, d_in [+ d_out])``, from the cache or the model."""
        if self._memmap is not None:
            a, b = self._chunk_rows(chunk)
            return torch.from_numpy(np.array(self._memmap[a:b], dtype=np.float32))  # a copy
        first = chunk * self.model_batch_size
        x, y = self._forward(self.tokens[first : first + self.model_batch_size])
        return x if y is None else torch.cat([x, y], dim=-1)

    # -- the cache -----------------------------------------------------------------------------

    def _header(self) -> dict[str, Any]:
        digest = hashlib.sha256(self.tokens.numpy().astype(np.int64).tobytes()).hexdigest()
        cfg = self.model.cfg
        return {
            "format": "mechkit-activations-1",
            "model_name": getattr(cfg, "model_name", None),
            "d_model": cfg.d_model,
            "n_layers": cfg.n_layers,
            "hook_name": self.hook_name,
            "out_hook_name": self.out_hook_name,
            "tokens_sha256": digest,
            "n_sequences": self.tokens.shape[0],
            "seq_len": self.tokens.shape[1],
            "exclude_bos": self.exclude_bos,
            "rows": self.n_rows,
            "d_in": self.d_in,
            "d_out": self.d_out,
            "dtype": self.cache_dtype,
        }

    def build_cache(self) -> Path | None:
        """Write the cache if ``cache_dir`` is set and holds no matching one; returns its file.

        Raises:
            ActivationCacheError: the folder holds a cache of something else.
        """
        if self.cache_dir is None:
            return None
        header = self._header()
        path, header_path = self.cache_dir / DATA, self.cache_dir / HEADER
        if header_path.is_file():
            found = json.loads(header_path.read_text(encoding="utf-8"))
            if found != header:
                diff = {k: (found.get(k), v) for k, v in header.items() if found.get(k) != v}
                raise ActivationCacheError(
                    f"Expected the cache in {str(self.cache_dir)!r} to match this store; got "
                    f"differences (cached, wanted): {diff}. Hint: use another cache_dir."
                )
            self._memmap = np.load(path, mmap_mode="r", allow_pickle=False)
            return path
        rank, world = rank_and_world()
        tmp = self.cache_dir / (DATA + ".partial")
        if rank == 0:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            width = self.d_in + (self.d_out or 0)
            dtype = _NP_DTYPES[self.cache_dtype]
            np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(self.n_rows, width))
        barrier()  # the file exists (with several ranks, one folder they all see)
        data = np.load(tmp, mmap_mode="r+", allow_pickle=False)
        mine = range(rank, self.n_chunks, world)  # the ranks fill their chunks in parallel
        with progress_bar(len(mine), "activations", enabled=len(mine) >= 8 and rank == 0) as bar:
            for chunk in mine:
                a, b = self._chunk_rows(chunk)
                data[a:b] = self._chunk(chunk).numpy()
                bar.update(1)
        data.flush()
        del data
        barrier()  # every chunk written
        if rank == 0:
            tmp.replace(path)
            write_text_atomically(header_path, json.dumps(header, indent=2) + "\n")  # complete
        barrier()
        self._memmap = np.load(path, mmap_mode="r", allow_pickle=False)
        return path

    def rank_share(self) -> RankShare:
        """This rank's share of every batch, for data-parallel training: with ``W`` ranks of a
        ``torch.distributed`` process group, batches of ``batch_size / W`` rows that together
        are this store's batches, as :func:`~mechkit.sae.train_sae` reads a tensor. Each rank
        reads the whole store, so give it a ``cache_dir`` (the ranks fill it in parallel once).

        Example:
            >>> model = mk.load_model("attn-only-2l")
            >>> store = ActivationStore(model, "blocks.0.hook_resid_post",
            ...                         torch.randint(1, 500, (4, 9)), batch_size=8)
            >>> share = store.rank_share()                # one process: the whole batches
            >>> share.batch_size, next(share.iter_batches()).shape
            (8, torch.Size([8, 128]))
        """
        rank, world = rank_and_world()
        if self.batch_size % world:
            raise ShapeError(
                f"Expected the store's batch_size to split evenly over the {world} ranks; got "
                f"{self.batch_size}. Hint: a batch_size that is a multiple of {world}."
            )
        return RankShare(self, rank, world)

    # -- batches -------------------------------------------------------------------------------

    def _split(self, rows: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        if self.out_hook_name is None:
            return rows
        return rows[:, : self.d_in], rows[:, self.d_in :]

    def _epoch(self, epoch: int) -> Iterator[Tensor | tuple[Tensor, Tensor]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.n_chunks, generator=g).tolist()
        pool: Tensor | None = None
        half = self.buffer_size // 2
        for chunk in order:
            rows = self._chunk(chunk)
            pool = rows if pool is None else torch.cat([pool, rows])
            while pool.shape[0] >= self.buffer_size:
                pool = pool[torch.randperm(pool.shape[0], generator=g)]
                for start in range(0, half, self.batch_size):
                    yield self._split(pool[start : start + self.batch_size])
                pool = pool[half:]
        if pool is not None and pool.shape[0]:
            pool = pool[torch.randperm(pool.shape[0], generator=g)]
            for start in range(0, pool.shape[0], self.batch_size):
                yield self._split(pool[start : start + self.batch_size])

    def iter_batches(self, start: int = 0) -> Iterator[Tensor | tuple[Tensor, Tensor]]:
        """Batches from global batch index ``start`` on, through endless epochs.

        Resuming at ``start`` replays the current epoch's order and skips the first batches
        (cheap from the cache; without one the skipped chunks are recomputed).
        """
        self.build_cache()
        epoch, index = divmod(start, self.batches_per_epoch)
        while True:
            for i, batch in enumerate(self._epoch(epoch)):
                if i >= index:
                    yield batch
            epoch, index = epoch + 1, 0

    def epoch(self, epoch: int = 0) -> Iterator[Tensor | tuple[Tensor, Tensor]]:
        """The batches of one epoch (every activation exactly once)."""
        self.build_cache()
        return self._epoch(epoch)

    def __iter__(self) -> Iterator[Tensor | tuple[Tensor, Tensor]]:
        return self.iter_batches(0)

    def __repr__(self) -> str:
        out = f", out_hook_name={self.out_hook_name!r}" if self.out_hook_name else ""
        return (
            f"ActivationStore({self.hook_name!r}{out}, rows={self.n_rows}, d_in={self.d_in}, "
            f"batch_size={self.batch_size}, cache={self.cache_dir and str(self.cache_dir)})"
        )


class RankShare:
    """One rank's rows of each batch of an :class:`ActivationStore`
    (:meth:`ActivationStore.rank_share`): ``batch_size`` is the rows per rank.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> store = ActivationStore(model, "blocks.0.hook_resid_post",
        ...                         torch.randint(1, 500, (4, 9)), batch_size=8)
        >>> share = RankShare(store, rank=1, world=2)        # as rank 1 of 2 would read it
        >>> bool((next(share.iter_batches()) == next(iter(store))[4:]).all())
        True
    """

    def __init__(self, store: ActivationStore, rank: int, world: int) -> None:
        self.store, self.rank, self.world = store, rank, world
        self.batch_size = store.batch_size // world
        self.d_in, self.d_out = store.d_in, store.d_out
        self.hook_name, self.out_hook_name = store.hook_name, store.out_hook_name

    def iter_batches(self, start: int = 0) -> Iterator[Tensor | tuple[Tensor, Tensor]]:
        """This rank's rows of the store's batches from global batch index ``start`` on. A
        short last batch of an epoch is split as evenly as it goes (the ranks' mean gradients
        then weigh its rows slightly unevenly: make the store's rows a multiple of
        ``batch_size`` for exactly one process's training)."""
        for batch in self.store.iter_batches(start):
            whole = batch if isinstance(batch, Tensor) else batch[0]
            size = -(-whole.shape[0] // self.world)
            rows = slice(self.rank * size, (self.rank + 1) * size)
            yield batch[rows] if isinstance(batch, Tensor) else (batch[0][rows], batch[1][rows])

    def __iter__(self) -> Iterator[Tensor | tuple[Tensor, Tensor]]:
        return self.iter_batches(0)

    def __repr__(self) -> str:
        return f"RankShare({self.store!r}, rank={self.rank}, world={self.world})"


# ----------------------------------------------------------------------------------------------
# A larger offline corpus
# ----------------------------------------------------------------------------------------------


def stdlib_documents(split: Literal["train", "test", "all"] = "all") -> list[str]:
    """The source files of Python's standard library, sorted by path (tests and IDLE excluded).

    The split is by file: every fifth file in sorted order is held out (``"test"``).

    Example:
        >>> docs = stdlib_documents("test")            # every fifth file of the stdlib
        >>> len(docs) > 10, isinstance(docs[0], str)
        (True, True)
    """
    check_choice("split", split, ["train", "test", "all"])
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("test", "tests", "idle_test", "idlelib", "site-packages", "dist-packages", "turtledemo")
    files = sorted(
        p for p in root.rglob("*.py") if not any(part in skip for part in p.relative_to(root).parts)
    )
    if split == "test":
        files = files[::5]
    elif split == "train":
        files = [p for i, p in enumerate(files) if i % 5]
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


def sae_corpus_tokens(
    model: Model,
    *,
    seq_len: int = 128,
    split: Literal["train", "test"] = "train",
    max_tokens: int | None = None,
    seed: int | None = 0,
) -> Int[Tensor, "n seq_len"]:
    """Token sequences from the Python reference docs followed by the stdlib's sources.

    Documents are tokenized in a fixed order until ``max_tokens`` are gathered, joined with
    EOS, cut into ``seq_len`` windows (BOS first when the model prepends one) and shuffled with
    ``seed``. Both parts are split by document, so ``"test"`` shares no document with
    ``"train"``.

    Example:
        >>> model = mk.load_model("smollm2-135m")          # a real tokenizer is needed
        >>> sae_corpus_tokens(model, seq_len=32, max_tokens=2000).shape   # (n, seq_len)
        torch.Size([62, 32])
    """
    tokenizer = tokenizer_of(model)
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    stream: list[int] = []
    docs = corpus_documents(split)
    stdlib = None
    i = 0
    while max_tokens is None or len(stream) < max_tokens:
        if i == len(docs):
            if stdlib is not None:
                break
            stdlib = stdlib_documents(split)
            docs, i = docs + stdlib, i
            if i == len(docs):
                break
        stream.extend(tokenizer.encode(docs[i], add_special_tokens=False))
        stream.append(sep)
        i += 1
    if max_tokens is not None:
        stream = stream[:max_tokens]
    prefix = [tokenizer.bos_token_id] if model.cfg.default_prepend_bos else []
    width = seq_len - len(prefix)
    n = len(stream) // width
    if n == 0:
        raise EmptyDatasetError(f"Expected at least {width} tokens; got {len(stream)}.")
    windows = torch.tensor(stream[: n * width], dtype=torch.long).reshape(n, width)
    if prefix:
        windows = torch.cat([torch.full((n, 1), prefix[0], dtype=torch.long), windows], dim=1)
    if seed is not None:
        windows = windows[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]
    return windows
