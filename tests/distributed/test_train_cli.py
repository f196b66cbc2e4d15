"""``torchrun -m mechkit.sae.train``: the command line on 2 gloo ranks (a real ``torchrun``
subprocess) ends with the dictionary the Python API trains in one process at the same global
batch; the ranks' parallel fill of the activation cache writes the file a serial fill writes;
``--resume`` continues a checkpoint and an existing one is not overwritten without it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mechkit.sae import ActivationStore, SAEConfig, TrainConfig, load_sae, train_sae
from mechkit.sae.activations import RankShare
from mechkit.sae.batchtopk import BatchTopKSAE
from mechkit.sae.train import main

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


def _api(toy, cache_dir: Path | None = None, checkpoint_dir: Path | None = None, stop=None):
    """The Python API in this process: a store at the global batch, train_sae."""
    store = ActivationStore(toy, HOOK, _tokens(), batch_size=B, model_batch_size=4,
                            cache_dir=cache_dir)  # fmt: skip
    cfg = SAEConfig(architecture="batchtopk", d_in=128, d_sae=64, k=4, hook_name=HOOK)
    train = TrainConfig(total_tokens=STEPS * B, batch_size=B, lr=3e-3, log_every=2,
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
