"""each_batch splits a batch that runs out of memory, prompts_per_pass refuses what cannot be
split, and the memory budget parser."""

from __future__ import annotations

import pytest
import torch

import mechkit as mk
from mechkit.core import check_budget, each_batch, is_out_of_memory, parse_budget, prompts_per_pass


def _oom_above(limit, seen, ran):
    def work(rows):
        seen.append((rows.start, rows.stop))
        if rows.stop - rows.start > limit:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        ran.append((rows.start, rows.stop))

    return work


@pytest.mark.parametrize(("n", "size"), [(7, None), (7, 4), (5, 3), (2, None), (1, None)])
def test_each_batch_splits_slices_that_run_out_of_memory(n, size):
    seen, ran = [], []
    each_batch(n, size, _oom_above(2, seen, ran))
    covered = [i for start, stop in ran for i in range(start, stop)]
    assert covered == list(range(n))  # every prompt once, in order
    assert all(stop - start <= 2 for start, stop in ran)
    first = min(size or n, n)
    assert seen[0] == (0, first)  # it tried the whole slice first


def test_each_batch_gives_up_on_one_prompt_and_passes_other_errors():
    def always(rows):
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(mk.OutOfMemoryError, match="1 prompt") as info:
        each_batch(4, None, always)
    assert isinstance(info.value, MemoryError)
    with pytest.raises(mk.OutOfMemoryError):
        each_batch(4, None, always, can_split=False)

    def broken(rows):
        raise RuntimeError("shapes do not match")

    with pytest.raises(RuntimeError, match="shapes do not match"):
        each_batch(4, None, broken)


def test_is_out_of_memory():
    assert is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory"))
    assert is_out_of_memory(torch.OutOfMemoryError("x"))
    assert not is_out_of_memory(RuntimeError("index out of range"))
    assert not is_out_of_memory(ValueError("out of memory"))


def test_prompts_per_pass_needs_a_mechkit_metric_to_split():
    metric = mk.LogitDiff(torch.tensor([1, 2]), torch.tensor([3, 4]))
    assert prompts_per_pass(5, None, lambda x: x) == 5
    assert prompts_per_pass(5, 2, metric) == 2
    with pytest.raises(mk.InvalidTypeError, match="mechkit Metric"):
        prompts_per_pass(5, 2, lambda x: x)
    with pytest.raises(mk.InvalidArgumentError):
        prompts_per_pass(5, 0, metric)


def test_parse_budget():
    assert parse_budget("512MB") == 512 * 1024**2
    assert parse_budget("2 GiB") == 2 * 1024**3
    assert parse_budget(1000) == 1000
    assert parse_budget(None) == 2 * 1024**3
    for bad in ("lots", "2XB", -1, 0, True):
        with pytest.raises(mk.InvalidArgumentError, match="memory budget"):
            parse_budget(bad)
    check_budget(None)
    with pytest.raises(ValueError, match="memory budget"):
        check_budget("lots")
