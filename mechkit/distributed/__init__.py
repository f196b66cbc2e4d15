"""Beyond one machine: patching sweeps on a Ray cluster and data-parallel SAE training.

=====================================  ============================================================
:class:`RayExecutor`                   tasks on long-lived Ray actors that each load the model once
                                       (``mechkit sweep --ray``, ``run_sweep(executor=...)``)
:class:`InlineExecutor`                the same tasks run in this process, one after another
                                       (examples, debugging, no cluster)
:func:`require_ray`                    Ray, or an error with the install command
:mod:`~.data_parallel`                 ``train_sae`` on ``torch.distributed`` ranks (gloo, NCCL):
                                       averaged gradients, global batch statistics;
                                       :func:`spawn` starts local CPU ranks
=====================================  ============================================================

Ray is optional (``pip install 'mechkit[ray]'``): ``import mechkit`` never imports it.
"""

from mechkit.distributed.data_parallel import rank_and_world, spawn
from mechkit.distributed.ray_executor import (
    InlineExecutor,
    ModelWorker,
    RayExecutor,
    require_ray,
)

__all__ = ["InlineExecutor", "ModelWorker", "RayExecutor", "rank_and_world", "require_ray", "spawn"]
