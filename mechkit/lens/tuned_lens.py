"""The tuned lens (Belrose et al. 2023, "Eliciting Latent Predictions from Transformers with the
Tuned Lens").

For each block ``l`` an affine translator maps the residual stream into the final layer's
basis before decoding: ``logits_l = unembed(norm_final(h_l + A_l h_l + b_l))``. ``A_l`` and
``b_l`` start at zero (the translator is the identity, i.e. the logit lens) and are trained to
minimise ``KL(p_final || p_lens_l)`` on token data, the model frozen. The final residual needs
no translator.

Training here: Adam with linear warm-up and decay (the paper's SGD-Nesterov recipe needs far
more tokens than a CPU budget allows), weight decay on ``A``, per-layer losses summed, the
residuals of a batch computed once and the unembedding applied one layer at a time so memory
stays at one layer's logits. Checkpoints (translators, optimizer, step, RNG) let a killed run
resume where it stopped, with the same result as an uninterrupted one.

Example:
    >>> model = mk.load_model("attn-only-2l")
    >>> _ = torch.manual_seed(0)
    >>> tokens = torch.randint(1, model.cfg.d_vocab, (8, 16))  # (batch, pos)
    >>> config = mk.lens.TunedLensConfig(steps=3, batch_size=2, warmup_steps=1)
    >>> lens = mk.train_tuned_lens(model, tokens, config, progress=False)
    >>> table = mk.lens.compare_lenses(model, tokens, lens)
    >>> table.layer_labels, table.logit_lens_kl.shape   # per layer, both lenses
    (('resid_pre 0', 'resid_pre 1', 'final'), torch.Size([3]))
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from mechkit.atomic_io import write_atomically
from mechkit.core.batching import each_batch
from mechkit.core.labels import model_name
from mechkit.core.progress import progress_bar
from mechkit.core.results import rank
from mechkit.core.types import Model
from mechkit.errors import InvalidArgumentError, InvalidSiteError, NonFiniteError
from mechkit.hook_scope import run_with_cache
from mechkit.lens.logit_lens import decode_residual, lens_layer_labels
from mechkit.reading import read_checkpoint, read_json, read_safetensors, reading
from mechkit.sites import Site

__all__ = ["TunedLens", "TunedLensConfig", "train_tuned_lens", "compare_lenses", "LensComparison"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class TunedLensConfig:
    """How a tuned lens is trained.

    Attributes:
        steps: optimizer steps.
        batch_size: sequences per step.
        lr: peak Adam learning rate (small: the translators start at the identity).
        warmup_steps: linear warm-up from 0 to ``lr``; then linear decay to 0.
        weight_decay: on the matrices ``A`` (pulls the translator towards the identity).
        seed: order of the training sequences.
        checkpoint_every: steps between checkpoints when a folder is given.

    Example:
        >>> TunedLensConfig(steps=50).warmup_steps
        20
    """

    steps: int = 200
    batch_size: int = 4
    lr: float = 1e-3
    warmup_steps: int = 20
    weight_decay: float = 1e-3
    seed: int = 0
    checkpoint_every: int = 25

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise InvalidArgumentError(f"Expected positive steps, batch_size and lr; got {self}.")


class TunedLens(nn.Module):
    """One affine translator per block: ``h -> h + A_l h + b_l`` (identity at initialisation).

    Attributes:
        A: ``(layer, d_model, d_model)``.
        b: ``(layer, d_model)``.
        meta: what the lens was trained on and how (saved with it).

    Example:
        >>> lens = TunedLens(n_layers=2, d_model=4)          # the identity: the logit lens
        >>> lens.A.shape, lens.b.shape    # (layer, d_model, d_model), (layer, d_model)
        (torch.Size([2, 4, 4]), torch.Size([2, 4]))
    """

    def __init__(self, n_layers: int, d_model: int, meta: dict[str, Any] | None = None):
        super().__init__()
        self.A = nn.Parameter(torch.zeros(n_layers, d_model, d_model))
        self.b = nn.Parameter(torch.zeros(n_layers, d_model))
        self.meta = dict(meta or {})

    @property
    def n_layers(self) -> int:
        return self.A.shape[0]

    def _block(self, layer: int | Site) -> int:
        """A block index from an int or a ``resid_pre`` Site (``resid_post`` of the last block
        is the final residual, ``n_layers``)."""
        if not isinstance(layer, Site):
            return layer
        if layer.layer is not None and layer.component == "resid_pre":
            return layer.layer % self.n_layers if layer.layer < 0 else layer.layer
        if layer.component == "resid_post" and layer.layer in (self.n_layers - 1, -1):
            return self.n_layers
        raise InvalidSiteError(
            f"Expected a layer or a Site('resid_pre', layer=l) (a tuned lens reads each block's "
            f"input residual); got {layer!r}."
        )

    def translate(
        self, resid: Float[Tensor, "... d_model"], layer: int | Site
    ) -> Float[Tensor, "... d_model"]:
        """``h + h A_l + b_l`` for residual vectors of block ``layer`` (an int or a Site).

        Example:
            >>> lens = TunedLens(2, 4)
            >>> h = torch.ones(3, 4)
            >>> torch.equal(lens.translate(h, mk.Site("resid_pre", layer=1)), h)  # identity
            True
        """
        block = self._block(layer)
        return resid + resid @ self.A[block] + self.b[block]

    def logits(
        self, model: Model, resid: Float[Tensor, "... d_model"], layer: int | Site
    ) -> Float[Tensor, "... d_vocab"]:
        """Decode block ``layer``'s residual through its translator (``layer == n_layers``: the
        final residual, decoded as is); ``layer`` may be a ``resid_pre`` Site."""
        layer = self._block(layer)
        if layer == self.n_layers:
            return decode_residual(model, resid)
        return decode_residual(model, self.translate(resid, layer))

    def save(self, folder: str | Path) -> Path:
        """Save to ``folder`` (``lens.safetensors`` + ``lens.json``), atomically."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_atomically(folder / "lens.safetensors", lambda p: save_file(self._tensors(), p))
        meta = {"n_layers": self.n_layers, "d_model": self.A.shape[1], **self.meta}

        def write_meta(tmp: str) -> None:
            Path(tmp).write_text(json.dumps(meta, indent=2))

        write_atomically(folder / "lens.json", write_meta)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> TunedLens:
        """Load a lens saved by :meth:`save`.

        Raises:
            FileFormatError: ``lens.json`` or ``lens.safetensors`` is damaged, truncated,
                another format, or does not describe this lens (the message names the file).
        """
        folder = Path(folder)
        hint = (
            "save it with TunedLens.save (or train_tuned_lens); a damaged copy must be saved again."
        )
        meta_path, weights_path = folder / "lens.json", folder / "lens.safetensors"
        meta = read_json(meta_path, "a tuned lens's record (lens.json)", hint)
        tensors, _ = read_safetensors(weights_path, "a tuned lens's translators", hint)
        with reading(weights_path, "a tuned lens's translators A and b", hint):
            n_layers, d_model = int(meta.pop("n_layers")), int(meta.pop("d_model"))
            want = {"A": (n_layers, d_model, d_model), "b": (n_layers, d_model)}
            got = {k: tuple(v.shape) for k, v in tensors.items()}
            if got != want:  # checked before allocating a lens of the recorded size
                raise ValueError(f"expected tensors {want} (from lens.json), got {got}")
            lens = cls(n_layers, d_model, meta)
            lens.load_state_dict(tensors)
        return lens

    def _tensors(self) -> dict[str, Tensor]:
        return {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}


def _save_state(state: dict[str, Any], path: str) -> None:
    torch.save(state, path)


def _residuals(model: Model, tokens: Tensor) -> tuple[list[Tensor], Tensor]:
    """Each block's input residual and the final log-probabilities, from one forward pass."""
    n = model.cfg.n_layers
    names = [f"blocks.{i}.hook_resid_pre" for i in range(n)]
    with torch.no_grad():
        logits, cache = run_with_cache(model, tokens, names_filter=lambda x: x in names)
    return [cache[name] for name in names], logits.float().log_softmax(-1)


def _kl(final_logprobs: Tensor, logits: Tensor) -> Tensor:
    """Mean over tokens of KL(p_final || p_lens) in nats."""
    logp = logits.float().log_softmax(-1)
    return (final_logprobs.exp() * (final_logprobs - logp)).sum(-1).mean()


def _lr_factor(step: int, cfg: TunedLensConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    return max(0.0, 1 - (step - cfg.warmup_steps) / span)


def train_tuned_lens(
    model: Model,
    tokens: Int[Tensor, "batch pos"],
    config: TunedLensConfig | None = None,
    *,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
) -> TunedLens:
    """Train a tuned lens for ``model`` on ``tokens`` ``(n, seq_len)``.

    With ``checkpoint_dir``, a checkpoint is written every ``checkpoint_every`` steps and a
    run started again with the same arguments resumes from the last one; the finished lens is
    also saved there. Steps cycle through the sequences in a seeded order.

    Example:
        >>> import tempfile
        >>> model = mk.load_model("attn-only-2l")
        >>> tokens = torch.randint(1, model.cfg.d_vocab, (8, 16))  # (batch, pos)
        >>> config = mk.lens.TunedLensConfig(steps=2, batch_size=2, warmup_steps=1)
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     lens = mk.train_tuned_lens(model, tokens, config, checkpoint_dir=folder,
        ...                                progress=False)
        ...     saved = mk.lens.TunedLens.load(folder)
        >>> lens.A.shape, lens.b.shape  # (layer, d_model, d_model), (layer, d_model)
        (torch.Size([2, 128, 128]), torch.Size([2, 128]))
        >>> torch.equal(saved.A, lens.A), len(lens.meta["mean_kl_last_steps"])
        (True, 2)
    """
    cfg = config or TunedLensConfig()
    device = model.cfg.device
    lens = TunedLens(
        model.cfg.n_layers,
        model.cfg.d_model,
        {
            "model": model_name(model),
            "config": dataclasses.asdict(cfg),
            "tokens": int(tokens.numel()),
        },
    ).to(device)
    decay: list[Tensor] = [lens.A]
    groups: list[dict[str, Any]] = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": [lens.b]},
    ]
    optimizer = torch.optim.Adam(groups, lr=cfg.lr)
    order = torch.randperm(tokens.shape[0], generator=torch.Generator().manual_seed(cfg.seed))
    start_step = 0
    ckpt = Path(checkpoint_dir) / "checkpoint.pt" if checkpoint_dir is not None else None
    if ckpt is not None and ckpt.is_file():
        hint = f"delete {ckpt} (or pass another checkpoint_dir) to start afresh."
        state = read_checkpoint(ckpt, "a train_tuned_lens checkpoint", hint, map_location=device)
        with reading(ckpt, "a train_tuned_lens checkpoint of this lens", hint):
            lens.load_state_dict(state["lens"])
            optimizer.load_state_dict(state["optimizer"])
            start_step = int(state["step"])
    for p in model.parameters():
        p.requires_grad_(False)
    history: list[float] = []
    started = time.perf_counter()
    bar = progress_bar(cfg.steps, "tuned lens", enabled=progress, initial=start_step)
    try:
        for step in range(start_step, cfg.steps):
            rows = [
                int(order[(step * cfg.batch_size + i) % len(order)]) for i in range(cfg.batch_size)
            ]
            batch = tokens[rows].to(device)
            resids, final = _residuals(model, batch)
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * _lr_factor(step, cfg)
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for layer, resid in enumerate(resids):  # one layer's logits in memory at a time
                loss = _kl(final, lens.logits(model, resid, layer))
                loss.backward()
                total += float(loss.detach())
            optimizer.step()
            history.append(total / len(resids))
            bar.set_postfix(kl=f"{history[-1]:.3f}")
            bar.update(1)
            if ckpt is not None and (
                (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps
            ):
                ckpt.parent.mkdir(parents=True, exist_ok=True)
                state = {
                    "lens": lens.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "step": step + 1,
                }
                write_atomically(ckpt, functools.partial(_save_state, state))
    finally:
        bar.close()
        for p in model.parameters():
            p.requires_grad_(True)
    lens.meta["train_seconds"] = round(time.perf_counter() - started, 1)
    lens.meta["mean_kl_last_steps"] = history[-10:]
    if checkpoint_dir is not None:
        lens.save(checkpoint_dir)
    return lens.eval()


@dataclasses.dataclass(frozen=True, eq=False)
class LensComparison:
    """Mean KL(p_final || p_lens) per layer on held-out tokens, for the logit and tuned lens.

    Example:
        >>> table = LensComparison(("resid_pre 0", "final"), torch.tensor([2.0, 0.0]),
        ...                        torch.tensor([0.5, 0.0]), 16)
        >>> table.top(1)   # the layer the tuned lens improves most: logit KL - tuned KL
        [('resid_pre 0', 1.5)]
    """

    layer_labels: tuple[str, ...]
    logit_lens_kl: Float[Tensor, " layer"]
    tuned_lens_kl: Float[Tensor, " layer"] | None
    n_tokens: int

    def top(self, n: int = 10, *, absolute: bool = True) -> list[tuple[str, float]]:
        """Layers ranked by :func:`mechkit.core.rank` on how much the tuned lens lowers the KL
        (``logit_lens_kl - tuned_lens_kl``), or on the logit lens's KL when there is no tuned
        lens: the layers where the logit lens reads the model worst come first."""
        gain = self.logit_lens_kl
        if self.tuned_lens_kl is not None:
            gain = self.logit_lens_kl - self.tuned_lens_kl
        return rank(list(self.layer_labels), gain, n, absolute=absolute)

    def to_dataframe(self) -> Any:
        import pandas as pd

        data = {"layer": self.layer_labels, "logit_lens_kl": self.logit_lens_kl.tolist()}
        if self.tuned_lens_kl is not None:
            data["tuned_lens_kl"] = self.tuned_lens_kl.tolist()
        return pd.DataFrame(data)

    def plot(self) -> Any:
        """KL to the final distribution by layer, one line per lens."""
        import plotly.graph_objects as go

        fig = go.Figure()
        x = list(self.layer_labels)
        fig.add_trace(go.Scatter(x=x, y=self.logit_lens_kl.tolist(), name="logit lens"))
        if self.tuned_lens_kl is not None:
            fig.add_trace(go.Scatter(x=x, y=self.tuned_lens_kl.tolist(), name="tuned lens"))
        fig.update_layout(
            title=f"KL(final || lens) on {self.n_tokens} held-out tokens",
            xaxis_title="residual stream",
            yaxis_title="KL (nats)",
        )
        return fig


@torch.no_grad()
def compare_lenses(
    model: Model,
    tokens: Int[Tensor, "batch pos"],
    tuned: TunedLens | None = None,
    *,
    batch_size: int | None = 4,
    progress: bool = True,
) -> LensComparison:
    """Mean KL of each lens to the model's final distribution, per layer, over ``tokens``
    (``batch_size`` sequences a pass, None for all at once; a pass that runs out of memory is
    split in halves). ``progress`` shows a bar over the sequences.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> tokens = torch.randint(1, model.cfg.d_vocab, (4, 16))  # (batch, pos)
        >>> table = mk.lens.compare_lenses(model, tokens, progress=False)  # the logit lens only
        >>> table.layer_labels, table.logit_lens_kl.shape, table.tuned_lens_kl, table.n_tokens
        (('resid_pre 0', 'resid_pre 1', 'final'), torch.Size([3]), None, 64)
        >>> float(table.logit_lens_kl[-1])  # the final residual decodes to the logits themselves
        0.0
    """
    n_layers = model.cfg.n_layers
    logit_kl = torch.zeros(n_layers + 1)
    tuned_kl = torch.zeros(n_layers + 1)
    count = 0

    def run(rows: slice) -> None:
        nonlocal count
        batch = tokens[rows].to(model.cfg.device)
        resids, final = _residuals(model, batch)
        weight = batch.shape[0]
        logit_part, tuned_part = torch.zeros_like(logit_kl), torch.zeros_like(tuned_kl)
        for layer, resid in enumerate(resids):
            logit_part[layer] = weight * float(_kl(final, decode_residual(model, resid)))
            if tuned is not None:
                tuned_part[layer] = weight * float(_kl(final, tuned.logits(model, resid, layer)))
        logit_kl.add_(logit_part)  # only once the whole pass fitted (each_batch retries)
        tuned_kl.add_(tuned_part)
        count += weight
        bar.update(weight)

    with progress_bar(tokens.shape[0], "lens KL", enabled=progress, unit="seq") as bar:
        each_batch(tokens.shape[0], batch_size, run)
    logit_kl /= count
    tuned_kl /= count
    if not math.isfinite(float(logit_kl.sum())):
        raise NonFiniteError(
            "Expected finite KL divergences; got inf or NaN. Hint: check the model's dtype "
            "(use float32)."
        )
    return LensComparison(
        tuple(lens_layer_labels(n_layers)),
        logit_kl,
        tuned_kl if tuned is not None else None,
        int(tokens.numel()),
    )
