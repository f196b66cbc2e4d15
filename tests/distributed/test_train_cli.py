"""``torchrun -m mechkit.sae.train``: the command line on 2 gloo ranks (a real ``torchrun``
subprocess) ends with the dictionary the Python API trains in one process at the same global
batch; the ranks' parallel fill of the activation cache writes the file a serial fill writes;
``--resume`` continues a checkpoint and an existing one is not overwritten without it; a 2-rank
run whose rank 0 is killed (SIGKILL) after a checkpoint leaves no process behind and resumes to
the uninterrupted run's dictionary.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mechkit.sae import ActivationStore, SAEConfig, TrainConfig, load_sae, train_sae
from mechkit.sae.activations import RankShare
from mechkit.sae.batchtopk import BatchTopKSAE
from mechkit.sae.train import main
from tests.conftest import process_alive

ROOT = Path(__file__).resolve().parents[2]
HOOK = "blocks.0.hook_resid_post"
B, STEPS = 32, 6  # 256 rows: 8 global batches of 32 per epoch, none short
TOL = 2e-5


def _tokens() -> torch.Tensor:
    return torch.randint(1, 500, (16, 17), generator=torch.Generator().manual_seed(3))


def _args(folder: Path, *extra: str) -> list[str]:
    tokens = folder / "tokens.safetensors"
    if not tokens.exists():
        save_file({"tokens": _tokens()}, str(tokens))
    return [
        "--model", "attn-only-2l", "--hook", HOOK, "--architecture", "batchtopk",
        "--d-sae", "64", "--k", "4", "--tokens", str(tokens), "--batch-size", str(B),
        "--steps", str(STEPS), "--log-every", "2", "--checkpoint-every", "2",
        "--model-batch-size", "4", "--lr", "3e-3", "--quiet", *extra,
    ]  # fmt: skip


def _api(toy, cache_dir: Path | None = None, checkpoint_dir: Path | None = None, stop=None,
         steps: int = STEPS):  # fmt: skip
    """The Python API in this process: a store at the global batch, train_sae."""
    store = ActivationStore(toy, HOOK, _tokens(), batch_size=B, model_batch_size=4,
                            cache_dir=cache_dir)  # fmt: skip
    cfg = SAEConfig(architecture="batchtopk", d_in=128, d_sae=64, k=4, hook_name=HOOK)
    train = TrainConfig(total_tokens=steps * B, batch_size=B, lr=3e-3, log_every=2,
                        checkpoint_every=2, progress=False)  # fmt: skip
    trained = train_sae(cfg, store, train, checkpoint_dir=checkpoint_dir, stop_after_steps=stop)
    return store, trained


def _check_same(folder: Path, trained) -> None:
    saved = load_sae(folder).state_dict()
    for key, value in trained.sae.state_dict().items():
        torch.testing.assert_close(saved[key], value, atol=TOL, rtol=TOL, msg=key)


@pytest.mark.slow  # two torchrun ranks in subprocesses
def test_torchrun_on_two_ranks_equals_the_api_and_fills_the_cache_in_parallel(tmp_path, toy):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node=2", "-m", "mechkit.sae.train",
               *_args(tmp_path, "--checkpoint-dir", str(tmp_path / "ckpt"),
                      "--out", str(tmp_path / "sae"))]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    store, trained = _api(toy, tmp_path / "serial")
    _check_same(tmp_path / "sae", trained)
    # the cache the 2 ranks filled (2 chunks each) is the serial fill's, byte for byte
    parallel = np.load(tmp_path / "ckpt" / "activations" / "activations.npy")
    serial = np.load(store.build_cache())
    assert parallel.shape == serial.shape == (256, 128)
    assert np.array_equal(parallel, serial)


def test_resume_continues_a_stopped_run_and_no_checkpoint_is_overwritten_without_it(
    tmp_path, toy, monkeypatch
):
    _, trained = _api(toy)
    _api(toy, checkpoint_dir=tmp_path / "ckpt", stop=4)  # stopped as if killed after step 4
    args = _args(tmp_path, "--checkpoint-dir", str(tmp_path / "ckpt"), "--out", str(tmp_path))
    assert main(args) == 2  # a checkpoint is there and --resume was not given
    steps = []
    step = BatchTopKSAE.training_step
    monkeypatch.setattr(
        BatchTopKSAE, "training_step", lambda *a, **k: steps.append(1) or step(*a, **k)
    )
    assert main([*args, "--resume"]) == 0
    assert len(steps) == STEPS - 4  # it continued from the checkpoint
    _check_same(tmp_path, trained)  # to the uninterrupted run's dictionary


@pytest.mark.parametrize("world", [2, 4])
def test_each_rank_reads_its_share_of_every_batch(toy, world):
    store = ActivationStore(toy, HOOK, _tokens(), batch_size=B, model_batch_size=4)
    shares = [RankShare(store, rank, world).iter_batches(3) for rank in range(world)]
    for whole in (b for _, b in zip(range(10), store.iter_batches(3), strict=False)):
        parts = [next(share) for share in shares]
        assert all(p.shape[0] == B // world for p in parts)
        assert torch.equal(torch.cat(parts), whole)


KILL_STEPS = 120  # long enough that the run is still going when the first checkpoint appears


def _ranks_of(agent: int) -> dict[int, int]:
    """``{rank: pid}`` of the worker processes torchrun's elastic agent ``agent`` started."""
    ranks = {}
    for proc in Path("/proc").iterdir():
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == agent:
            rank = [v for v in environ if v.startswith(b"RANK=")]
            ranks[int(rank[0][5:])] = int(proc.name)
    return ranks


@pytest.mark.slow  # two torchrun runs of 2 ranks in subprocesses, one killed
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the ranks' processes in /proc")
def test_a_two_rank_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_result(
    tmp_path, toy
):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

    def torchrun(name: str, *extra: str) -> list[str]:
        args = _args(tmp_path, "--out", str(tmp_path / name), *extra)
        args[args.index("--steps") + 1] = str(KILL_STEPS)
        args[args.index("--checkpoint-every") + 1] = "10"
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node=2", "-m", "mechkit.sae.train", *args]  # fmt: skip

    ckpt = tmp_path / "ckpt"
    agent = subprocess.Popen(torchrun("sae", "--checkpoint-dir", str(ckpt)), env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    ranks: dict[int, int] = {}
    try:
        deadline = time.monotonic() + 120
        while not (ckpt / "checkpoint.pt").exists():  # rank 0 wrote the step-10 checkpoint
            assert agent.poll() is None, agent.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.01)
        ranks = _ranks_of(agent.pid)
        assert sorted(ranks) == [0, 1]
        os.kill(ranks[0], signal.SIGKILL)  # the rank that writes the checkpoints
        agent.wait(timeout=60)
    finally:
        if agent.poll() is None:  # never leave the agent or its ranks behind
            for pid in _ranks_of(agent.pid).values():
                os.kill(pid, signal.SIGKILL)
            agent.kill()
            agent.wait()
    assert agent.returncode != 0  # the agent saw the failed rank and gave up
    # and tore the other rank down with it: no process of the run is left
    deadline = time.monotonic() + 10
    while any(process_alive(pid) for pid in ranks.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(process_alive(pid) for pid in ranks.values()), ranks
    assert not (tmp_path / "sae").exists()  # it did not finish
    before = torch.load(ckpt / "checkpoint.pt", weights_only=True)["state"]
    assert 0 < before["step"] < KILL_STEPS

    resumed = subprocess.run(torchrun("sae", "--checkpoint-dir", str(ckpt), "--resume"),
                             capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # it continued the checkpoint: the history up to the kill is the killed run's, timings
    # included (a run started afresh would have timed its first steps anew)
    after = torch.load(ckpt / "checkpoint.pt", weights_only=True)["state"]
    assert after["step"] == KILL_STEPS
    assert after["history"][: len(before["history"])] == before["history"]
    _, uninterrupted = _api(toy, steps=KILL_STEPS)  # one process at the global batch
    _check_same(tmp_path / "sae", uninterrupted)
