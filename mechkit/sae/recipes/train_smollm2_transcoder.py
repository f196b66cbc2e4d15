"""A skip transcoder of SmolLM2-135M's MLP in block 12 (of 30), trained on the CPU.

It reads the MLP's input (``blocks.12.ln2.hook_normalized``) and predicts its output
(``blocks.12.hook_mlp_out``): BatchTopK latents (k = 32 on average) plus a linear skip term.
At inference it is a JumpReLU with the learnt global threshold, saved as sae-lens's
``jumprelu_skip_transcoder`` (``sae_lens.JumpReLUSkipTranscoder.load_from_disk`` reads it).

Run: ``python -m mechkit.sae.recipes.train_smollm2_transcoder [--threads 2]``. It writes
``mechkit/sae/trained/smollm2-135m-mlp12-skip-transcoder/`` (bfloat16 weights) and a
``record.json`` with the training and held-out figures.

Budget-driven choices (an uncontended CPU core does ~500 tokens/s of SmolLM2 forward up to
block 12; a shared one far less): 120k training tokens from
:func:`mechkit.sae.sae_corpus_tokens` (the Python reference docs, then stdlib source), cached
once as float16, and 1M training rows (~8 epochs) over them; width 4x d_model; k = 32. More
tokens (``--train-tokens``) are better where the forward pass is affordable.
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

NAME = "smollm2-135m-mlp12-skip-transcoder"
HOOK = "blocks.12.ln2.hook_normalized"
OUT_HOOK = "blocks.12.hook_mlp_out"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train-tokens", type=int, default=120_000)
    parser.add_argument("--steps-tokens", type=int, default=1_000_000)
    parser.add_argument(
        "--cache",
        default=str(work_dir()),
        help="folder for the activation cache and checkpoints (default: %(default)s)",
    )
    parser.add_argument("--out", default=str(Path(__file__).parents[1] / "trained" / NAME))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    model = mk.load_model("smollm2-135m", device="cpu")
    train_tokens = sae_corpus_tokens(
        model, seq_len=128, split="train", max_tokens=args.train_tokens
    )
    test_tokens = sae_corpus_tokens(model, seq_len=128, split="test", max_tokens=16_000)
    store = ActivationStore(
        model, HOOK, train_tokens, out_hook_name=OUT_HOOK, batch_size=4096, model_batch_size=16,
        cache_dir=Path(args.cache) / NAME, cache_dtype="float16",
    )  # fmt: skip
    store.build_cache()
    forward_seconds = time.perf_counter() - started

    cfg = SAEConfig(
        architecture="batchtopk", d_in=576, d_sae=4 * 576, k=32, hook_name=HOOK, d_out=576,
        out_hook_name=OUT_HOOK, skip=True,
        model_name="smollm2-135m",
    )  # fmt: skip
    train = TrainConfig(
        total_tokens=args.steps_tokens, dead_after_tokens=500_000, log_every=25,
        checkpoint_every=100, seed=0,
    )  # fmt: skip
    trained = train_sae(cfg, store, train, checkpoint_dir=Path(args.cache) / (NAME + "-ckpt"))

    out = save_sae(trained.sae, args.out, weights_dtype="bfloat16")
    shipped = load_sae(out)  # evaluate what is shipped: the bfloat16-rounded weights
    heldout = ActivationStore(model, HOOK, test_tokens, out_hook_name=OUT_HOOK, batch_size=4096)
    figures = heldout_metrics(shipped, heldout)
    write_record(out, {
        "recipe": "mechkit.sae.recipes.train_smollm2_transcoder",
        "hook_name": HOOK,
        "out_hook_name": OUT_HOOK,
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
