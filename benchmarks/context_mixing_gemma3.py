"""The context-mixing identities on Gemma 3 270M (RMSNorm before and after each sublayer, a
gated GELU MLP, one key/value head for four query heads, rotary embeddings, QK-norm, local
sliding-window layers), run once and put in the note (the model takes ~80 s to load, too long
for the test suite).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/context_mixing_gemma3.py

Prints, on an IOI prompt: the largest error of the attention-norm decomposition (the weighted
transformed vectors plus the bias against ``hook_attn_out``, every layer), of ALTI's row sums
against 1, of the ALTI-Logit, DecompX and DecompX-logit shares plus the rest against the model's
logit difference, of the adjoint DecompX shares against the propagated ones, and of value zeroing
against full forward passes with the values zeroed by plain hooks (three keys of one layer).
"""

from __future__ import annotations

import time

import torch

import mechkit as mk
from mechkit.mixing.blocks import attention_parts, read_blocks

IOI = "When Mary and John went to the store, John gave a drink to"


def main() -> None:
    torch.set_grad_enabled(False)
    start = time.perf_counter()
    model = mk.load_model("gemma3-270m", device="cpu")
    print(f"load {time.perf_counter() - start:.0f} s", flush=True)
    tokens = model.to_tokens(IOI)
    run = read_blocks(model, tokens)
    error = 0.0
    for layer in range(model.cfg.n_layers):
        f, bias = attention_parts(model, run, layer)
        error = max(error, float((f.sum(2) + bias - run.attn_out(layer)).abs().max()))
    size = max(float(run.attn_out(layer).abs().max()) for layer in range(model.cfg.n_layers))
    print(
        f"attention-norm decomposition: max |sum_j f_i(x_j) + b - attn_out| = {error:.2e} "
        f"(attn_out up to {size:.1f})",
        flush=True,
    )
    alti = mk.context_mixing(model, tokens, method="alti", progress=False)
    print(f"ALTI rows: max |sum - 1| = {float((alti.aggregated.sum(-1) - 1).abs().max()):.2e}")
    mary, john = model.to_single_token(" Mary"), model.to_single_token(" John")
    logits = run.logits[0, -1]
    expected = float(logits[mary] - logits[john])
    shares = {}
    for method in ("alti_logit", "decompx", "decompx_logit"):
        start = time.perf_counter()
        mix = mk.context_mixing(
            model,
            tokens,
            method=method,
            answer=" Mary",
            wrong=" John",
            positions=-1,
            layers=[model.cfg.n_layers - 1],
            progress=False,
        )
        total = float(mix.logit[0, 0].sum() + mix.logit_rest[0, 0])
        shares[method] = mix.logit[0, 0]
        top = mix.str_tokens[0][int(mix.logit[0, 0, 1:].argmax()) + 1]
        print(
            f"{method}: shares + rest = {total:.4f}, logit difference {expected:.4f} "
            f"(error {abs(total - expected):.1e}); largest share after BOS: {top!r} "
            f"({time.perf_counter() - start:.1f} s)",
            flush=True,
        )
    gap = float((shares["decompx"] - shares["decompx_logit"]).abs().max())
    print(f"DecompX adjoint vs propagated: max |difference| = {gap:.2e}", flush=True)
    layer = 5  # a local (sliding-window) layer
    vz = mk.context_mixing(model, tokens, method="value_zeroing", layers=[layer], progress=False)
    _, clean = model.run_with_cache(tokens, names_filter=f"blocks.{layer}.hook_resid_post")
    h = clean[f"blocks.{layer}.hook_resid_post"][0]
    worst = 0.0
    for j in (0, 2, tokens.shape[1] - 1):
        seen = {}

        def zero(v, hook, j=j):
            v[:, j] = 0.0
            return v

        def keep(x, hook, seen=seen):
            seen["h"] = x

        model.run_with_hooks(
            tokens,
            fwd_hooks=[
                (f"blocks.{layer}.attn.hook_v", zero),
                (f"blocks.{layer}.hook_resid_post", keep),
            ],
        )
        cos = torch.nn.functional.cosine_similarity(seen["h"][0], h, dim=-1)
        expected_col = (1 - cos) * (torch.arange(tokens.shape[1]) >= j)
        worst = max(worst, float((vz.maps[0, 0, :, j].float() - expected_col).abs().max()))
    print(
        f"value zeroing, layer {layer}, keys 0, 2, last: max |batched - hooked loop| = "
        f"{worst:.2e} (maps are float32 here)",
        flush=True,
    )


if __name__ == "__main__":
    main()
