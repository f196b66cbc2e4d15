"""Data-parallel ``train_sae`` on 2 gloo ranks (CPU processes started by
:func:`mechkit.distributed.spawn`) against one process: for each architecture (relu, jumprelu,
topk, batchtopk, and a topk transcoder), 2 ranks with batch B/2 end with the parameters of one
process with batch B. The settings make every global statistic matter: dead latents appear
within a few steps (AuxK uses them), BatchTopK's top ``k * B`` is batch-wide, the normalisation
and the decoder bias come from the first global batch. A 2-rank run stopped mid-way (as if
killed) resumes from rank 0's checkpoint on 2 ranks and on 1 process to the uninterrupted result.
The collectives themselves are checked against their definitions on one process in their
doctests.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from mechkit.distributed import spawn
from mechkit.errors import TrainConfigError
from mechkit.sae import SAEConfig, TrainConfig, train_sae

# every test starts two process ranks (torch.multiprocessing spawn): outside make test-fast
pytestmark = pytest.mark.slow

B = 64  # global batch
TOL = 2e-5

CONFIGS = {
    "relu": SAEConfig(architecture="relu", d_in=16, d_sae=48, hook_name="h"),
    "jumprelu": SAEConfig(architecture="jumprelu", d_in=16, d_sae=48, hook_name="h"),
    "topk": SAEConfig(architecture="topk", d_in=16, d_sae=48, k=4, hook_name="h"),
    "batchtopk": SAEConfig(architecture="batchtopk", d_in=16, d_sae=48, k=4, hook_name="h"),
    "transcoder": SAEConfig(
        architecture="topk", d_in=16, d_sae=48, k=4, hook_name="h", d_out=12, out_hook_name="o"
    ),
}


def _data(name: str):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 16, generator=g) * torch.linspace(0.2, 3.0, 16) + 1.0
    if CONFIGS[name].is_transcoder:
        return x, torch.tanh(x @ torch.randn(16, 12, generator=g))
    return x


def _train(name: str, batch_size: int, checkpoint_dir=None, stop=None):
    cfg = TrainConfig(
        total_tokens=12 * B,  # 12 steps
        batch_size=batch_size,
        lr=3e-3,
        log_every=2,
        checkpoint_every=4,
        dead_after_tokens=B,  # dead after one step without firing: AuxK from the start
        aux_k=8,
        progress=False,
        calibration_batches=2,
    )
    return train_sae(
        CONFIGS[name], _data(name), cfg, checkpoint_dir=checkpoint_dir, stop_after_steps=stop
    )


def _save(trained, path: Path) -> None:
    save_file({k: v.contiguous() for k, v in trained.sae.state_dict().items()}, str(path))


def _ranks(rank: int, world: int, out: str) -> None:
    """What each rank runs: every architecture at B / world, then a stopped and resumed run."""
    folder = Path(out)
    for name in CONFIGS:
        trained = _train(name, B // world)
        if rank == 0:
            _save(trained, folder / f"{name}.safetensors")
            (folder / f"{name}.dead").write_text(str(trained.result.final["dead"]))
    stopped = folder / "stopped"
    _train("batchtopk", B // world, checkpoint_dir=stopped, stop=6)  # checkpoint at step 4
    dist.barrier()
    if rank == 0:
        shutil.copytree(stopped, folder / "for_one_process")
    dist.barrier()
    resumed = _train("batchtopk", B // world, checkpoint_dir=stopped)
    if rank == 0:
        _save(resumed, folder / "resumed.safetensors")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ddp")
    spawn(_ranks, 2, str(folder))
    return folder


def _check_equal(path: Path, trained) -> None:
    ranks = load_file(str(path))
    one = trained.sae.state_dict()
    assert ranks.keys() == one.keys()
    for key, value in one.items():
        torch.testing.assert_close(ranks[key], value, atol=TOL, rtol=TOL, msg=key)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_ranks_at_half_the_batch_equal_one_process(two_ranks, name):
    one = _train(name, B)
    _check_equal(two_ranks / f"{name}.safetensors", one)
    if name in ("topk", "batchtopk", "transcoder"):  # AuxK saw dead latents on both paths
        assert max(row["dead"] for row in one.result.history) > 0
    # and it differs from what a rank alone would learn on its half-batches
    alone = _train(name, B // 2)
    assert not torch.allclose(alone.sae.W_enc, one.sae.W_enc, atol=1e-3)


def test_a_stopped_two_rank_run_resumes_on_two_ranks_and_on_one(two_ranks, tmp_path):
    one = _train("batchtopk", B)
    _check_equal(two_ranks / "resumed.safetensors", one)
    folder = tmp_path / "ckpt"
    shutil.copytree(two_ranks / "for_one_process", folder)
    resumed_alone = _train("batchtopk", B, checkpoint_dir=folder)
    assert resumed_alone.result.history[0]["step"] == 2  # the history came from the checkpoint
    torch.testing.assert_close(resumed_alone.sae.W_dec, one.sae.W_dec, atol=TOL, rtol=TOL)
    with pytest.raises(TrainConfigError, match="global batch"):
        _train("batchtopk", B // 2, checkpoint_dir=tmp_path / "ckpt")
