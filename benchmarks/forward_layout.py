"""Forward passes of smollm2-135m with TransformerLens's weight layout and with mechkit's.

TransformerLens 3 copies each linear weight into a transposed contiguous tensor on every
forward pass; ``mechkit.models.layout.use_forward_layout`` (applied by ``load_model``) stores
the weights that way once. This times the same forward passes both ways, alternating so that a
busy machine slows both alike, checks the logits are bit-identical, and prints the ratios.

    OMP_NUM_THREADS=1 python benchmarks/forward_layout.py [REPS]
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
from transformer_lens import HookedTransformer

import mechkit as mk


def plain_copy(model: HookedTransformer) -> HookedTransformer:
    """The same weights stored contiguously: TransformerLens's own layout."""
    plain = HookedTransformer(model.cfg, tokenizer=model.tokenizer, move_to_device=False)
    plain.load_state_dict({k: v.contiguous() for k, v in model.state_dict().items()})
    return plain.eval()


@torch.no_grad()
def main() -> None:
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    torch.manual_seed(0)
    ours = mk.load_model("smollm2-135m", device="cpu")
    theirs = plain_copy(ours)
    shapes = {"one token (a generation step)": (1, 1), "2 x 20 tokens": (2, 20)}
    shapes["8 x 64 tokens"] = (8, 64)
    print(f"torch threads: {torch.get_num_threads()}; {reps} alternating repetitions")
    print(f"{'input':32} {'TransformerLens':>16} {'mechkit':>10} {'ratio':>7}")
    for label, (batch, pos) in shapes.items():
        tokens = torch.randint(100, 20_000, (batch, pos))
        assert torch.equal(ours(tokens), theirs(tokens)), "layouts disagree"
        times: dict[str, list[float]] = {"tl": [], "mk": []}
        for rep in range(reps):
            order = [("tl", theirs), ("mk", ours)]
            for key, model in order if rep % 2 == 0 else order[::-1]:
                start = time.perf_counter()
                model(tokens)
                times[key].append(time.perf_counter() - start)
        tl, mk_ = statistics.median(times["tl"]), statistics.median(times["mk"])
        print(f"{label:32} {tl * 1e3:13.0f} ms {mk_ * 1e3:7.0f} ms {tl / mk_:6.2f}x")


if __name__ == "__main__":
    main()
