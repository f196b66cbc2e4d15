"""Train a sparse dictionary from the command line, on one process or many (``torchrun``).

``python -m mechkit.sae.train`` is :func:`~mechkit.sae.train_sae` over an
:class:`~mechkit.sae.ActivationStore`, with the arguments a run needs: the model, the hook
point (and the output hook of a transcoder), the architecture and its sizes, the corpus, the
steps, the checkpoint folder. Started by ``torchrun`` (``torchrun --nproc-per-node=8 -m
mechkit.sae.train ...``), every rank joins the process group (NCCL on GPUs, gloo on CPUs),
the ranks fill the activation cache in parallel (:meth:`ActivationStore.build_cache
<mechkit.sae.ActivationStore.build_cache>`), and each trains on its share of every global batch
(:meth:`~mechkit.sae.ActivationStore.rank_share`) with averaged gradients and global batch
statistics (:mod:`mechkit.distributed.data_parallel`): W ranks compute what one process does
at the same global ``--batch-size`` (the data-parallel SAE training of EleutherAI's sparsify;
Gao et al. 2024 for TopK). Rank 0 writes the checkpoints and the trained dictionary;
``--resume`` continues a checkpoint on any number of ranks.

Example (one process, the toy model, a few steps; ``torchrun --nproc-per-node=2 -m
mechkit.sae.train`` takes the same arguments):

    >>> import tempfile
    >>> from safetensors.torch import save_file
    >>> folder = Path(tempfile.mkdtemp())
    >>> save_file({"tokens": torch.randint(1, 500, (8, 17))}, str(folder / "tokens.safetensors"))
    >>> main(["--model", "attn-only-2l", "--hook", "blocks.0.hook_resid_post",
    ...       "--architecture", "topk", "--d-sae", "64", "--k", "4",
    ...       "--tokens", str(folder / "tokens.safetensors"), "--batch-size", "32",
    ...       "--steps", "3", "--out", str(folder / "sae"), "--quiet"])
    0
    >>> mk.sae.load_sae(folder / "sae").cfg.d_sae
    64
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mechkit.core.types import Model
from mechkit.distributed.data_parallel import barrier, rank_and_world
from mechkit.errors import InvalidArgumentError, MechkitError
from mechkit.models import load_model
from mechkit.reading import read_safetensors
from mechkit.sae.activations import ActivationStore, sae_corpus_tokens
from mechkit.sae.base import ARCHITECTURES, SAEConfig
from mechkit.sae.training import TrainConfig, TrainedSAE, train_sae

__all__ = ["main", "parser", "train_from_args"]


def parser() -> argparse.ArgumentParser:
    """The command line of ``python -m mechkit.sae.train``.

    Example:
        >>> parser().parse_args(["--model", "m", "--hook", "h", "--architecture", "relu",
        ...                      "--d-sae", "8", "--tokens", "t.safetensors"]).steps
        1000
    """
    p = argparse.ArgumentParser(
        prog="python -m mechkit.sae.train",
        description="Train a sparse dictionary on a model's activations; under torchrun, "
        "data-parallel over the ranks (NCCL on GPUs, gloo on CPUs).",
    )
    model = p.add_argument_group("model and dictionary")
    model.add_argument("--model", required=True, help="a mechkit.load_model name or path")
    model.add_argument("--hook", required=True, help="the input hook (blocks.6.hook_resid_post)")
    model.add_argument("--out-hook", help="a transcoder's output hook (blocks.6.hook_mlp_out)")
    model.add_argument("--architecture", required=True, help=", ".join(sorted(ARCHITECTURES)))
    model.add_argument("--d-sae", type=int, required=True, help="latents")
    model.add_argument("--k", type=int, help="active latents (topk, batchtopk)")
    model.add_argument("--dtype", help="the model's dtype (default float32)")
    data = p.add_argument_group("corpus")
    corpus = data.add_mutually_exclusive_group(required=True)
    corpus.add_argument(
        "--tokens", help="a safetensors file with a (n_sequences, seq_len) 'tokens' tensor"
    )
    corpus.add_argument(
        "--corpus", choices=["sae"], help="sae: mechkit.sae.sae_corpus_tokens (offline)"
    )
    data.add_argument("--seq-len", type=int, default=128, help="--corpus: sequence length")
    data.add_argument("--max-tokens", type=int, help="--corpus: tokens to read (default all)")
    data.add_argument("--model-batch-size", type=int, default=16, help="sequences per forward")
    data.add_argument(
        "--cache-dir", help="activation cache, one folder every rank sees (default: "
        "CHECKPOINT_DIR/activations with --checkpoint-dir)"
    )  # fmt: skip
    train = p.add_argument_group("training")
    train.add_argument(
        "--batch-size", type=int, default=4096, help="rows per step over all ranks together"
    )
    train.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    train.add_argument("--lr", type=float, help="peak learning rate (default: by architecture)")
    train.add_argument("--seed", type=int, default=0, help="weights and data order")
    train.add_argument("--log-every", type=int, default=50, help="steps between history rows")
    train.add_argument("--checkpoint-dir", help="folder of the resumable checkpoint")
    train.add_argument("--checkpoint-every", type=int, default=500, help="steps per checkpoint")
    train.add_argument(
        "--resume", action="store_true", help="continue the checkpoint in --checkpoint-dir"
    )
    train.add_argument("--out", help="folder for the trained dictionary (sae-lens format)")
    train.add_argument("--device", help="cpu, cuda (default: this rank's GPU, else cpu)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _tokens(args: argparse.Namespace, model: Model) -> torch.Tensor:
    if args.tokens is not None:
        tensors, _ = read_safetensors(
            args.tokens, "token ids", "write them with safetensors.torch.save_file({'tokens': t})"
        )
        if "tokens" not in tensors:
            raise InvalidArgumentError(
                f"Expected a 'tokens' tensor in {args.tokens!r}; got {sorted(tensors)}. Hint: "
                "save_file({'tokens': tokens}, path)."
            )
        return tensors["tokens"]
    return sae_corpus_tokens(model, seq_len=args.seq_len, max_tokens=args.max_tokens)


def train_from_args(args: argparse.Namespace) -> TrainedSAE:
    """What ``python -m mechkit.sae.train`` runs, on this process (a rank when a process group
    is initialised); rank 0 saves the result to ``args.out``.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> (folder / "checkpoint.pt").write_bytes(b"")  # a run's checkpoint is there
        0
        >>> args = parser().parse_args(["--model", "m", "--hook", "h", "--architecture",
        ...     "topk", "--d-sae", "8", "--tokens", "t", "--checkpoint-dir", str(folder)])
        >>> train_from_args(args)
        Traceback (most recent call last):
        ...
        mechkit.errors.InvalidArgumentError: Expected an empty --checkpoint-dir or --resume; ...
    """
    folder = Path(args.checkpoint_dir) if args.checkpoint_dir else None
    if folder is not None and not args.resume and any(folder.glob("checkpoint*")):
        raise InvalidArgumentError(
            f"Expected an empty --checkpoint-dir or --resume; {str(folder)!r} holds a "
            "checkpoint. Hint: add --resume to continue it, or choose another folder."
        )
    rank, world = rank_and_world()
    device = args.device
    if device is None:
        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    model = load_model(args.model, device=device, dtype=args.dtype)
    cache = args.cache_dir or (None if folder is None else str(folder / "activations"))
    if args.batch_size % world:
        raise InvalidArgumentError(
            f"Expected --batch-size to split evenly over the {world} ranks; got "
            f"{args.batch_size}. Hint: a multiple of {world}."
        )
    store = ActivationStore(
        model,
        args.hook,
        _tokens(args, model),
        out_hook_name=args.out_hook,
        batch_size=args.batch_size,
        model_batch_size=args.model_batch_size,
        seed=args.seed,
        cache_dir=cache,
    )
    store.build_cache()  # the ranks fill it in parallel
    d_out = store.d_out
    cfg = SAEConfig(
        architecture=args.architecture,
        d_in=store.d_in,
        d_sae=args.d_sae,
        k=args.k,
        hook_name=args.hook,
        **({} if d_out is None else {"d_out": d_out, "out_hook_name": args.out_hook}),
    )
    train_cfg = TrainConfig(
        total_tokens=args.steps * args.batch_size,
        batch_size=args.batch_size // world,
        lr=args.lr,
        seed=args.seed,
        log_every=min(args.log_every, args.steps),
        checkpoint_every=_checkpoint_every(args),
        progress=not args.quiet and rank == 0,
    )
    trained = train_sae(
        cfg, store.rank_share(), train_cfg, checkpoint_dir=None if folder is None else folder
    )
    if rank == 0 and args.out is not None:
        trained.sae.save(args.out)
    barrier()
    return trained


def _checkpoint_every(args: argparse.Namespace) -> int:
    """``--checkpoint-every`` rounded down to a multiple of the logging interval (train_sae's
    rule), at least one interval."""
    log_every = min(args.log_every, args.steps)
    return max(log_every, args.checkpoint_every // log_every * log_every)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2: a mechkit error or a missing file, its
    message printed).

    Under ``torchrun`` (``WORLD_SIZE`` set) this process joins the process group first and
    leaves it at the end.

    Example:
        >>> main(["--model", "attn-only-2l", "--hook", "blocks.0.hook_resid_post",
        ...       "--architecture", "topk", "--d-sae", "8", "--tokens", "nowhere.safetensors"])
        2
    """
    args = parser().parse_args(argv)
    joined = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        cuda = torch.cuda.is_available() and (args.device is None or "cuda" in args.device)
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
        joined = True
    try:
        train_from_args(args)
    except (MechkitError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if joined:
            dist.destroy_process_group()
    return 0


def _entry() -> Any:  # pragma: no cover (python -m)
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    _entry()
