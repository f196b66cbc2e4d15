"""Value zeroing (Mohebbi et al. 2023, "Quantifying Context Mixing in Transformers", EACL).

To measure how much position ``i``'s output of block ``l`` depends on token ``j``, zero token
``j``'s value vectors in that block's attention (every head; under grouped-query attention the
shared key/value heads) and see how far the block's output at ``i`` moves::

    score[l, i, j] = 1 - cos(h_i, h_i with v_j = 0)

The block's other inputs stay as in the run, so the score isolates block ``l``'s mixing.

One batched pass per block, no forward per token. Zeroing ``v_j`` changes no attention weight
(queries and keys do not read values; rotary embeddings touch only queries and keys), so the
attention output at ``i`` (before any post-attention norm) changes by exactly the transformed
vector ``f_i(x_j) = sum_h A[h, i, j] v[h, j] W_O[h]`` of :mod:`mechkit.mixing.blocks`, and
positions ``i < j`` do not change at all. What follows the attention acts on each position
alone: Gemma's post-attention norm, the residual, ``ln2`` and the MLP (and its post-norm). So
for every pair ``j <= i`` the changed residual ``x_i + post(z_i - f_i(x_j))`` is run through the
block's own norm and MLP modules, all pairs of a block as one batch (``batch_size`` pairs at a
time, or as many as ``memory_budget`` allows). The values and weights are those the model's
attention actually computed (``hook_v``, ``hook_pattern``); a block whose attention output they
do not reproduce (a fused kernel that bypasses the hooks, a hook that never ran) is refused,
where a peer that patched a module its fused kernel skipped returned scores near zero. Tested
equal to a loop of full forward passes with the values zeroed by plain hooks. Per-layer maps;
aggregated by the rollout of the row-normalised maps, as the paper does across layers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mechkit.core.batching import each_batch
from mechkit.core.progress import progress_bar
from mechkit.core.types import Model
from mechkit.errors import UnsupportedModelError
from mechkit.mixing.attention import roll_out, row_normalise
from mechkit.mixing.blocks import BlockRun, read_blocks, value_outputs
from mechkit.mixing.registry import LayerMaps, MixingRun, register

__all__ = ["copies_per_pass"]


def copies_per_pass(model: Model, n_pos: int, budget: int) -> int:
    """How many (query, zeroed key) pairs one batched block pass takes within ``budget`` bytes
    (each: its heads' transformed vectors, a residual, the MLP's hidden layer; float32, with
    room to spare). ``n_pos`` bounds nothing but the result: at most all pairs.

    Example:
        >>> copies_per_pass(mk.load_model("attn-only-2l"), 10, 2**20)
        34
    """
    cfg = model.cfg
    per_pair = ((cfg.n_heads + 10) * cfg.d_model + 4 * (cfg.d_mlp or 0)) * 4 * 2
    return max(1, min(n_pos * (n_pos + 1) // 2, budget // max(1, per_pair)))


def _read(model: Model, blocks: BlockRun, layer: int) -> tuple[Tensor, Tensor]:
    """``(vo, z)``: each head's ``v W_O`` per key and the attention output before any post-norm,
    checked against the output the block really added."""
    names = (f"blocks.{layer}.attn.hook_v", f"blocks.{layer}.attn.hook_pattern")
    if any(name not in blocks.cache for name in names):
        raise UnsupportedModelError(
            f"Expected block {layer}'s value vectors and weights to pass through {names[0]} and "
            f"{names[1]}; a hook never ran (a fused attention kernel?). Hint: load the model "
            "with mk.load_model."
        )
    vo = value_outputs(model, blocks, layer)  # (batch, head, key, d_model)
    z = torch.einsum("bhqk,bhkm->bqm", blocks.pattern(layer), vo)
    z = z + model.blocks[layer].attn.b_O
    block = model.blocks[layer]
    out = block.ln1_post(z) if model.cfg.use_normalization_before_and_after else z
    real = blocks.attn_out(layer)
    if float((out - real).norm()) > 1e-3 * float(real.norm()) + 1e-5:
        raise UnsupportedModelError(
            f"Expected block {layer}'s attention output to be its weights times its values as "
            "the hooks read them; it is not (a fused kernel, or a hook that changes them?). "
            "Hint: load the model with mk.load_model, without hooks that edit attention."
        )
    return vo, z


def _block_rest(model: Model, layer: int, z: Tensor, x: Tensor, mlp_out: Tensor | None) -> Tensor:
    """What block ``layer`` does after its attention, per position: ``(1, n, d_model)`` changed
    attention outputs ``z`` and residuals ``x`` in, the block's outputs out."""
    block: Any = model.blocks[layer]
    cfg = model.cfg
    attn_out = block.ln1_post(z) if cfg.use_normalization_before_and_after else z
    mid = x + attn_out
    if cfg.attn_only:
        return mid
    if cfg.parallel_attn_mlp:  # the MLP read resid_pre: unchanged
        assert mlp_out is not None
        return mid + mlp_out
    return mid + block.apply_mlp(block.ln2(mid))


@register("value_zeroing")
@torch.no_grad()
def value_zeroing(model: Model, run: MixingRun) -> LayerMaps:
    """Value zeroing, one prompt at a time (``context_mixing`` passes one)."""
    n_layers = model.cfg.n_layers
    length = int(run.mask[0].sum())
    tokens = run.tokens[:, :length]  # (1, pos): the real tokens only
    extra = tuple(f"blocks.{layer}.hook_mlp_out" for layer in range(n_layers))
    blocks = read_blocks(model, tokens, extra=extra if model.cfg.parallel_attn_mlp else ())
    device = tokens.device
    query, key = torch.ones(length, length, dtype=torch.bool, device=device).tril().nonzero().T
    size = run.batch_size or copies_per_pass(model, length, run.memory_budget)
    maps = torch.zeros(n_layers, 1, run.n_pos, run.n_pos, device=device)
    with progress_bar(n_layers * len(query), "value zeroing", enabled=run.progress) as bar:
        for layer in range(n_layers):
            vo, z = _read(model, blocks, layer)  # (1, head, key, d_model), (1, pos, d_model)
            x = blocks.resid_pre(layer)[0]  # (pos, d_model)
            h = blocks.resid_post(layer)[0]
            pattern = blocks.pattern(layer)[0]  # (head, query, key)
            mlp_out = blocks.cache.get(f"blocks.{layer}.hook_mlp_out")

            def work(
                pairs: slice,
                layer: int = layer,
                vo: Tensor = vo[0],
                z: Tensor = z[0],
                x: Tensor = x,
                h: Tensor = h,
                pattern: Tensor = pattern,
                mlp_out: Tensor | None = mlp_out,
            ) -> None:
                i, j = query[pairs], key[pairs]
                f = torch.einsum("hp,hpm->pm", pattern[:, i, j], vo[:, j])  # (pair, d_model)
                rest = None if mlp_out is None else mlp_out[0, i][None]
                out = _block_rest(model, layer, (z[i] - f)[None], x[i][None], rest)[0]
                cos = torch.nn.functional.cosine_similarity(out, h[i], dim=-1)
                maps[layer, 0, i, j] = 1.0 - cos
                bar.update(len(i))

            each_batch(len(query), size, work)
    return LayerMaps(
        maps=maps,
        aggregated=roll_out(row_normalise(maps))[-1],
        aggregation="rollout of the row-normalised maps",
        cumulative=False,
        layers=tuple(range(n_layers)),
    )
