"""Training sparse dictionaries: seeded, resumable, with the usual schedule and bookkeeping.

:func:`train_sae` trains any registered architecture (SAE, transcoder or skip transcoder) on
batches of activations: an :class:`~mechkit.sae.activations.ActivationStore`, an in-memory
tensor (or an ``(inputs, targets)`` pair for transcoders), or any iterable of ``(batch, d_in)``
tensors or ``(x, y)`` pairs. One step:

1. scale the batch by a constant fixed at the start, so that ``E||x|| = sqrt(d_in)`` (the
   normalisation of Anthropic's April 2024 update and of the JumpReLU paper; the constants are
   folded back into the weights at the end, so the result takes raw activations);
2. the architecture's loss (:meth:`SparseDictionary.training_step`): reconstruction plus an L1
   (relu), L0 (jumprelu) or AuxK (topk, batchtopk) term;
3. Adam, with a linear learning-rate warm-up and a linear decay to zero over the last part of
   training, and a linear warm-up of the sparsity coefficient; decoder rows kept at unit norm
   where the method asks for it.

The decoder bias starts at the mean or geometric median of the first batch's targets. Dead
latents (none fired within ``dead_after_tokens``) are tracked as tensors and only read back on
logging steps, so there is no host sync per step. A progress bar shows live L0 and explained
variance. With ``checkpoint_dir``, the full state (weights, optimizer, step, scale, dead-latent
counters, history, data position, RNG) is written atomically every ``checkpoint_every`` steps,
and a later call with the same folder resumes from it; the result equals an uninterrupted run.

    >>> from mechkit.sae import SAEConfig, TrainConfig
    >>> cfg = SAEConfig(architecture="topk", d_in=64, d_sae=256, k=8, hook_name="blocks.0.mlp")
    >>> trained = train_sae(cfg, torch.randn(20_000, 64), TrainConfig(total_tokens=40_000,
    ...                     batch_size=1000, progress=False))
    >>> trained.sae.W_dec.shape, trained.result.to_dataframe().columns[:3].tolist()
    (torch.Size([256, 64]), ['step', 'tokens', 'lr'])
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor

from mechkit.atomic_io import write_atomically
from mechkit.core.progress import progress_bar
from mechkit.distributed.data_parallel import (
    any_rank,
    average_gradients,
    broadcast_module,
    gather_rows,
    global_sum,
    rank_and_world,
)
from mechkit.errors import SAEConfigError, ShapeError, TrainConfigError, did_you_mean
from mechkit.reading import read_checkpoint, reading
from mechkit.sae.activations import RankShare
from mechkit.sae.base import SAEConfig, SparseDictionary

__all__ = ["TrainConfig", "TrainResult", "TrainedSAE", "train_sae", "default_lr"]

CHECKPOINT_FILENAME = "checkpoint.pt"


def default_lr(cfg: SAEConfig) -> float:
    """The default Adam learning rate for ``cfg`` (on normalised activations).

    TopK/BatchTopK: ``2e-4 / sqrt(d_sae / 2**14)`` (Gao et al. 2024's scaling rule); ReLU and
    JumpReLU: ``4e-4`` (a short-run value; Anthropic and DeepMind use 5e-5 and 7e-5 over
    billions of tokens).

    Example:
        >>> from mechkit.sae import SAEConfig
        >>> default_lr(SAEConfig(architecture="topk", d_in=8, d_sae=2**14, k=4, hook_name="h"))
        0.0002
    """
    if cfg.architecture in ("topk", "batchtopk"):
        return 2e-4 / math.sqrt(cfg.d_sae / 2**14)
    return 4e-4


#: default sparsity coefficients on normalised activations (relu: L1, jumprelu: L0)
DEFAULT_SPARSITY = {"relu": 5.0, "jumprelu": 1.0}


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """How a sparse dictionary is trained (what it *is* lives in :class:`SAEConfig`).

    Attributes:
        total_tokens: activations (rows) to train on; steps = total_tokens / batch_size.
        batch_size: rows per step for tensor data (a store or iterator brings its own batches).
        lr: peak Adam learning rate; None: :func:`default_lr`.
        adam_betas: Adam's betas.
        lr_warmup_fraction: share of steps for the linear warm-up from 0.
        lr_decay_fraction: share of steps, at the end, for the linear decay to 0.
        sparsity_coefficient: L1 (relu) or L0 (jumprelu) weight; None: 5.0 / 1.0. Unused by
            topk and batchtopk, whose sparsity is ``k``.
        sparsity_warmup_fraction: share of steps over which that weight rises from 0.
        aux_k: dead latents used by AuxK (Gao et al.: 512).
        aux_coefficient: AuxK's weight (Gao et al.: 1/32).
        dead_after_tokens: a latent is dead when it has not fired for this many rows.
        b_dec_init: decoder-bias start: the first batch's ``"geometric_median"``, ``"mean"``,
            or ``"zeros"``.
        normalize_activations: train on activations scaled to ``E||x|| = sqrt(d_in)`` (folded
            into the weights at the end).
        seed: weights' initialisation (the data order is the data source's seed).
        log_every: steps between history rows (and host reads of the metrics).
        checkpoint_every: steps between checkpoints when a folder is given (a multiple of
            ``log_every``).
        device: where to train; None: the dictionary's device.
        autocast: bf16 autocast on CUDA (ignored on CPU).
        progress: show a tqdm bar with live L0 and explained variance.
        calibration_batches: batches read again after training for what the final weights
            decide (BatchTopK's inference threshold); 0 or a one-pass iterable: none.

    Example:
        >>> cfg = TrainConfig(total_tokens=4096, batch_size=256, progress=False)
        >>> cfg.total_tokens // cfg.batch_size                       # steps
        16
    """

    total_tokens: int = 2_000_000
    batch_size: int = 4096
    lr: float | None = None
    adam_betas: tuple[float, float] = (0.9, 0.999)
    lr_warmup_fraction: float = 0.02
    lr_decay_fraction: float = 0.2
    sparsity_coefficient: float | None = None
    sparsity_warmup_fraction: float = 0.05
    aux_k: int = 512
    aux_coefficient: float = 1 / 32
    dead_after_tokens: int = 1_000_000
    b_dec_init: Literal["geometric_median", "mean", "zeros"] = "geometric_median"
    normalize_activations: bool = True
    seed: int = 0
    log_every: int = 25
    checkpoint_every: int = 100
    device: str | None = None
    autocast: bool = True
    progress: bool = True
    calibration_batches: int = 32  # ~0.1 s each at width 2304; enough for a stable mean

    def __post_init__(self) -> None:
        for name in ("total_tokens", "batch_size", "aux_k", "dead_after_tokens", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise TrainConfigError(f"Expected {name} to be a positive int; got {value!r}.")
        if isinstance(self.calibration_batches, bool) or not (
            isinstance(self.calibration_batches, int) and self.calibration_batches >= 0
        ):
            raise TrainConfigError(
                f"Expected calibration_batches to be an int >= 0; got {self.calibration_batches!r}."
            )
        if self.lr is not None and not self.lr > 0:
            raise TrainConfigError(f"Expected lr > 0 (or None for the default); got {self.lr}.")
        for name in ("lr_warmup_fraction", "lr_decay_fraction", "sparsity_warmup_fraction"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise TrainConfigError(f"Expected {name} in [0, 1]; got {value!r}.")
        if self.lr_warmup_fraction + self.lr_decay_fraction > 1:
            raise TrainConfigError(
                "Expected lr_warmup_fraction + lr_decay_fraction <= 1; got "
                f"{self.lr_warmup_fraction} + {self.lr_decay_fraction}."
            )
        if self.sparsity_coefficient is not None and self.sparsity_coefficient < 0:
            raise TrainConfigError(
                f"Expected sparsity_coefficient >= 0; got {self.sparsity_coefficient}."
            )
        if self.b_dec_init not in ("geometric_median", "mean", "zeros"):
            raise TrainConfigError(
                "Expected b_dec_init 'geometric_median', 'mean' or 'zeros'; got "
                f"{self.b_dec_init!r}."
                + did_you_mean(str(self.b_dec_init), ["geometric_median", "mean", "zeros"])
            )
        if self.checkpoint_every <= 0 or self.checkpoint_every % self.log_every:
            raise TrainConfigError(
                f"Expected checkpoint_every to be a positive multiple of log_every "
                f"({self.log_every}); got {self.checkpoint_every}. Hint: checkpoints are taken "
                "on logging steps."
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, eq=False)
class TrainResult:
    """The training history and final figures.

    Attributes:
        history: one dict per logging window: step, tokens, lr, loss, mse, sparsity, l0,
            explained_variance, dead (latents), seconds (since the start, resumed runs
            included).
        tokens: rows trained on.
        seconds: wall-clock time of the training (all runs of a resumed training).
        sae_config, train_config: what was trained, how.
        scale_in, scale_out: the normalisation constants folded into the weights.

    Example:
        >>> from mechkit.sae import SAEConfig
        >>> cfg = SAEConfig(architecture="topk", d_in=16, d_sae=64, k=4, hook_name="blocks.0.mlp")
        >>> train = TrainConfig(total_tokens=4096, batch_size=256, progress=False)
        >>> result = train_sae(cfg, torch.randn(4096, 16), train).result
        >>> int(result.to_dataframe()["step"].iloc[-1])             # one row per logging window
        16
    """

    history: list[dict[str, float]]
    tokens: int
    seconds: float
    sae_config: SAEConfig
    train_config: TrainConfig
    scale_in: float
    scale_out: float

    @property
    def final(self) -> dict[str, float]:
        """The last logging window's row (empty before the first)."""
        return dict(self.history[-1]) if self.history else {}

    def summary(self) -> dict[str, Any]:
        """Tokens, time and the final L0, explained variance, MSE and dead latents."""
        last = self.final
        return {
            "tokens": self.tokens,
            "seconds": round(self.seconds, 1),
            "tokens_per_second": round(self.tokens / max(self.seconds, 1e-9), 1),
            "final_l0": last.get("l0"),
            "final_explained_variance": last.get("explained_variance"),
            "final_mse_normalized": last.get("mse"),
            "dead_latents": last.get("dead"),
        }

    def to_dataframe(self) -> Any:
        """The history as a pandas DataFrame, one row per logging window."""
        import pandas as pd

        return pd.DataFrame(self.history)

    def plot(self) -> Any:
        """Loss, L0 and explained variance against tokens (a plotly figure)."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        df = self.to_dataframe()
        fig = make_subplots(rows=1, cols=3, subplot_titles=("MSE", "L0", "explained variance"))
        for col, name in enumerate(("mse", "l0", "explained_variance"), start=1):
            if name in df:
                fig.add_trace(go.Scatter(x=df["tokens"], y=df[name], name=name), row=1, col=col)
        fig.update_xaxes(title_text="tokens")
        fig.update_layout(
            title=f"{self.sae_config.architecture} on {self.sae_config.hook_name}",
            showlegend=False,
        )
        return fig


class TrainedSAE(NamedTuple):
    """What :func:`train_sae` returns: the dictionary and the training record.

    Example:
        >>> from mechkit.sae import SAEConfig
        >>> cfg = SAEConfig(architecture="relu", d_in=16, d_sae=64, hook_name="blocks.0.mlp")
        >>> sae, result = train_sae(cfg, torch.randn(2048, 16),
        ...                         TrainConfig(total_tokens=2048, batch_size=256, progress=False))
        >>> type(sae).__name__, int(result.to_dataframe()["step"].iloc[-1])
        ('ReLUSAE', 8)
    """

    sae: SparseDictionary
    result: TrainResult


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


class _TensorBatches:
    """In-memory activations (or input/target pairs), a seeded permutation per epoch."""

    def __init__(self, x: Tensor, y: Tensor | None, batch_size: int, seed: int) -> None:
        if x.ndim != 2 or (y is not None and (y.ndim != 2 or y.shape[0] != x.shape[0])):
            raise ShapeError(
                "Expected activations as a (rows, d_in) tensor, or an (inputs, targets) pair of "
                f"(rows, d_in) and (rows, d_out) tensors; got {tuple(x.shape)}"
                f"{'' if y is None else ' and ' + str(tuple(y.shape))}."
            )
        self.x, self.y, self.batch_size, self.seed = x, y, batch_size, seed
        self.batches_per_epoch = math.ceil(x.shape[0] / batch_size)

    def iter_batches(self, start: int = 0) -> Iterator[Tensor | tuple[Tensor, Tensor]]:
        epoch, index = divmod(start, self.batches_per_epoch)
        while True:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.x.shape[0], generator=g)
            for b in range(index, self.batches_per_epoch):
                rows = order[b * self.batch_size : (b + 1) * self.batch_size]
                yield self.x[rows] if self.y is None else (self.x[rows], self.y[rows])
            epoch, index = epoch + 1, 0


def _batches(data: Any, cfg: TrainConfig, start: int, shard: bool = True) -> Iterator[Any]:
    """An iterator over batches from global batch index ``start`` on. With several ranks a
    tensor's global batches have ``batch_size * world`` rows and each rank reads its own
    ``batch_size`` of them (``shard=False``: the whole global batches)."""
    rank, world = rank_and_world()
    if isinstance(data, Tensor):
        data = (data, None)
    if (
        isinstance(data, tuple)
        and len(data) == 2
        and isinstance(data[0], Tensor)
        and (data[1] is None or isinstance(data[1], Tensor))
    ):
        batches = _TensorBatches(data[0], data[1], cfg.batch_size * world, cfg.seed)
        it = batches.iter_batches(start)
        if world == 1 or not shard:
            return it
        rows = slice(rank * cfg.batch_size, (rank + 1) * cfg.batch_size)
        return (b[rows] if isinstance(b, Tensor) else (b[0][rows], b[1][rows]) for b in it)
    if isinstance(data, RankShare) and not shard:  # a rank's share: the whole global batches
        return data.store.iter_batches(start)
    if hasattr(data, "iter_batches"):
        return data.iter_batches(start)
    if isinstance(data, Iterable):
        it = iter(data)
        for _ in range(start):  # a plain iterable can only be replayed
            next(it)
        return it
    raise TrainConfigError(
        "Expected activations as an ActivationStore, a (rows, d_in) tensor, an (inputs, "
        f"targets) tensor pair, or an iterable of batches; got {type(data).__name__}."
    )


def _replayable(data: Any) -> bool:
    """Whether the activations can be read again (not a plain one-pass iterable)."""
    return isinstance(data, Tensor | tuple) or hasattr(data, "iter_batches")


def _check_source(data: Any, cfg: SAEConfig) -> None:
    """A store's widths and hooks against the dictionary's, before any step."""
    d_in = getattr(data, "d_in", None)
    if d_in is not None and d_in != cfg.d_in:
        raise ShapeError(
            f"Expected activations of width d_in={cfg.d_in} for the dictionary; got width {d_in} "
            f"at {getattr(data, 'hook_name', '?')!r}. Hint: set d_in to the hook's width."
        )
    if hasattr(data, "out_hook_name") and (data.out_hook_name is None) == cfg.is_transcoder:
        wanted = "input/output pairs (out_hook_name set)" if cfg.is_transcoder else "single"
        kind = "a transcoder" if cfg.is_transcoder else "an SAE"
        raise ShapeError(
            f"Expected {wanted} activations for {kind}; got a store with out_hook_name="
            f"{data.out_hook_name!r}. Hint: match the store to SAEConfig.d_out/out_hook_name."
        )
    d_out = getattr(data, "d_out", None)
    if cfg.is_transcoder and d_out is not None and d_out != cfg.d_out:
        raise ShapeError(
            f"Expected targets of width d_out={cfg.d_out}; got {d_out} at {data.out_hook_name!r}."
        )


def _split(batch: Any, cfg: SAEConfig) -> tuple[Tensor, Tensor | None]:
    if isinstance(batch, (tuple, list)):
        if len(batch) != 2:
            raise ShapeError(f"Expected a batch x or a pair (x, y); got {len(batch)} items.")
        x, y = batch
    else:
        x, y = batch, None
    if x.ndim != 2 or x.shape[-1] != cfg.d_in:
        raise ShapeError(
            f"Expected input batches of shape (batch, {cfg.d_in}) (d_in); got {tuple(x.shape)}."
            f" Hint: is the data from {cfg.hook_name!r}?"
        )
    if cfg.is_transcoder:
        if y is None or y.shape != (x.shape[0], cfg.d_out):
            got = "no targets" if y is None else tuple(y.shape)
            raise ShapeError(
                f"Expected (x, y) pairs with y of shape (batch, {cfg.d_out}) for a transcoder "
                f"predicting {cfg.out_hook_name!r}; got {got}. Hint: give the ActivationStore "
                "out_hook_name=..."
            )
    elif y is not None:
        raise ShapeError(
            "Expected single batches for an SAE (it reconstructs its input); got (x, y) pairs. "
            "Hint: set d_out and out_hook_name in SAEConfig to train a transcoder."
        )
    return x, y


# ----------------------------------------------------------------------------------------------
# Schedules and initialisation
# ----------------------------------------------------------------------------------------------


def _lr_factor(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up from 0, constant, then linear decay to 0 over the last part."""
    warm = int(cfg.lr_warmup_fraction * total)
    decay = int(cfg.lr_decay_fraction * total)
    if warm and step < warm:
        return (step + 1) / warm
    if decay and step >= total - decay:
        return max(total - step, 0) / decay
    return 1.0


def _sparsity_factor(step: int, total: int, cfg: TrainConfig) -> float:
    warm = int(cfg.sparsity_warmup_fraction * total)
    return min(1.0, (step + 1) / warm) if warm else 1.0


def geometric_median(
    points: Float[Tensor, "n d"], *, iterations: int = 100, tol: float = 1e-6
) -> Float[Tensor, " d"]:
    """The point minimising the summed Euclidean distance to ``points`` (Weiszfeld's method)."""
    points = points.double()
    median = points.mean(0)
    for _ in range(iterations):
        dist = (points - median).norm(dim=-1).clamp_min(1e-12)
        weights = 1.0 / dist
        new = (weights[:, None] * points).sum(0) / weights.sum()
        if (new - median).norm() <= tol * (1 + median.norm()):
            median = new
            break
        median = new
    return median.float()


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


def _make_optimizer(sae: SparseDictionary, lr: float, cfg: TrainConfig) -> torch.optim.Adam:
    try:
        return torch.optim.Adam(sae.parameters(), lr=lr, betas=cfg.adam_betas, fused=True)
    except (RuntimeError, TypeError):  # pragma: no cover - devices without fused Adam
        return torch.optim.Adam(sae.parameters(), lr=lr, betas=cfg.adam_betas)


def train_sae(
    sae: SparseDictionary | SAEConfig,
    activations: Any,
    cfg: TrainConfig | None = None,
    *,
    checkpoint_dir: str | Path | None = None,
    stop_after_steps: int | None = None,
) -> TrainedSAE:
    """Train a sparse dictionary; returns ``TrainedSAE(sae, result)``.

    Data parallel: called on every rank of an initialised ``torch.distributed`` process group
    (``torchrun``, or :func:`mechkit.distributed.spawn`), each rank trains on ``batch_size``
    rows of every global batch of ``batch_size * world`` rows (a tensor's rows are split by
    rank; a store or iterable must give each rank its own shard), gradients are averaged, and
    the batch-wide statistics are global (:mod:`mechkit.distributed.data_parallel`): W ranks
    at ``batch_size = B / W`` compute what one process does at ``B``. Rank 0 writes the
    checkpoints; they resume on any number of ranks with the same global batch.

    Args:
        sae: a dictionary to train in place, or a config (initialised with ``cfg.seed``).
        activations: an ActivationStore, a ``(rows, d_in)`` tensor, an ``(inputs, targets)``
            pair for transcoders, or an iterable of batches (``x`` or ``(x, y)``).
        cfg: how to train.
        checkpoint_dir: folder for checkpoints; an existing checkpoint there is resumed.
        stop_after_steps: stop (as if killed, no checkpoint written) after this many steps of
            this call; a later call with the same ``checkpoint_dir`` resumes. For tests and for
            training in sessions.

    Returns:
        The trained dictionary (normalisation folded in; takes raw activations) and a
        :class:`TrainResult`. A stopped call returns the state so far, unfolded scale included
        in the result (``scale_in``/``scale_out``) but not in the weights.

    Example:
        >>> from mechkit.sae import SAEConfig, TrainConfig
        >>> model = mk.load_model("attn-only-2l")
        >>> store = mk.sae.ActivationStore(model, "blocks.0.hook_resid_post",
        ...                                torch.randint(1, 500, (64, 32)), batch_size=256)
        >>> cfg = SAEConfig(architecture="topk", d_in=128, d_sae=256, k=8,
        ...                 hook_name="blocks.0.hook_resid_post")
        >>> trained = train_sae(cfg, store, TrainConfig(total_tokens=4096, progress=False))
        >>> 0 < trained.result.summary()["final_explained_variance"] < 1
        True
    """
    cfg = cfg or TrainConfig()
    if isinstance(sae, SAEConfig):
        sae = SparseDictionary.from_config(sae, seed=cfg.seed)
    if not isinstance(sae, SparseDictionary):
        raise SAEConfigError(
            f"Expected a SparseDictionary or an SAEConfig; got {type(sae).__name__}."
        )
    scfg = sae.cfg
    _check_source(activations, scfg)
    rank, world = rank_and_world()
    device = torch.device(cfg.device) if cfg.device else sae.W_enc.device
    sae.to(device=device, dtype=torch.float32)  # master weights in float32
    broadcast_module(sae)  # every rank starts from rank 0's weights
    batch_size = getattr(activations, "batch_size", cfg.batch_size) * world  # global rows
    total_steps = max(1, math.ceil(cfg.total_tokens / batch_size))
    lr = cfg.lr if cfg.lr is not None else default_lr(scfg)
    coefficient = cfg.sparsity_coefficient
    if coefficient is None:
        coefficient = DEFAULT_SPARSITY.get(scfg.architecture, 0.0)
    optimizer = _make_optimizer(sae, lr, cfg)
    use_autocast = cfg.autocast and device.type == "cuda"

    state: dict[str, Any] = {
        "step": 0,
        "tokens": 0,
        "seconds": 0.0,
        "scale_in": None,
        "scale_out": None,
        "since_fired": torch.zeros(scfg.d_sae, dtype=torch.long, device=device),
        "dead": torch.zeros(scfg.d_sae, dtype=torch.bool, device=device),
        "n_dead": 0,
        "history": [],
        "global_batch": batch_size,
    }
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_FILENAME if checkpoint_dir else None
    if ckpt_path is not None and ckpt_path.is_file():
        _load_checkpoint(ckpt_path, sae, optimizer, state, scfg, cfg, device)

    batches = _batches(activations, cfg, state["step"])
    window = _Window(device)
    progress = progress_bar(
        total_steps,
        "train_sae",
        enabled=cfg.progress and rank == 0,
        unit="step",
        initial=state["step"],
        leave=True,
    )
    started = time.perf_counter()
    steps_this_call = 0
    try:
        while state["step"] < total_steps:
            if stop_after_steps is not None and steps_this_call >= stop_after_steps:
                break
            try:
                batch = next(batches)
            except StopIteration:
                raise TrainConfigError(
                    f"Expected data for {total_steps} steps; the iterable ended after "
                    f"{state['step']}. Hint: lower total_tokens or give an ActivationStore, "
                    "which cycles epochs."
                ) from None
            x, y = _split(batch, scfg)
            x = x.to(device=device, dtype=torch.float32, non_blocking=True)
            y = x if y is None else y.to(device=device, dtype=torch.float32, non_blocking=True)
            if state["scale_in"] is None:  # first batch: normalisation and decoder bias
                _initialise_from_batch(sae, x, y, cfg, state)
            x = x * state["scale_in"]
            y = x if not scfg.is_transcoder else y * state["scale_out"]
            step = state["step"]
            for group in optimizer.param_groups:
                group["lr"] = lr * _lr_factor(step, total_steps, cfg)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
                out = sae.training_step(
                    x,
                    y,
                    coefficient=coefficient * _sparsity_factor(step, total_steps, cfg),
                    dead=state["dead"],
                    n_dead=state["n_dead"],
                    aux_k=cfg.aux_k,
                    aux_coefficient=cfg.aux_coefficient,
                )
            out.loss.backward()
            average_gradients(sae)  # one process: nothing to do
            sae.before_optimizer_step()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sae.after_optimizer_step()

            rows = x.shape[0] * world
            since = state["since_fired"]
            fired = any_rank(out.fired)
            state["since_fired"] = torch.where(fired, torch.zeros_like(since), since + rows)
            window.add(out, y, x.shape[0])
            state["step"] = step + 1
            state["tokens"] += rows
            steps_this_call += 1
            progress.update(1)
            last = state["step"] == total_steps
            if state["step"] % cfg.log_every == 0 or last:
                state["dead"] = state["since_fired"] >= cfg.dead_after_tokens
                state["n_dead"] = int(state["dead"].sum())
                row = window.read(state, optimizer.param_groups[0]["lr"])
                row["seconds"] = state["seconds"] + time.perf_counter() - started
                state["history"].append(row)
                if progress is not None:
                    progress.set_postfix(
                        l0=f"{row['l0']:.1f}",
                        ev=f"{row['explained_variance']:.3f}",
                        dead=state["n_dead"],
                    )
                due = state["step"] % cfg.checkpoint_every == 0 or last
                if ckpt_path is not None and rank == 0 and due:  # rank 0 alone writes
                    elapsed = state["seconds"] + time.perf_counter() - started
                    _save_checkpoint(ckpt_path, sae, optimizer, {**state, "seconds": elapsed})
    finally:
        progress.close()
    state["seconds"] += time.perf_counter() - started

    result = TrainResult(
        history=list(state["history"]),
        tokens=state["tokens"],
        seconds=state["seconds"],
        sae_config=scfg,
        train_config=cfg,
        scale_in=float(state["scale_in"] or 1.0),
        scale_out=float(state["scale_out"] or 1.0),
    )
    if state["step"] >= total_steps:
        sae.fold_input_scale(result.scale_in, result.scale_out)
        sae.to(dtype=scfg.torch_dtype)
        if cfg.calibration_batches and _replayable(activations):  # on global batches
            sae.calibrate(_batches(activations, cfg, 0, shard=False), cfg.calibration_batches)
            broadcast_module(sae)  # ranks reading their own stores calibrate apart: take rank 0's
    return TrainedSAE(sae, result)


@torch.no_grad()
def _initialise_from_batch(
    sae: SparseDictionary, x: Tensor, y: Tensor, cfg: TrainConfig, state: dict[str, Any]
) -> None:
    """Scale constants from the first (global) batch, and the decoder bias from its targets."""
    x, y = gather_rows(x), gather_rows(y)  # one process: unchanged
    if cfg.normalize_activations:
        state["scale_in"] = math.sqrt(x.shape[-1]) / float(x.norm(dim=-1).mean().clamp_min(1e-12))
        state["scale_out"] = (
            math.sqrt(y.shape[-1]) / float(y.norm(dim=-1).mean().clamp_min(1e-12))
            if sae.cfg.is_transcoder
            else state["scale_in"]
        )
    else:
        state["scale_in"] = state["scale_out"] = 1.0
    target = y * state["scale_out"]
    if cfg.b_dec_init == "mean":
        sae.b_dec.copy_(target.mean(0))
    elif cfg.b_dec_init == "geometric_median":
        sae.b_dec.copy_(geometric_median(target))


class _Window:
    """Sums of the step metrics over one logging window, kept as tensors until read."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        self.sq_err, self.var, self.loss, self.sparsity, self.l0 = (zero.clone() for _ in "12345")
        self.rows = 0
        self.steps = 0

    @torch.no_grad()
    def add(self, out: Any, y: Tensor, rows: int) -> None:
        self.sq_err += out.mse.double() * rows
        self.var += (y - y.mean(0)).pow(2).sum().double()
        self.loss += out.loss.detach().double()
        self.sparsity += out.sparsity.double()
        self.l0 += out.l0.double() * rows
        self.rows += rows
        self.steps += 1

    def read(self, state: dict[str, Any], lr: float) -> dict[str, float]:
        stacked = torch.stack([self.sq_err, self.var, self.loss, self.sparsity, self.l0])
        world = rank_and_world()[1]
        sq_err, var, loss, sparsity, l0 = (global_sum(stacked) / world).tolist()  # rank means
        row = {
            "step": state["step"],
            "tokens": state["tokens"],
            "lr": lr,
            "loss": loss / self.steps,
            "mse": sq_err / self.rows,
            "sparsity": sparsity / self.steps,
            "l0": l0 / self.rows,
            "explained_variance": 1.0 - sq_err / max(var, 1e-30),
            "dead": state["n_dead"],
        }
        self.reset()
        return row


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------


def _save_checkpoint(
    path: Path, sae: SparseDictionary, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    payload = {
        "sae_config": sae.cfg.to_dict(),
        "sae": sae.state_dict(),
        "optimizer": optimizer.state_dict(),
        "state": state,
        "torch_rng": torch.get_rng_state(),
    }
    write_atomically(path, lambda tmp: torch.save(payload, tmp))


def _load_checkpoint(
    path: Path,
    sae: SparseDictionary,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    scfg: SAEConfig,
    cfg: TrainConfig,
    device: torch.device,
) -> None:
    # weights_only: a checkpoint is data; one whose unpickling would build or call anything
    # else (a planted file) is refused before it runs.
    what = "a train_sae checkpoint"
    hint = f"delete {path} (or pass another checkpoint_dir) to start afresh."
    payload = read_checkpoint(path, what, hint, map_location=device)
    with reading(path, what, hint):
        if payload["sae_config"] != scfg.to_dict():
            raise TrainConfigError(
                f"Expected a checkpoint of the same dictionary ({scfg.to_dict()}); got "
                f"{payload['sae_config']} in {path}. Hint: use another checkpoint_dir."
            )
        sae.load_state_dict(payload["sae"])
        optimizer.load_state_dict(payload["optimizer"])
        saved = payload["state"].get("global_batch", state["global_batch"])
        if saved != state["global_batch"]:
            raise TrainConfigError(
                f"Expected the checkpoint's global batch ({saved} rows: batch_size x ranks) "
                f"to resume; this run's is {state['global_batch']}. Hint: choose batch_size "
                f"so that batch_size x ranks = {saved}, on any number of ranks."
            )
        state.update(payload["state"])
        torch.set_rng_state(payload["torch_rng"])
