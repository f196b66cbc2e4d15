"""Training throughput of mechkit's TopK SAE against sae-lens's ``SAETrainer``.

Both train a TopK SAE of the same width, k and batch size on the same activations (an iterator
of ``(batch, d_in)`` tensors), in the same process, alternating rounds; tokens per second are
steps * batch / wall time of the training call (setup included, a warm-up call excluded). The
figures printed are the medians over rounds, and their ratio.

    python benchmarks/sae_training_speed.py --threads 2 --steps 20 --rounds 3

Where the time goes: both compute the dense pre-activations ``x @ W_enc`` and a top-k per row.
sae-lens then decodes densely (``f @ W_dec`` with ``f`` mostly zeros) and backpropagates through
dense products: three more ``(batch, d_in, d_sae)`` products (decoder weight and latent
gradients, encoder weight gradient). mechkit decodes with ``embedding_bag`` over the ``k``
winners and computes the encoder weight gradient as a sparse product over them
(:mod:`mechkit.sae.sparse_ops`), uses fused Adam, and reads metrics back to the host only on
logging steps.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch


def batches(d_in: int, batch: int, n: int, seed: int = 0) -> list[torch.Tensor]:
    """``n`` batches of correlated Gaussian activations (a random low-rank mix plus noise)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(64, d_in, generator=g)
    return [
        torch.randn(batch, 64, generator=g) @ mix + 0.1 * torch.randn(batch, d_in, generator=g)
        for _ in range(n)
    ]


def run_mechkit(data, *, d_in, d_sae, k, batch, steps, device="cpu") -> float:
    from mechkit.sae import SAEConfig, TrainConfig, train_sae

    cfg = SAEConfig(architecture="topk", d_in=d_in, d_sae=d_sae, k=k, hook_name="bench")
    train = TrainConfig(
        total_tokens=steps * batch, batch_size=batch, log_every=steps, checkpoint_every=steps,
        progress=False, b_dec_init="mean", device=device,
    )  # fmt: skip
    start = time.perf_counter()
    train_sae(cfg, itertools.cycle(data), train)
    return steps * batch / (time.perf_counter() - start)


def run_sae_lens(data, *, d_in, d_sae, k, batch, steps, device="cpu") -> float:
    import contextlib
    import io

    from sae_lens import SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k, device=device))
    cfg = SAETrainerConfig(
        total_training_samples=steps * batch, train_batch_size_samples=batch, lr=3e-4,
        lr_end=3e-4, device=device,
    )  # fmt: skip
    trainer = SAETrainer(cfg, sae, itertools.cycle(data))
    start = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):  # its progress bar
        trainer.fit()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--expansion", type=int, default=8)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kw = {
        "d_in": args.d_in, "d_sae": args.d_in * args.expansion, "k": args.k, "batch": args.batch,
        "device": args.device,
    }  # fmt: skip
    data = [b.to(args.device) for b in batches(args.d_in, args.batch, 8)]
    run_mechkit(data, steps=2, **kw)  # warm-up: allocator, kernels
    run_sae_lens(data, steps=2, **kw)
    ours, theirs = [], []
    for _ in range(args.rounds):
        ours.append(run_mechkit(data, steps=args.steps, **kw))
        theirs.append(run_sae_lens(data, steps=args.steps, **kw))
    o, t = statistics.median(ours), statistics.median(theirs)
    print(
        f"TopK SAE d_in={args.d_in} d_sae={kw['d_sae']} k={args.k} batch={args.batch}, "
        f"{args.steps} steps x {args.rounds} rounds, {args.threads} thread(s), {args.device}, "
        f"torch {torch.__version__}"
    )
    print(f"mechkit  : {o:10.0f} tokens/s  (rounds: {[round(v) for v in ours]})")
    print(f"sae-lens : {t:10.0f} tokens/s  (rounds: {[round(v) for v in theirs]})")
    print(f"ratio    : {o / t:.2f}x")


if __name__ == "__main__":
    main()
