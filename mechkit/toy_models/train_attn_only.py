"""Train a small attention-only transformer until it forms induction heads.

This script produces the toy model shipped as
``mechkit/toy_models/attn-only-2l.{safetensors,json}``: a two-layer, attention-only
TransformerLens ``HookedTransformer`` trained on sequences that contain a repeated segment of
uniformly random tokens. Random tokens cannot be predicted the first time they appear, but once a
segment repeats, every token after the first of the repeat can be predicted exactly by in-context
copying. A two-layer attention-only model solves this with the classic
induction circuit (Elhage et al. 2021, "A Mathematical Framework for Transformer Circuits";
Olsson et al. 2022, "In-context Learning and Induction Heads"):

* a *previous-token head* in layer 0 writes "the token before me was A" into each position;
* an *induction head* in layer 1 uses that (K-composition) to attend from the current token A to
  the position right after the previous occurrence of A, and copies the token found there.

Each training sequence has length ``n_ctx`` and the layout::

    [BOS] + noise(P) + r(L) + r(L) + noise(rest)

where ``r`` is a segment of ``L`` uniformly random tokens (``L`` drawn per sequence), ``P`` is a
random offset and ``noise`` is more uniformly random tokens. Token 0 is reserved as BOS and never
sampled elsewhere. The loss is next-token cross-entropy over all positions.

After training, the script evaluates on fresh held-out sequences ``[BOS] + r + r`` (``r`` of length
``--eval-seg-len``) and records, per head, the previous-token score and the induction
(prefix-matching) score computed from the attention patterns, plus the loss on the first
(non-repeated) half vs the repeated half. Everything is deterministic given ``--seed``.

Usage (the defaults reproduce the shipped files)::

    python -m mechkit.toy_models.train_attn_only --n-layers 2 --out mechkit/toy_models

Outputs ``attn-only-{n}l.safetensors`` (parameters only, float32, with metadata) and
``attn-only-{n}l.json`` (the ``HookedTransformerConfig`` kwargs, the BOS id and a training record),
both written atomically.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformer_lens import HookedTransformer, HookedTransformerConfig

BOS_TOKEN_ID = 0


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # Model shape.
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--d-vocab", type=int, default=1000, help="includes BOS (token 0)")
    p.add_argument("--n-ctx", type=int, default=128)
    # Data.
    p.add_argument("--min-seg-len", type=int, default=8, help="shortest repeated segment")
    p.add_argument("--max-seg-len", type=int, default=63, help="longest repeated segment")
    # Optimisation.
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--min-lr-frac", type=float, default=0.1, help="final lr as a fraction of peak")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--log-every", type=int, default=50, help="loss-curve sampling interval")
    # Evaluation.
    p.add_argument("--eval-seqs", type=int, default=256)
    p.add_argument("--eval-seg-len", type=int, default=50)
    # Output.
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--pos-init", choices=["default", "sinusoidal"], default="sinusoidal")
    p.add_argument("--norm", choices=["LN", "none"], default="LN")
    p.add_argument("--full-frac", type=float, default=0.5)
    p.add_argument("--min-sub", type=int, default=16)
    return p.parse_args()


def tune_glibc_malloc() -> None:
    """Keep freed activation buffers inside the process instead of returning them to the OS.

    Training allocates and frees many same-sized ~1-8 MB buffers per step. By default glibc serves
    these with mmap/munmap, so every step pays fresh page faults; on small VMs this made training
    ~10x slower (system time dominated). Raising the mmap and trim thresholds makes glibc reuse
    its heap. Purely a speed knob: it changes no numbers. Silently skipped off glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # constants from <malloc.h>
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 1 << 30)


def sinusoidal_positions(n_ctx: int, d_model: int) -> torch.Tensor:
    """Vaswani et al. (2017) sinusoidal position codes. Shape [n_ctx, d_model]."""
    pos = torch.arange(n_ctx, dtype=torch.float32).unsqueeze(1)  # [n_ctx, 1]
    freq = 10000.0 ** (-torch.arange(0, d_model, 2, dtype=torch.float32) / d_model)  # [d/2]
    angles = pos * freq  # [n_ctx, d_model/2]
    # Interleave sin and cos: [n_ctx, d_model/2, 2] -> [n_ctx, d_model].
    return torch.stack([angles.sin(), angles.cos()], dim=-1).reshape(n_ctx, d_model)


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def random_tokens(n: int, length: int, d_vocab: int, gen: torch.Generator) -> torch.Tensor:
    """Uniform tokens in 1..d_vocab-1 (BOS=0 is never sampled). Shape [n, length]."""
    return torch.randint(1, d_vocab, (n, length), generator=gen)


def sub_vocab_tokens(
    n: int, length: int, d_vocab: int, full_frac: float, min_sub: int, gen: torch.Generator
) -> torch.Tensor:
    """Uniform tokens, each sequence drawn from its own random sub-vocabulary. Shape [n, length].

    A fraction full_frac of the sequences use the whole vocabulary 1..d_vocab-1. The others draw
    from a random subset of size K, log-uniform in [min_sub, d_vocab-1], so tokens recur often
    within the sequence (as in natural text).
    """
    n_tok = d_vocab - 1
    log_k = torch.empty(n).uniform_(math.log(min_sub), math.log(n_tok), generator=gen)
    k = log_k.exp().round().long().clamp(min_sub, n_tok)  # [n]
    k = torch.where(torch.rand(n, generator=gen) < full_frac, n_tok, k)
    subset = torch.rand(n, n_tok, generator=gen).argsort(dim=1) + 1  # [n, n_tok] permutations
    idx = (torch.rand(n, length, generator=gen) * k.unsqueeze(1)).long()  # [n, length], < k
    return subset.gather(1, idx)


def make_train_batch(
    batch_size: int,
    n_ctx: int,
    d_vocab: int,
    min_len: int,
    max_len: int,
    gen: torch.Generator,
    full_frac: float = 1.0,
    min_sub: int = 16,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Build ``[BOS] + noise(P) + r(L) + r(L) + r(L) + ...`` sequences of length n_ctx.

    After a random-length prefix of noise, the segment r repeats with period L until the sequence
    ends (the last copy is cut off), so at least two full copies of r always fit. Returns
    (tokens [B, n_ctx], seg_len [B], seg_start [B]) where seg_start is the position of the first
    token of the first copy of r in the full sequence (BOS included).
    """
    body_len = n_ctx - 1  # positions after BOS
    assert 2 * max_len <= body_len, "two copies of the longest segment must fit after BOS"
    body = sub_vocab_tokens(batch_size, body_len, d_vocab, full_frac, min_sub, gen)
    seg_len = torch.randint(min_len, max_len + 1, (batch_size,), generator=gen)  # [B]
    # Offset of the first copy within the body: uniform over all placements that fit two copies.
    max_offset = body_len - 2 * seg_len  # [B], >= 0
    offset = (torch.rand(batch_size, generator=gen) * (max_offset + 1)).long()  # [B]
    # Repeat r with a gather: body position j >= offset + L reads from
    # offset + (j - offset) mod L, i.e. the same place in the first copy; earlier positions
    # (noise and the first copy itself) read from themselves.
    pos = torch.arange(body_len).unsqueeze(0)  # [1, body_len]
    off, n = offset.unsqueeze(1), seg_len.unsqueeze(1)  # [B, 1] each
    src = torch.where(pos >= off + n, off + (pos - off) % n, pos)  # [B, body_len]
    body = body.gather(1, src)
    bos = torch.full((batch_size, 1), BOS_TOKEN_ID, dtype=body.dtype)
    tokens = torch.cat([bos, body], dim=1)  # [B, n_ctx]
    return tokens, seg_len, offset + 1  # +1: BOS shifts everything right by one


def make_repeat_batch(n: int, seg_len: int, d_vocab: int, gen: torch.Generator) -> torch.Tensor:
    """Held-out evaluation sequences ``[BOS] + r + r``. Shape [n, 1 + 2 * seg_len]."""
    r = random_tokens(n, seg_len, d_vocab, gen)  # [n, L]
    bos = torch.full((n, 1), BOS_TOKEN_ID, dtype=r.dtype)
    return torch.cat([bos, r, r], dim=1)


def per_position_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy at each position. logits [B, T, V], tokens [B, T] -> [B, T-1]."""
    b, t, v = logits.shape
    flat_logits = logits[:, :-1].reshape(b * (t - 1), v)  # [B*(T-1), V]
    flat_targets = tokens[:, 1:].reshape(b * (t - 1))  # [B*(T-1)]
    loss = F.cross_entropy(flat_logits, flat_targets, reduction="none")
    return loss.reshape(b, t - 1)  # [B, T-1]; entry p is the loss of predicting token p+1


def half_masks(
    seg_len: torch.Tensor, seg_start: torch.Tensor, t: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks over prediction positions [B, t-1] (entry p predicts token p+1).

    first:    targets are the tokens of the first copy of r (unpredictable).
    repeated: targets in the later copies of r except the very first token of the second copy,
              i.e. the predictions made from query positions inside the repeats (what induction
              solves).
    """
    target_pos = torch.arange(1, t).unsqueeze(0)  # [1, t-1]
    s, n = seg_start.unsqueeze(1), seg_len.unsqueeze(1)  # [B, 1] each
    first = (target_pos >= s) & (target_pos < s + n)
    repeated = target_pos >= s + n + 1
    return first, repeated


# ----------------------------------------------------------------------------------------------
# Evaluation: losses and attention-pattern head scores
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: HookedTransformer, tokens: torch.Tensor, seg_len: int) -> dict:
    """Losses and per-head scores on ``[BOS] + r + r`` sequences (tokens [n, 1 + 2L])."""
    n, t = tokens.shape
    assert t == 1 + 2 * seg_len
    logits, cache = model.run_with_cache(tokens, names_filter=lambda name: "hook_pattern" in name)
    loss = per_position_loss(logits, tokens)  # [n, 2L]
    # Prediction position p predicts token p+1. First copy of r sits at positions 1..L, the second
    # at L+1..2L.
    first_half = loss[:, 0:seg_len]  # targets r[0..L-1] (first copy)
    repeated_half = loss[:, seg_len + 1 : 2 * seg_len]  # targets r[1..L-1] (second copy)
    repeated_incl_first = loss[:, seg_len : 2 * seg_len]  # also the unpredictable repeat of r[0]

    prev_token, induction = [], []
    for layer in range(model.cfg.n_layers):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]  # [n, head, query_pos, key_pos]
        # Previous-token score: attention from query i to key i-1, averaged over i >= 2 (the query
        # at i=1 can only attend to BOS or itself, so it is left out). diagonal(offset=-1) holds
        # entries (i, i-1) for i = 1..t-1.
        prev_diag = pattern.diagonal(offset=-1, dim1=-2, dim2=-1)  # [n, head, t-1]
        prev_token.append(prev_diag[..., 1:].mean(dim=(0, 2)).tolist())
        # Induction (prefix-matching) score: a query at position i in the second copy
        # (i = L+1..2L) should attend to key i-L+1, the token right after the previous occurrence
        # of its own token. diagonal(offset=-(L-1)) holds entries (i, i-L+1) for i = L-1..t-1, so
        # i = L+1 is index 2.
        ind_diag = pattern.diagonal(offset=-(seg_len - 1), dim1=-2, dim2=-1)  # [n, head, L+2]
        induction.append(ind_diag[..., 2:].mean(dim=(0, 2)).tolist())

    def best(scores: list[float]) -> dict:
        head = max(range(len(scores)), key=scores.__getitem__)
        return {"head": head, "score": scores[head]}

    return {
        "n_seqs": n,
        "seg_len": seg_len,
        "loss_overall": loss.mean().item(),
        "loss_first_half": first_half.mean().item(),
        "loss_repeated_half": repeated_half.mean().item(),
        "loss_repeated_half_incl_first_token": repeated_incl_first.mean().item(),
        "uniform_loss_ln_vocab_minus_1": math.log(model.cfg.d_vocab - 1),
        # Scores indexed [layer][head].
        "prev_token_scores": prev_token,
        "induction_scores": induction,
        "best_prev_token_head_layer0": best(prev_token[0]),
        "best_induction_head_last_layer": best(induction[-1]),
    }


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path) on a temp file in path's folder, then os.replace it onto path."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def main() -> None:
    args = parse_args()
    tune_glibc_malloc()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    name = f"attn-only-{args.n_layers}l"
    assert args.d_model % args.n_heads == 0

    # The exact, JSON-able kwargs for HookedTransformerConfig; stored verbatim in the JSON.
    config = {
        "model_name": name,
        "n_layers": args.n_layers,
        "d_model": args.d_model,
        "n_heads": args.n_heads,
        "d_head": args.d_model // args.n_heads,
        "d_vocab": args.d_vocab,
        "n_ctx": args.n_ctx,
        "attn_only": True,
        # LayerNorm (with learned scale and bias) before each attention layer and the unembed, as
        # in the original attention-only toy models; it keeps the residual stream's scale stable so
        # the sharp attention patterns that induction needs train quickly and reliably.
        "normalization_type": None if args.norm == "none" else args.norm,
        "positional_embedding_type": "standard",
        "act_fn": "relu",  # unused: there are no MLPs
        "seed": args.seed,
    }
    model = HookedTransformer(HookedTransformerConfig(**config))  # the config seeds the init
    if args.pos_init == "sinusoidal":
        with torch.no_grad():
            model.pos_embed.W_pos.copy_(sinusoidal_positions(args.n_ctx, args.d_model))
            model.pos_embed.W_pos.mul_(model.cfg.initializer_range)
    model.train()

    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=args.weight_decay
    )

    def lr_at(step: int) -> float:
        """Linear warmup to the peak, then cosine decay to min_lr_frac * peak."""
        if step < args.warmup_steps:
            return args.lr * (step + 1) / args.warmup_steps
        progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * cosine)

    # Separate generators: training data, the final held-out evaluation, and a small fixed probe
    # batch used to track the head scores during training (neither is ever trained on).
    train_gen = torch.Generator().manual_seed(args.seed)
    eval_gen = torch.Generator().manual_seed(args.seed + 1_000_003)
    probe_gen = torch.Generator().manual_seed(args.seed + 2_000_003)
    probe_tokens = make_repeat_batch(16, args.eval_seg_len, args.d_vocab, probe_gen)

    curve = []
    window = {"loss": 0.0, "first": 0.0, "repeated": 0.0, "n": 0}
    t0 = time.time()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        tokens, seg_len, seg_start = make_train_batch(
            args.batch_size,
            args.n_ctx,
            args.d_vocab,
            args.min_seg_len,
            args.max_seg_len,
            train_gen,
            args.full_frac,
            args.min_sub,
        )
        logits = model(tokens)  # [B, n_ctx, d_vocab]
        loss_pos = per_position_loss(logits, tokens)  # [B, n_ctx-1]
        loss = loss_pos.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        # Loss-curve bookkeeping: means over the last `log_every` steps.
        with torch.no_grad():
            first, repeated = half_masks(seg_len, seg_start, args.n_ctx)
            window["loss"] += loss.item()
            window["first"] += loss_pos[first].mean().item()
            window["repeated"] += loss_pos[repeated].mean().item()
            window["n"] += 1
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            k = window.pop("n")
            point = {"step": step + 1, **{key: round(v / k, 5) for key, v in window.items()}}
            point["lr"] = lr_at(step)
            probe = evaluate(model, probe_tokens, args.eval_seg_len)
            point["probe_prev_token_l0"] = round(probe["best_prev_token_head_layer0"]["score"], 4)
            point["probe_induction_last"] = round(
                probe["best_induction_head_last_layer"]["score"], 4
            )
            curve.append(point)
            window = {"loss": 0.0, "first": 0.0, "repeated": 0.0, "n": 0}
            print(
                f"step {step + 1:5d}  loss {point['loss']:.4f}  first {point['first']:.4f}  "
                f"repeated {point['repeated']:.4f}  prev-token {point['probe_prev_token_l0']:.3f}  "
                f"induction {point['probe_induction_last']:.3f}  ({time.time() - t0:.0f}s)",
                flush=True,
            )
    train_seconds = time.time() - t0

    # Final evaluation on fresh held-out [BOS] + r + r sequences.
    model.eval()
    eval_tokens = make_repeat_batch(args.eval_seqs, args.eval_seg_len, args.d_vocab, eval_gen)
    final = evaluate(model, eval_tokens, args.eval_seg_len)

    record = {
        "name": name,
        "config": config,
        "bos_token_id": BOS_TOKEN_ID,
        "training": {
            "script": "mechkit/toy_models/train_attn_only.py",
            "command": "python -m mechkit.toy_models.train_attn_only "
            f"--n-layers {args.n_layers} --out mechkit/toy_models",
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "seed": args.seed,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "tokens_per_step": args.batch_size * args.n_ctx,
            "optimizer": {
                "name": "AdamW",
                "betas": [0.9, 0.98],
                "weight_decay": args.weight_decay,
            },
            "lr_schedule": {
                "peak_lr": args.lr,
                "warmup": f"linear from lr/{args.warmup_steps} to peak over "
                f"{args.warmup_steps} steps",
                "decay": f"cosine to {args.min_lr_frac} * peak at step {args.steps}",
            },
            "loss": "next-token cross-entropy, mean over all positions",
            "data": {
                "layout": "[BOS] + noise(P) + r(L) + r(L) + noise(n_ctx - 1 - P - 2L)",
                "seq_len": args.n_ctx,
                "vocab": f"tokens 1..{args.d_vocab - 1} uniform i.i.d.; 0 is BOS only",
                "segment_len": f"L uniform in [{args.min_seg_len}, {args.max_seg_len}] per seq",
                "offset": "P uniform in [0, n_ctx - 1 - 2L] per sequence",
                "generator": f"torch.Generator seeded with {args.seed}",
            },
            "loss_curve": {
                "every_n_steps": args.log_every,
                "description": "loss, first, repeated: means over the preceding window of "
                "training batches of the loss on all positions, on predicting the first copy of r, "
                "and on predicting the later copies of r (except the first token of the second "
                "copy). probe_*: best layer-0 previous-token score and best last-layer induction "
                "score on a fixed probe batch of 16 held-out [BOS] + r + r sequences",
                "points": curve,
            },
            "final_eval": {
                "data": f"{args.eval_seqs} held-out sequences [BOS] + r + r, "
                f"L={args.eval_seg_len}, generator seeded with {args.seed + 1_000_003}",
                "first_half": "predictions of r[0..L-1] in the first copy (positions 0..L-1)",
                "repeated_half": "predictions of r[1..L-1] in the second copy "
                "(query positions L+1..2L-1)",
                "prev_token_score": "mean attention from query i to key i-1 over i >= 2",
                "induction_score": "mean attention from query i to key i-L+1 over "
                "queries i = L+1..2L (second copy)",
                **final,
            },
            "wall_time_seconds": round(train_seconds, 1),
            "threads": args.threads,
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "transformer_lens": version("transformer-lens"),
                "safetensors": version("safetensors"),
            },
        },
    }

    # Parameters only (no buffers such as causal masks), contiguous float32.
    params = dict(model.named_parameters())
    tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in params.items()}
    metadata = {"name": name, "format": "pt", "config": json.dumps(config)}
    args.out.mkdir(parents=True, exist_ok=True)
    st_path = args.out / f"{name}.safetensors"
    json_path = args.out / f"{name}.json"
    atomic_write(st_path, lambda tmp: save_file(tensors, tmp, metadata=metadata))

    def write_json(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(record, f, indent=2)
            f.write("\n")

    atomic_write(json_path, write_json)

    print(f"trained {args.steps} steps in {train_seconds:.0f}s")
    print(
        f"held-out loss: first half {final['loss_first_half']:.4f} "
        f"(ln(V-1) = {final['uniform_loss_ln_vocab_minus_1']:.4f}), "
        f"repeated half {final['loss_repeated_half']:.4f}"
    )
    for layer in range(args.n_layers):
        prev = ", ".join(f"{s:.3f}" for s in final["prev_token_scores"][layer])
        ind = ", ".join(f"{s:.3f}" for s in final["induction_scores"][layer])
        print(f"layer {layer}: prev-token [{prev}]  induction [{ind}]")
    print(f"wrote {st_path} ({st_path.stat().st_size} bytes) and {json_path}")


if __name__ == "__main__":
    main()
