"""A TopK SAE on SmolLM2-135M's residual stream after block 12 (of 30), trained on the CPU.

Run: ``python -m mechkit.sae.recipes.train_smollm2_topk [--threads 2] [--layer 12]``. It writes
``mechkit/sae/trained/smollm2-135m-res{layer}-topk/`` (sae-lens format, bfloat16 weights) and a
``record.json`` with the training and held-out figures. The shipped SAEs after blocks 6, 18 and
24 (used with the one after block 12 for the IOI feature circuit) were made with
``--layer L --seed L``: different seeds, so that latent i of one is not latent i of another
(each starts with its encoder equal to its decoder's transpose, and 1M tokens leave part of a
dictionary near its start).

Budget-driven choices (an uncontended CPU core does ~500 tokens/s of SmolLM2 forward up to
block 12; a shared one far less): 64k training tokens from :func:`mechkit.sae.sae_corpus_tokens`
(the Python reference docs, then stdlib source), cached once as float16, and 1M training rows
(~16 epochs) over them; width 4x d_model; k = 32. More tokens (``--train-tokens``) are better
where the forward pass is affordable.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import mechkit as mk
from mechkit.sae import (
    ActivationStore,
    SAEConfig,
    TrainConfig,
    load_sae,
    sae_corpus_tokens,
    save_sae,
    train_sae,
)
from mechkit.sae.recipes.common import heldout_metrics, work_dir, write_record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", type=int, default=12, help="the block whose output to read")
    parser.add_argument("--seed", type=int, default=0, help="initialisation and batch order")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train-tokens", type=int, default=64_000)
    parser.add_argument("--steps-tokens", type=int, default=1_000_000)
    parser.add_argument(
        "--cache",
        default=str(work_dir()),
        help="folder for the activation cache and checkpoints (default: %(default)s)",
    )
    parser.add_argument("--out", default=None, help="default: mechkit/sae/trained/<name>")
    args = parser.parse_args()
    name = f"smollm2-135m-res{args.layer}-topk"
    hook = f"blocks.{args.layer}.hook_resid_post"
    args.out = args.out or str(Path(__file__).parents[1] / "trained" / name)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    model = mk.load_model("smollm2-135m", device="cpu")
    train_tokens = sae_corpus_tokens(
        model, seq_len=128, split="train", max_tokens=args.train_tokens
    )
    test_tokens = sae_corpus_tokens(model, seq_len=128, split="test", max_tokens=16_000)
    store = ActivationStore(
        model, hook, train_tokens, batch_size=4096, model_batch_size=16,
        cache_dir=Path(args.cache) / name, cache_dtype="float16",
    )  # fmt: skip
    store.build_cache()
    forward_seconds = time.perf_counter() - started

    cfg = SAEConfig(
        architecture="topk", d_in=576, d_sae=4 * 576, k=32, hook_name=hook,
        model_name="smollm2-135m",
    )  # fmt: skip
    train = TrainConfig(
        total_tokens=args.steps_tokens, dead_after_tokens=500_000, log_every=25,
        checkpoint_every=100, seed=args.seed,
    )  # fmt: skip
    trained = train_sae(cfg, store, train, checkpoint_dir=Path(args.cache) / (name + "-ckpt"))

    out = save_sae(trained.sae, args.out, weights_dtype="bfloat16")
    shipped = load_sae(out)  # evaluate what is shipped: the bfloat16-rounded weights
    heldout = ActivationStore(model, hook, test_tokens, batch_size=4096)
    figures = heldout_metrics(shipped, heldout)
    write_record(out, {
        "recipe": "mechkit.sae.recipes.train_smollm2_topk",
        "hook_name": hook,
        "seed": args.seed,
        "corpus": "sae_corpus_tokens (pydoc topics + stdlib sources), seq_len 128, BOS dropped",
        "train_corpus_tokens": store.n_rows,
        "activation_pass_seconds": round(forward_seconds, 1),
        **trained.result.summary(),
        "total_seconds": round(time.perf_counter() - started, 1),
        **figures,
    })  # fmt: skip
    print(figures, trained.result.summary())


if __name__ == "__main__":
    main()
