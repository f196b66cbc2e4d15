"""Sweeps on a local Ray cluster (2 CPUs, 2 actors holding the toy model), checked against the
single-process run of the same config: same cells, same scores; an actor killed mid-run and a
driver interrupted mid-run still end with every cell in the journal exactly once; closing the
executor leaves no actor process. One cluster and one executor serve the whole module (starting
Ray and loading mechkit in each actor costs seconds).
"""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

import mechkit as mk
from mechkit.__main__ import main
from mechkit.distributed import RayExecutor
from mechkit.distributed.ray_executor import _pid
from mechkit.patching import sweep
from mechkit.patching.sweep import load_config, run_sweep
from mechkit.patching.sweep_remote import cells_task
from mechkit.sae import SAEConfig, SparseDictionary
from tests.conftest import process_alive

ray = pytest.importorskip("ray")

# a local Ray cluster and subprocess drivers: the whole module is outside make test-fast
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-5
RTOL = 1e-5  # the actors run one thread, this process may run more: sums in another order
N_KILLED = 12  # prompt pairs of the sweep whose driver is killed


def _config(folder: Path, n: int = 6, batch_size: int = 2) -> Path:
    """Two entries (12 resid_pre and 8 z cells per batch) over 6 prompt pairs in 3 batches."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "model": "attn-only-2l",
        "prompts": {"generator": "repeated_tokens", "n": n, "length": 3},
        "sweeps": [{"site": "resid_pre", "positions": "each"}, {"site": "z"}],
        "batch_size": batch_size,
        "device": "cpu",
    }
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _journal_cells(out: Path) -> list[tuple]:
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return [(r["entry"], r["batch"], tuple(r["cell"])) for r in records if r["kind"] == "cell"]


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster for this module, shut down at its end."""
    started = not ray.is_initialized()
    if started:
        # no worker killed by Ray's memory monitor when other work fills a shared machine:
        # the tests kill actors themselves, and a spurious kill would read as a failure
        os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
        ray.init(
            num_cpus=4,  # logical: the module's 2 actors and a subprocess driver's 2
            include_dashboard=False,
            object_store_memory=200_000_000,
            log_to_driver=False,
        )
    try:
        yield
    finally:
        if started:
            ray.shutdown()


@pytest.fixture(scope="module")
def executor(cluster):
    """Two CPU actors; each loads the toy model once, at the first sweep."""
    ex = RayExecutor(actors=2)
    try:
        yield ex
    finally:
        ex.close()


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """The single-process run, the reference of every Ray run here."""
    folder = tmp_path_factory.mktemp("local")
    return run_sweep(_config(folder), out=folder / "out", progress=False)


def _check_same(run, local) -> None:
    assert run.cells_total == local.cells_total
    for name, result in local.results.items():
        other = run.results[name]
        assert other.labels == result.labels
        torch.testing.assert_close(other.scores, result.scores, atol=TOL, rtol=RTOL)
        torch.testing.assert_close(other.per_prompt, result.per_prompt, atol=TOL, rtol=RTOL)


def test_ray_run_equals_the_single_process_run_with_each_cell_once(tmp_path, executor, local):
    run = run_sweep(_config(tmp_path), out=tmp_path / "out", progress=False, executor=executor)
    assert executor.size == 2 and len(set(executor.pids())) == 2
    _check_same(run, local)
    cells = _journal_cells(run.out)
    assert len(cells) == run.cells_total == run.cells_computed == 3 * (12 + 8)
    assert max(Counter(cells).values()) == 1
    # the same folder resumed by the single-process runner: nothing left to compute
    again = run_sweep(_config(tmp_path), out=tmp_path / "out", progress=False)
    assert again.cells_computed == 0


class _DriverKilled(Exception):
    pass


def test_a_driver_stopped_mid_run_resumes_with_each_cell_once(tmp_path, executor, local):
    journal_append = sweep.Journal.append
    written = []

    def dies_after_three_writes(self, records):
        if len(written) == 3:
            raise _DriverKilled  # as a kill between two journal writes
        written.append(len(records))
        journal_append(self, records)

    sweep.Journal.append = dies_after_three_writes
    try:
        with pytest.raises(_DriverKilled):
            run_sweep(_config(tmp_path), out=tmp_path / "out", progress=False, executor=executor)
    finally:
        sweep.Journal.append = journal_append
    before = len(_journal_cells(tmp_path / "out"))
    assert 0 < before < local.cells_total
    run = run_sweep(_config(tmp_path), out=tmp_path / "out", progress=False, executor=executor)
    assert run.cells_computed == run.cells_total - before
    _check_same(run, local)
    cells = _journal_cells(run.out)
    assert len(cells) == run.cells_total and max(Counter(cells).values()) == 1


def test_cli_ray_flag_sets_the_executor_and_address(tmp_path, monkeypatch):
    seen = {}

    def fake_run(config, **kwargs):
        seen["config"] = config
        raise KeyboardInterrupt  # stop here: only the parsing is checked

    monkeypatch.setattr("mechkit.__main__.run_sweep", fake_run)
    path = _config(tmp_path)
    assert main(["sweep", str(path), "--ray", "head:6379", "--actors", "3"]) == 130
    assert (seen["config"].executor, seen["config"].ray_address) == ("ray", "head:6379")
    assert seen["config"].actors == 3
    assert main(["sweep", str(path), "--ray"]) == 130
    assert (seen["config"].executor, seen["config"].ray_address) == ("ray", None)
    assert load_config(path).executor == "local"


def test_an_actor_killed_mid_run_loses_no_cell_and_writes_none_twice(
    tmp_path, executor, local, monkeypatch
):
    plain_map = executor.map

    def kill_after_first(model, fn, tasks, **kwargs):  # ray.kill one actor mid-run
        for n, item in enumerate(plain_map(model, fn, tasks, **kwargs)):
            yield item
            if n == 0 and fn is cells_task:
                ray.kill(executor._pool[0])

    monkeypatch.setattr(executor, "map", kill_after_first)
    run = run_sweep(_config(tmp_path), out=tmp_path / "out", progress=False, executor=executor)
    assert executor.size == 1  # the killed actor left the pool; its task ran on the other
    _check_same(run, local)
    cells = _journal_cells(run.out)
    assert len(cells) == run.cells_total and max(Counter(cells).values()) == 1


def test_activation_patch_on_the_executor_equals_the_local_call(toy, executor):
    pairs = mk.PromptPairs.from_tokens(
        [[0, 5, 6, 7, 5, 6], [0, 8, 9, 10, 8, 9], [0, 11, 12, 13, 11, 12], [0, 4, 3, 2, 4, 3]],
        [[0, 5, 6, 9, 5, 6], [0, 8, 9, 14, 8, 9], [0, 11, 12, 2, 11, 12], [0, 4, 3, 7, 4, 3]],
        [7, 10, 13, 2],
        [9, 14, 2, 7],
    )
    for kwargs in ({"site": "z"}, {"site": "resid_pre", "positions": "each", "batch_size": 2}):
        here = mk.activation_patch(toy, pairs, progress=False, **kwargs)
        there = mk.activation_patch(toy, pairs, progress=False, executor=executor, **kwargs)
        assert there.labels == here.labels
        torch.testing.assert_close(there.scores, here.scores, atol=TOL, rtol=RTOL)
    assert executor.size == 2  # a new pool: the actors now hold this model object


def _five_pairs() -> mk.PromptPairs:
    return mk.PromptPairs.from_tokens(
        [[0, 5, 6, 7, 5, 6], [0, 8, 9, 10, 8, 9], [0, 11, 12, 13, 11, 12], [0, 4, 3, 2, 4, 3],
         [0, 4, 8, 2, 4, 8]],
        [[0, 5, 6, 9, 5, 6], [0, 8, 9, 14, 8, 9], [0, 11, 12, 2, 11, 12], [0, 4, 3, 7, 4, 3],
         [0, 4, 9, 7, 4, 9]],
        [7, 10, 13, 2, 2],
        [9, 14, 2, 7, 7],
    )  # fmt: skip


def test_path_patch_batches_on_the_executor_equal_the_local_call(toy, executor):
    pairs = _five_pairs()  # batches of 2, 2, 1: three tasks on two actors
    for kwargs in ({}, {"receivers": [mk.Site("q", layer=1, head=0)], "ablation": "mean"}):
        here = mk.path_patch(toy, pairs, progress=False, **kwargs)
        there = mk.path_patch(toy, pairs, progress=False, batch_size=2, executor=executor, **kwargs)
        assert (there.axes, there.labels, there.method) == (here.axes, here.labels, here.method)
        torch.testing.assert_close(there.scores, here.scores, atol=TOL, rtol=RTOL)
        torch.testing.assert_close(there.per_prompt, here.per_prompt, atol=TOL, rtol=RTOL)
        assert abs(there.clean_score - here.clean_score) < TOL


def test_edge_attribution_batches_on_the_executor_equal_the_local_call(toy, executor):
    pairs = _five_pairs()
    for kwargs in ({"method": "eap", "ablation": "mean"}, {"method": "exact"}):
        here = mk.edge_attribution(toy, pairs, progress=False, **kwargs)
        there = mk.edge_attribution(toy, pairs, progress=False, batch_size=2, executor=executor,
                                    **kwargs)  # fmt: skip
        assert there.method == here.method and there.layout.senders == here.layout.senders
        assert here.scores.abs().max() > 0.1  # a nontrivial graph
        torch.testing.assert_close(there.scores, here.scores, atol=TOL, rtol=RTOL)
        assert abs(there.clean_score - here.clean_score) < TOL
        assert abs(there.ablated_score - here.ablated_score) < TOL


def test_feature_circuit_batches_on_the_executor_equal_the_local_call(toy, executor):
    torch.manual_seed(0)
    sae = SparseDictionary.from_config(
        SAEConfig(architecture="relu", d_in=128, d_sae=64, hook_name="blocks.0.hook_resid_post")
    )
    pairs = _five_pairs()
    here = mk.feature_circuit(toy, sae, pairs, latents_per_dictionary=3, progress=False)
    there = mk.feature_circuit(toy, sae, pairs, latents_per_dictionary=3, progress=False,
                               batch_size=2, executor=executor)  # fmt: skip
    assert [n.name for n in there.layout.senders] == [n.name for n in here.layout.senders]
    assert here.scores.abs().max() > 0.1
    torch.testing.assert_close(there.scores, here.scores, atol=TOL, rtol=RTOL)
    assert here.node_scores is not None and there.node_scores is not None
    for name, value in here.node_scores.items():
        assert abs(there.node_scores[name] - value) < TOL, name
    assert abs(there.clean_score - here.clean_score) < TOL


def test_a_sweep_driver_killed_with_sigkill_resumes_with_each_cell_once(tmp_path, executor):
    """A real ``mechkit sweep --ray`` subprocess on this cluster, SIGKILLed as soon as its
    journal holds a cell (24 tasks of one batch each: far from done), then resumed here."""
    config = _config(tmp_path, n=N_KILLED, batch_size=1)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    address = ray.get_runtime_context().gcs_address
    log = (tmp_path / "driver.log").open("w")  # a file: a full pipe would block the driver
    driver = subprocess.Popen(
        [sys.executable, "-m", "mechkit", "sweep", str(config), "--ray", address, "--actors",
         "2", "--out", str(out), "--no-progress"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    journal = out / "results.jsonl"
    deadline = time.monotonic() + 240
    try:
        while driver.poll() is None and time.monotonic() < deadline:
            if journal.exists() and '"kind":"cell"' in journal.read_text():
                break
            time.sleep(0.005)
        log.flush()
        assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
        os.kill(driver.pid, signal.SIGKILL)
    finally:
        driver.kill()
        driver.wait(timeout=30)
        log.close()
    assert driver.returncode == -signal.SIGKILL
    before = len(_journal_cells(out))
    local = run_sweep(_config(tmp_path / "local", n=N_KILLED, batch_size=1), out=tmp_path / "local"
                      / "out", progress=False)  # fmt: skip
    total = local.cells_total
    assert 0 < before < total
    run = run_sweep(config, out=out, progress=False, executor=executor)
    assert run.cells_total == total and run.cells_computed == total - before
    _check_same(run, local)
    cells = _journal_cells(out)
    assert len(cells) == total and max(Counter(cells).values()) == 1


def test_closing_the_executor_leaves_no_actor_process(cluster):
    # its own executor: the test neither depends on the module's tests that ran before it on
    # this worker nor closes the executor they share
    executor = RayExecutor(actors=2)
    try:
        # tasks the actors can import (a function of this test module they cannot)
        ran = {pid for _, pid in executor.map("attn-only-2l", _pid, [(), (), (), ()])}
        pids = executor.pids()
        assert len(pids) == 2 and ran <= set(pids), "two live actors ran the tasks"
    finally:
        executor.close()
    deadline = time.monotonic() + 20
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in pids if process_alive(p)]
        time.sleep(0.2)
    assert not alive, f"actor processes {alive} outlived close()"


def test_without_ray_mechkit_imports_and_asking_for_ray_names_the_install_command(
    tmp_path, monkeypatch, capsys
):
    # no mechkit module imports Ray when it is imported (read from the source: a fresh
    # interpreter to import mechkit in would cost more than the rest of this module)
    for path in sorted((ROOT / "mechkit").rglob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            assert not any(n == "ray" or n.startswith("ray.") for n in names), path
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    out = str(tmp_path / "out")
    assert main(["sweep", str(_config(tmp_path)), "--ray", "--out", out]) == 2
    assert "pip install 'mechkit[ray]'" in capsys.readouterr().err
    with pytest.raises(mk.errors.MissingDependencyError, match=r"mechkit\[ray\]"):
        mk.RayExecutor(actors=1).share(1)
