"""Data parallelism with ``torch.distributed``: the collectives ``train_sae`` needs, and a launcher.

Training a sparse dictionary on ``W`` ranks (processes; one GPU each with NCCL, or CPU processes
with gloo) with a per-rank batch ``B / W`` is the same computation as one process with batch
``B``, as plain DDP is (EleutherAI's sparsify trains SAEs that way): every rank holds the same
weights, reads its own rows of each global batch, and its gradients are averaged over ranks
before the optimizer step (:func:`average_gradients`; the losses are means over rows, so the
average of the ranks' gradients is the gradient of the global batch). What depends on the whole
batch is computed globally: the normalisation constants and the decoder-bias start from the
first global batch (:func:`gather_rows`, :func:`global_sum`), which latents fired (dead-latent
tracking, :func:`any_rank`), BatchTopK's batch-wide top ``k * B`` (:func:`global_kth_largest`)
and its threshold's statistic (:func:`global_min`). With one process (or no process group) every
function here is the identity, so the single-process path runs unchanged.

:func:`spawn` starts ``W`` local CPU processes joined in a gloo group (what the tests and the
benchmark use); across machines use ``torchrun`` (see the "Scaling out" page).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

__all__ = [
    "any_rank",
    "average_gradients",
    "barrier",
    "gather_rows",
    "global_kth_largest",
    "global_min",
    "global_sum",
    "rank_and_world",
    "spawn",
]


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of ranks; ``(0, 1)`` without a process group.

    Example:
        >>> rank_and_world()
        (0, 1)
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def global_sum(tensor: Tensor) -> Tensor:
    """The sum of ``tensor`` over ranks (a new tensor; itself with one process).

    Example:
        >>> global_sum(torch.tensor([1.0, 2.0]))
        tensor([1., 2.])
    """
    if rank_and_world()[1] == 1:
        return tensor
    out = tensor.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def global_min(tensor: Tensor) -> Tensor:
    """The elementwise minimum of ``tensor`` over ranks.

    Example:
        >>> global_min(torch.tensor(3.0))
        tensor(3.)
    """
    if rank_and_world()[1] == 1:
        return tensor
    out = tensor.clone()
    dist.all_reduce(out, op=dist.ReduceOp.MIN)
    return out


def any_rank(mask: Tensor) -> Tensor:
    """A boolean mask true where it is true on any rank (which latents fired anywhere).

    Example:
        >>> any_rank(torch.tensor([True, False]))
        tensor([ True, False])
    """
    if rank_and_world()[1] == 1:
        return mask
    out = mask.to(torch.uint8)
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out.bool()


def gather_rows(x: Tensor) -> Tensor:
    """The ranks' ``(rows, ...)`` tensors (equal shapes) stacked in rank order: the global batch.

    Example:
        >>> gather_rows(torch.ones(2, 3)).shape
        torch.Size([2, 3])
    """
    world = rank_and_world()[1]
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def global_kth_largest(values: Tensor, k: int) -> Tensor:
    """The ``k``-th largest of the ranks' ``values`` together (1-D), without gathering them all:
    each rank sends only its own ``k`` largest, which hold the global top ``k``.

    Example:
        >>> global_kth_largest(torch.tensor([5.0, 1.0, 4.0, 2.0]), 2)
        tensor(4.)
    """
    local = values.topk(min(k, values.numel()), sorted=False).values
    world = rank_and_world()[1]
    if world > 1:  # pad to one length so all_gather can stack them
        padded = torch.full((k,), float("-inf"), dtype=values.dtype, device=values.device)
        padded[: local.numel()] = local
        local = gather_rows(padded)
    return local.topk(k, sorted=False).values.min()


@torch.no_grad()
def average_gradients(module: torch.nn.Module) -> None:
    """Average every parameter's gradient over ranks, in one flat all-reduce.

    Example:
        >>> layer = torch.nn.Linear(2, 1)
        >>> layer(torch.ones(1, 2)).sum().backward()
        >>> average_gradients(layer)  # one process: unchanged
        >>> layer.weight.grad
        tensor([[1., 1.]])
    """
    world = rank_and_world()[1]
    if world == 1:
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def barrier() -> None:
    """Wait until every rank got here (nothing with one process).

    Example:
        >>> barrier()
    """
    if rank_and_world()[1] > 1:
        dist.barrier()


@torch.no_grad()
def broadcast_module(module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (the same start everywhere)."""
    if rank_and_world()[1] == 1:
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_rank(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        # no rank leaves before all are done: rank 0 holds the group's store, and a rank that
        # had not yet joined it would fail
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _sum_of_ranks(rank: int, world: int, folder: str) -> None:
    """:func:`spawn`'s example: each rank writes ``sum over ranks of (rank + 1)`` to a file."""
    total = global_sum(torch.tensor(rank + 1.0))
    Path(folder, f"rank{rank}").write_text(f"{rank}/{world}: {total.item():g}")


def spawn(fn: Callable[..., Any], world: int, *args: Any) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` new CPU processes joined in a gloo group.

    ``fn`` must be importable (a module-level function); it returns nothing (write results to
    files). Raises when a rank fails.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:  # 1 + 2 summed over the 2 ranks
        ...     spawn(_sum_of_ranks, 2, folder)
        ...     sorted(path.read_text() for path in Path(folder).iterdir())
        ['0/2: 3', '1/2: 3']
    """
    mp.spawn(_run_rank, args=(world, _free_port(), fn, args), nprocs=world, join=True)
