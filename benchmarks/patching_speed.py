"""Activation patching: mechkit against transformer_lens.patching, same prompts, same run.

    python benchmarks/patching_speed.py --prompts 1 4 8

For each number of IOI prompt pairs (the demo's pairs, repeated with fresh names when more are
asked for), times the full residual-stream sweep (``get_act_patch_resid_pre``, layers x
positions) and the head-output sweep over all positions (``get_act_patch_attn_head_out_all_pos``,
layers x heads) on smollm2-135m, prints both times, the ratio, the largest difference of the
scores and the peak memory after mechkit's sweep (process RSS on CPU, which includes the
model). The metric is the same function on both sides (logit difference at the answer
positions). TransformerLens runs one forward pass per patch, so its sweeps take minutes here.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
import transformer_lens.patching as tl_patching

import mechkit as mk
from mechkit.demo import IOI_PAIRS

_EXTRA = [
    ("Mary", "John", "Alice", "Bob", "Carl"),
    ("Tom", "James", "Mike", "Dan", "Paul"),
    ("Sarah", "Emma", "Lucy", "Kate", "Anna"),
    ("David", "Paul", "Peter", "Mark", "Alex"),
]


def ioi_pairs(model: object, n: int) -> mk.PromptPairs:
    """``n`` IOI pairs: the demo's, then one template filled with more name sets."""
    rows = list(IOI_PAIRS[:n])
    template = "When {a} and {b} went to the shop, {b} gave a gift to"
    i = 0
    while len(rows) < n:
        a, b, x, y, z = _EXTRA[i % len(_EXTRA)]
        rows.append(
            (
                template.format(a=a, b=b) if i % 2 == 0 else template.format(a=b, b=a),
                template.format(a=x, b=y).replace(f", {y} gave", f", {z} gave"),
                f" {a}" if i % 2 == 0 else f" {b}",
                f" {b}" if i % 2 == 0 else f" {a}",
            )
        )
        i += 1
    clean, corrupt, answers, wrongs = (list(x) for x in zip(*rows, strict=True))
    return mk.PromptPairs.from_lists(model, clean, corrupt, answers, wrongs)


def _peak_memory() -> str:
    """The peak memory so far: CUDA allocations on a GPU, the process's resident set on CPU."""
    if torch.cuda.is_available():
        return f"peak CUDA memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
    return f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = mk.load_model("smollm2-135m", device=args.device)
    print(f"device {model.cfg.device}, torch threads {torch.get_num_threads()}")
    for n in args.prompts:
        pairs = ioi_pairs(model, n).to(model.cfg.device)
        metric = mk.LogitDiff.from_pairs(pairs)

        def tl_metric(logits: torch.Tensor, metric: mk.Metric = metric) -> torch.Tensor:
            return metric(logits)

        _, clean_cache = model.run_with_cache(pairs.clean_tokens)
        for site, tl_fn in (
            ("resid_pre", tl_patching.get_act_patch_resid_pre),
            ("z", tl_patching.get_act_patch_attn_head_out_all_pos),
        ):
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            ours = mk.activation_patch(model, pairs, site=site, progress=False)
            t_ours = time.perf_counter() - start
            peak = _peak_memory()
            start = time.perf_counter()
            theirs = tl_fn(model, pairs.corrupt_tokens, clean_cache, tl_metric)
            t_tl = time.perf_counter() - start
            diff = float((ours.scores - theirs.cpu()).abs().max())
            print(
                f"{n} prompts x {pairs.clean_tokens.shape[1]} tokens, {site:9s} "
                f"{tuple(ours.scores.shape)}: mechkit {t_ours:6.1f} s, TransformerLens "
                f"{t_tl:6.1f} s, ratio {t_tl / t_ours:5.1f}x, max |diff| {diff:.1e}; {peak}",
                flush=True,
            )


if __name__ == "__main__":
    main()
