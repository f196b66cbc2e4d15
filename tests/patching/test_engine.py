"""The staircase runner behind activation and path patching, against a plain loop of hooked
forward passes (one full run per patch, each edit applied to the whole activation).

Two small models in float64: the shipped toy (attention only, learned positions) and a tiny
random one with rotary positions, grouped key/value heads and MLPs, so that the cached key/value
prefix and every block's hooks are exercised.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

import mechkit as mk
from mechkit.patching import engine

TOL = dict(atol=1e-9, rtol=1e-9)


@pytest.fixture(scope="module")
def toy64():
    return mk.load_model("attn-only-2l", device="cpu", dtype="float64")


@pytest.fixture(scope="module")
def rotary():
    cfg = HookedTransformerConfig(
        n_layers=3, d_model=32, n_heads=4, n_key_value_heads=2, d_head=8, d_mlp=64, d_vocab=50,
        n_ctx=16, act_fn="gelu", normalization_type="RMS", positional_embedding_type="rotary",
        rotary_dim=8, seed=0, dtype=torch.float64,
    )  # fmt: skip
    return HookedTransformer(cfg).eval()


def _tokens(model, batch=3, seq=10, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, model.cfg.d_vocab, (batch, seq), generator=generator)


def _full_metric(logits):
    """A plain callable: reads every position, like TransformerLens's patching metrics."""
    return logits[:, 2:].log_softmax(-1)[..., 7].mean()


def _edits(model):
    """Jobs touching several hooks, layers and starts, with a matching naive hook list each."""
    n = model.cfg.n_layers
    jobs = []

    def zero_head_from(p, h):  # z: (batch, pos, head, d_head)
        return lambda rows, first: rows[:, p - first :, h].zero_()

    def add_to_resid_from(p, scale):  # resid_pre: (batch, pos, d_model)
        direction = torch.linspace(-1, 1, model.cfg.d_model, dtype=model.cfg.dtype)
        return lambda rows, first: rows[:, p - first :].add_(scale * direction)

    def scale_v_at(p, g):  # v: (batch, pos, kv head, d_head), one position only
        return lambda rows, first: rows[:, p - first, g].mul_(3.0)

    def flatten_pattern_from(p, h):  # pattern: (batch, head, query pos, key pos)
        def edit(rows, first):
            sub = rows[:, h, p - first :]
            causal = sub > 0
            sub.copy_(causal / causal.sum(-1, keepdim=True))

        return edit

    jobs.append(engine.PatchJob("z0", 0, 3, {"blocks.0.attn.hook_z": zero_head_from(3, 1)}))
    jobs.append(
        engine.PatchJob("res1", 1, 5, {"blocks.1.hook_resid_pre": add_to_resid_from(5, 2.0)})
    )
    jobs.append(
        engine.PatchJob("v-at-0", n - 1, 0, {f"blocks.{n - 1}.attn.hook_v": scale_v_at(0, 0)})
    )
    jobs.append(
        engine.PatchJob(
            "pattern", n - 1, 4, {f"blocks.{n - 1}.attn.hook_pattern": flatten_pattern_from(4, 2)}
        )
    )
    jobs.append(  # two edits in two blocks, one job
        engine.PatchJob(
            "two",
            0,
            2,
            {
                "blocks.0.attn.hook_z": zero_head_from(2, 0),
                f"blocks.{n - 1}.hook_resid_pre": add_to_resid_from(6, -1.5),
            },
        )
    )
    jobs.append(  # the same layer and start as another job: they share a batch
        engine.PatchJob("z0-again", 0, 3, {"blocks.0.attn.hook_z": zero_head_from(3, 3)})
    )
    if not model.cfg.attn_only:
        jobs.append(
            engine.PatchJob(
                "mlp",
                1,
                7,
                {"blocks.1.hook_mlp_out": lambda rows, first: rows[:, 7 - first :].mul_(0.0)},
            )
        )
    return jobs


def _naive_logits(model, tokens, job):
    """One full forward with the job's edits applied to the whole activation (first = 0)."""

    with torch.no_grad(), model.hooks(fwd_hooks=[(n, _hook(e)) for n, e in job.edits.items()]):
        return model(tokens)


def _hook(edit):
    """A TransformerLens hook applying ``edit`` to a copy of the whole activation."""

    def hook(act, hook):
        out = act.clone()
        edit(out, 0)
        return out

    return hook


def _run_all(model, base, jobs, reader, budget):
    results = {}
    for chunk in engine.run_jobs(model, base, jobs, reader, budget=budget):
        for result in chunk:
            assert result.key not in results  # each job runs once
            results[result.key] = result
    assert set(results) == {job.key for job in jobs}
    return results


@pytest.mark.parametrize("which", ["toy64", "rotary"])
def test_run_base_equals_run_with_cache(which, request):
    model = request.getfixturevalue(which)
    tokens = _tokens(model)
    names = {"blocks.0.attn.hook_z", "blocks.1.hook_resid_pre"}
    base = engine.run_base(model, tokens, names)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    torch.testing.assert_close(base.logits, logits, **TOL)
    assert base.batch == 3 and base.seq == 10
    assert set(base.acts) == names
    for name in names:
        torch.testing.assert_close(base.acts[name], cache[name], **TOL)
    for layer in range(model.cfg.n_layers):
        torch.testing.assert_close(base.resid_pre[layer], cache[f"blocks.{layer}.hook_resid_pre"])
        # what attention caches: keys before rotation (rotary models rotate them on use)
        torch.testing.assert_close(base.keys[layer], cache[f"blocks.{layer}.attn.hook_k"], **TOL)
        torch.testing.assert_close(base.values[layer], cache[f"blocks.{layer}.attn.hook_v"], **TOL)


@pytest.mark.parametrize("which", ["toy64", "rotary"])
@pytest.mark.parametrize("budget", [2 * 1024**3, 1])  # everything in one chunk; one job each
def test_staircase_scores_equal_one_forward_per_patch(which, budget, request):
    model = request.getfixturevalue(which)
    tokens = _tokens(model)
    jobs = _edits(model)
    base = engine.run_base(model, tokens)
    reader = engine.MetricReader(_full_metric, base)
    assert reader.full
    results = _run_all(model, base, jobs, reader, budget)
    for job in jobs:
        expected = _naive_logits(model, tokens, job)
        got = results[job.key]
        torch.testing.assert_close(got.score, _full_metric(expected).float(), atol=1e-5, rtol=0)
        assert got.per_prompt is None  # a plain callable returning a scalar
    # the edits matter: every job moves the score (otherwise the test could not fail)
    base_value = float(_full_metric(base.logits))
    assert all(abs(float(r.score) - base_value) > 1e-4 for r in results.values())


@pytest.mark.parametrize("which", ["toy64", "rotary"])
@pytest.mark.parametrize("budget", [2 * 1024**3, 1])
def test_answer_positions_read_only_those_logits(which, budget, request):
    """A mechkit Metric is scored from the answer positions alone; an answer before a job's
    start keeps the base run's logits."""
    model = request.getfixturevalue(which)
    tokens = _tokens(model)
    positions = torch.tensor([9, 4, 1])  # the last, one inside most jobs' range, one before all
    metric = mk.LogitDiff(torch.tensor([5, 6, 7]), torch.tensor([8, 9, 10]), positions)
    base = engine.run_base(model, tokens)
    reader = engine.MetricReader(metric, base)
    assert not reader.full and reader.positions.tolist() == [9, 4, 1]
    value, per_prompt = engine.base_score(reader, base)
    with torch.no_grad():
        torch.testing.assert_close(per_prompt, metric.per_prompt(model(tokens)).float())
    jobs = _edits(model)
    results = _run_all(model, base, jobs, reader, budget)
    for job in jobs:
        expected = metric.per_prompt(_naive_logits(model, tokens, job)).float()
        torch.testing.assert_close(results[job.key].per_prompt, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(results[job.key].score, expected.mean(), atol=1e-5, rtol=0)
        if job.start > 1:  # prompt 2 answers at position 1, before the patch
            assert float(results[job.key].per_prompt[2]) == pytest.approx(float(per_prompt[2]))


def test_per_prompt_callable_is_averaged(toy64):
    tokens = _tokens(toy64)
    base = engine.run_base(toy64, tokens)

    def per_prompt(logits):
        return logits[:, -1, 3] - logits[:, -1, 4]

    reader = engine.MetricReader(per_prompt, base)
    value, rows = engine.base_score(reader, base)
    torch.testing.assert_close(rows, per_prompt(base.logits).float())
    torch.testing.assert_close(value, rows.mean())


def test_capture_returns_the_suffix_of_the_patched_activation(rotary):
    tokens = _tokens(rotary)
    base = engine.run_base(rotary, tokens)
    reader = engine.MetricReader(_full_metric, base)
    zero = lambda rows, first: rows[:, 4 - first :, 1].zero_()  # noqa: E731
    captured_name = "blocks.1.hook_resid_post"  # inside the first two blocks
    scored = engine.PatchJob("scored", 0, 4, {"blocks.0.attn.hook_z": zero}, (captured_name,))
    only = engine.PatchJob("only", 0, 4, {"blocks.0.attn.hook_z": zero}, (captured_name,), stop=2)
    results = _run_all(rotary, base, [scored], reader, 2 * 1024**3)
    results |= _run_all(rotary, base, [only], reader, 2 * 1024**3)  # a run of capture-only jobs
    with torch.no_grad(), rotary.hooks(fwd_hooks=[("blocks.0.attn.hook_z", _hook(zero))]):
        logits, cache = rotary.run_with_cache(tokens, names_filter=captured_name)
    for result in results.values():
        first = result.captured_from
        assert first <= 4
        torch.testing.assert_close(result.captured[captured_name], cache[captured_name][:, first:])
    assert torch.isnan(results["only"].score) and results["only"].per_prompt is None
    torch.testing.assert_close(results["scored"].score, _full_metric(logits).float())


def test_plan_chunks_covers_every_job_once_in_layer_order(rotary):
    tokens = _tokens(rotary, batch=2, seq=12)
    base = engine.run_base(rotary, tokens)
    jobs = [
        engine.PatchJob((layer, start), layer, start, {})
        for start in range(12)
        for layer in range(3)
    ]
    for budget in [1, 10**5, 10**6, 2 * 1024**3]:
        chunks = engine.plan_chunks(rotary, base, list(jobs), budget, full_logits=False)
        keys = [job.key for chunk in chunks for job in chunk]
        assert sorted(keys) == sorted(job.key for job in jobs)
        for chunk in chunks:
            assert [j.layer for j in chunk] == sorted(j.layer for j in chunk)
        if budget == 1:
            assert all(len(chunk) == 1 for chunk in chunks)
    # a small model and short prompts: the start groups merge into one batch under a big budget
    assert len(engine.plan_chunks(rotary, base, list(jobs), 2 * 1024**3, False)) == 1
    # more memory never means more chunks
    sizes = [len(engine.plan_chunks(rotary, base, list(jobs), b, False)) for b in (10**5, 10**7)]
    assert sizes[0] >= sizes[1]


def test_out_of_memory_splits_the_chunk_and_retries(toy64, monkeypatch):
    tokens = _tokens(toy64)
    base = engine.run_base(toy64, tokens)
    reader = engine.MetricReader(_full_metric, base)
    jobs = _edits(toy64)
    expected = {k: r.score for k, r in _run_all(toy64, base, jobs, reader, 2 * 1024**3).items()}
    real = engine._run_chunk
    sizes = []

    def fails_when_big(model, base, chunk, reader):
        sizes.append(len(chunk))
        if len(chunk) > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, base, chunk, reader)

    monkeypatch.setattr(engine, "_run_chunk", fails_when_big)
    results = _run_all(toy64, base, jobs, reader, 2 * 1024**3)
    assert sizes[0] == len(jobs) and max(sizes[1:]) <= len(jobs) // 2 + 1
    for key, result in results.items():
        torch.testing.assert_close(result.score, expected[key])

    def always_fails(model, base, chunk, reader):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(engine, "_run_chunk", always_fails)
    with pytest.raises(mk.MechkitError, match="Out of memory running one patch"):
        _run_all(toy64, base, jobs, reader, 2 * 1024**3)

    def other_error(model, base, chunk, reader):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(engine, "_run_chunk", other_error)
    with pytest.raises(RuntimeError, match="shape mismatch"):  # not retried, not rewrapped
        _run_all(toy64, base, jobs, reader, 2 * 1024**3)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2GB", 2 * 1024**3),
        ("512MB", 512 * 1024**2),
        ("512 mib", 512 * 1024**2),
        ("1.5G", int(1.5 * 1024**3)),
        ("64K", 64 * 1024),
        ("1000", 1000),
        (4096, 4096),
    ],
)
def test_parse_budget(text, expected):
    assert engine.parse_budget(text, torch.device("cpu")) == expected


def test_parse_budget_default_and_bad_values():
    assert engine.parse_budget(None, torch.device("cpu")) == 2 * 1024**3
    for bad in ["lots", "GB", "", "2XB"]:
        with pytest.raises(mk.MechkitError, match="memory budget"):
            engine.parse_budget(bad, torch.device("cpu"))
    for bad in [0, -5, "0MB"]:
        with pytest.raises(mk.MechkitError, match="positive memory budget"):
            engine.parse_budget(bad, torch.device("cpu"))


def test_metric_reader_refuses_unbound_metrics(toy64):
    base = engine.run_base(toy64, _tokens(toy64))
    with pytest.raises(TypeError, match="Expected a metric"):
        engine.MetricReader(3.0, base)
    two = mk.LogitDiff(torch.tensor([1, 2]), torch.tensor([3, 4]), torch.tensor([9, 9]))
    with pytest.raises(mk.MechkitError, match="bound to the 3 prompts"):
        engine.MetricReader(two, base)
    outside = mk.LogitDiff(
        torch.tensor([1, 2, 3]), torch.tensor([3, 4, 5]), torch.tensor([9, 10, 0])
    )
    with pytest.raises(mk.MechkitError, match="answer positions inside the prompts"):
        engine.MetricReader(outside, base)
    reader = engine.MetricReader(lambda logits: logits[:, -1, :2], base)  # (batch, 2): no scalar
    with pytest.raises(mk.MechkitError, match="return a scalar"):
        engine.base_score(reader, base)


def test_metric_positions_sees_through_normalization():
    positions = torch.tensor([3, 4])
    metric = mk.LogitDiff(torch.tensor([1, 2]), torch.tensor([3, 4]), positions)
    normalized = mk.Normalized(metric, torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0]))
    assert engine.metric_positions(metric) is positions
    assert engine.metric_positions(normalized) is positions
    assert engine.metric_positions(mk.LogitDiff(torch.tensor([1]), torch.tensor([2]))) is None
    assert engine.metric_positions(lambda logits: logits.sum()) is False


def test_first_difference():
    a = torch.zeros(2, 6, 3)
    assert engine.first_difference(a, a.clone(), 1) is None
    b = a.clone()
    b[1, 4, 2] = 1.0
    b[0, 5, 0] = 1.0
    assert engine.first_difference(a, b, 1) == 4
    # the position axis need not be 1: (batch, head, pos)
    c, d = torch.zeros(2, 3, 7), torch.zeros(2, 3, 7)
    d[0, 2, 0] = -1.0
    assert engine.first_difference(c, d, 2) == 0


def test_check_supported_refuses_shortformer_and_several_devices():
    def fake(**cfg):
        base = {"positional_embedding_type": "standard", "n_devices": 1}
        return SimpleNamespace(cfg=SimpleNamespace(**(base | cfg)))

    engine.check_supported(fake())
    engine.check_supported(fake(positional_embedding_type="rotary"))
    with pytest.raises(mk.UnsupportedModelError, match="shortformer"):
        engine.check_supported(fake(positional_embedding_type="shortformer"))
    with pytest.raises(mk.UnsupportedModelError, match="n_devices=2"):
        engine.check_supported(fake(n_devices=2))
