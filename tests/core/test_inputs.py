"""resolve_contrast over every combination of direction, ablation, reference and input form,
against the vocabulary's rules written out here; reference_mean against a loop."""

from __future__ import annotations

import itertools

import pytest
import torch

import mechkit as mk
from mechkit.core import reference_mean, resolve_contrast

CLEAN = [[1, 2, 3, 4], [1, 5, 6, 7]]
CORRUPT = [[1, 8, 3, 4], [1, 9, 6, 7]]
REFERENCE = [[1, 11, 12, 13], [1, 14, 15, 16], [1, 17, 18, 19]]


def metric(logits):
    return logits[:, -1, 0].mean()


def _inputs(form):
    """(clean, corrupt, metric) for one input form."""
    if form == "pairs":
        pairs = mk.PromptPairs.from_tokens(CLEAN, CORRUPT, [3, 4], [5, 6])
        return pairs, None, None
    if form == "prompts":
        return torch.tensor(CLEAN), torch.tensor(CORRUPT), metric
    return torch.tensor(CLEAN), None, metric  # clean prompts only


def _expected(form, direction, ablation, reference):
    """What the module docstring's vocabulary says: an outcome, or the refusal's message."""
    ablation_ = ablation or "corrupt"
    direction_ = direction or ("denoising" if ablation_ == "corrupt" else "noising")
    if direction_ == "denoising" and ablation_ != "corrupt":
        return "Expected ablation='corrupt'"
    has_corrupt = form != "clean only"
    if ablation_ == "corrupt" and not has_corrupt:
        return "Expected corrupt prompts"
    if reference and ablation_ not in ("mean", "resample"):
        return "Expected reference=None"
    clean, corrupt = torch.tensor(CLEAN), torch.tensor(CORRUPT)
    base = corrupt if direction_ == "denoising" else clean
    source = {"denoising": clean, "noising": corrupt if ablation_ == "corrupt" else None}
    source = source[direction_]
    ref = None
    if ablation_ in ("mean", "resample"):
        ref = torch.tensor(REFERENCE) if reference else corrupt if has_corrupt else clean
    method = direction_ if ablation_ == "corrupt" else ablation_
    return direction_, ablation_, method, base, source, ref


COMBINATIONS = list(
    itertools.product(
        ["pairs", "prompts", "clean only"],
        [None, "denoising", "noising"],
        [None, "corrupt", "zero", "mean", "resample"],
        [False, True],
    )
)


def _same(a, b):
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


@pytest.mark.parametrize(("form", "direction", "ablation", "reference"), COMBINATIONS)
def test_resolve_contrast_follows_the_vocabulary(toy, form, direction, ablation, reference):
    clean, corrupt, m = _inputs(form)
    expected = _expected(form, direction, ablation, reference)
    call = lambda: resolve_contrast(  # noqa: E731
        toy, clean, corrupt, m, direction=direction, ablation=ablation,
        reference=torch.tensor(REFERENCE) if reference else None,
    )  # fmt: skip
    if isinstance(expected, str):
        with pytest.raises(mk.InvalidArgumentError, match=expected):
            call()
        return
    c = call()
    direction_, ablation_, method, base, source, ref = expected
    assert (c.direction, c.ablation, c.method) == (direction_, ablation_, method)
    assert _same(c.base_tokens, base) and _same(c.source_tokens, source)
    assert _same(c.reference_tokens, ref)
    assert (c.reference_mask is None) == (ref is None)
    assert c.pairs is (clean if form == "pairs" else None)
    assert isinstance(c.metric, mk.LogitDiff) if form == "pairs" else c.metric is metric


def test_resolve_contrast_refusals(toy):
    pairs = mk.PromptPairs.from_tokens(CLEAN, CORRUPT, [3, 4], [5, 6])
    clean, corrupt = torch.tensor(CLEAN), torch.tensor(CORRUPT)
    with pytest.raises(mk.InvalidArgumentError, match="Did you mean 'noising'"):
        resolve_contrast(toy, clean, corrupt, metric, direction="noisng")
    with pytest.raises(mk.InvalidArgumentError, match="Did you mean 'mean'"):
        resolve_contrast(toy, clean, corrupt, metric, ablation="maen")
    with pytest.raises(mk.InvalidArgumentError, match="ablation"):
        resolve_contrast(toy, clean, corrupt, metric, ablation="mean", ablations=("corrupt",))
    with pytest.raises(mk.InvalidArgumentError, match="corrupt=None when clean is a PromptPairs"):
        resolve_contrast(toy, pairs, corrupt)
    with pytest.raises(mk.InvalidTypeError, match="Expected a metric"):
        resolve_contrast(toy, clean, corrupt)
    with pytest.raises(mk.InvalidTypeError, match="Expected a metric"):
        resolve_contrast(toy, clean, corrupt, 3.0)
    with pytest.raises(mk.PromptLengthError, match="same shape"):
        resolve_contrast(toy, clean, corrupt[:, :3], metric)
    # unaligned corrupt prompts are fine where nothing is exchanged position for position
    c = resolve_contrast(toy, clean, corrupt[:, :3], metric, ablation="mean")
    assert c.reference_tokens.shape == (2, 3)
    assert resolve_contrast(toy, clean, corrupt[:, :3], metric, aligned=False).ablation == "corrupt"
    assert resolve_contrast(toy, clean, ablation="zero", needs_metric=False).metric is None
    with pytest.raises(mk.InvalidTokenError):
        resolve_contrast(toy, torch.tensor([[1, 10**6]]), ablation="zero", needs_metric=False)


def _loop_mean(values, mask, seq):
    """Per position when every prompt is real at every one of ``seq`` positions, else one mean
    over all real tokens: a loop over prompts and positions."""
    n, length = mask.shape
    if bool(mask.all()) and length == seq:
        return torch.stack([sum(values[i, p] for i in range(n)) / n for p in range(length)])[None]
    total, count = torch.zeros_like(values[0, 0]), 0
    for i in range(n):
        for p in range(length):
            if mask[i, p]:
                total, count = total + values[i, p], count + 1
    return (total / count)[None, None]


@pytest.mark.parametrize("case", ["per position", "padded", "other length"])
def test_reference_mean_equals_a_loop(case):
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(3, 5, 2, 4, generator=generator)  # (ref, ref_pos, head, d_head)
    mask = torch.ones(3, 5, dtype=torch.bool)
    seq = 5
    if case == "padded":
        mask[0, 3:] = False
        mask[2, 4:] = False
    if case == "other length":
        seq = 7
    ours = reference_mean(values, mask, seq)
    expected = _loop_mean(values, mask, seq)
    assert ours.shape == expected.shape
    assert torch.allclose(ours, expected, atol=1e-6)


def test_reference_mean_refuses_a_mask_of_another_shape():
    with pytest.raises(mk.ShapeError, match="one mask entry per reference prompt"):
        reference_mean(torch.zeros(3, 5, 2), torch.ones(3, 4, dtype=torch.bool), 5)
