"""Value zeroing (Mohebbi et al. 2023, "Quantifying Context Mixing in Transformers", EACL).

To measure how much position ``i``'s output of block ``l`` depends on token ``j``, zero token
``j``'s value vectors in that block's attention (every head; under grouped-query attention the
shared key/value heads) and see how far the block's output at ``i`` moves::

    score[l, i, j] = 1 - cos(h_i, h_i with v_j = 0)

The block's other inputs stay as in the run, so the score isolates block ``l``'s mixing. The
zeroing is a hook on ``blocks.{l}.attn.hook_v`` inside the attention computation TransformerLens
actually runs (a peer that patched a module its fused kernel bypassed got scores near zero; a
check here refuses a run in which the hook did not fire). All ``j`` of one layer go in batched
passes: copies of the block's input, copy ``c`` with token ``c``'s values zeroed, run through
that block alone (``start_at_layer=l, stop_at_layer=l+1``), ``batch_size`` copies at a time
(None: as many as ``memory_budget`` allows). Per-layer maps; aggregated by the rollout of the
row-normalised maps, as the paper does across layers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mechkit.core.batching import each_batch
from mechkit.core.progress import progress_bar
from mechkit.core.types import Model
from mechkit.errors import UnsupportedModelError
from mechkit.hook_scope import hook_scope, run_with_cache
from mechkit.mixing.attention import roll_out, row_normalise
from mechkit.mixing.registry import LayerMaps, MixingRun, register

__all__ = ["copies_per_pass"]


def copies_per_pass(model: Model, n_pos: int, budget: int) -> int:
    """How many zeroed copies of an ``n_pos``-token input one block pass takes within
    ``budget`` bytes (activations of one block, float32, with room to spare).

    Example:
        >>> copies_per_pass(mk.load_model("attn-only-2l"), 10, 2**20)
        4
    """
    cfg = model.cfg
    d_mlp = cfg.d_mlp or 0
    per_copy = n_pos * (8 * cfg.d_model + 3 * d_mlp + 3 * cfg.n_heads * n_pos) * 4 * 2
    return max(1, min(n_pos, budget // max(1, per_copy)))


@register("value_zeroing")
@torch.no_grad()
def value_zeroing(model: Model, run: MixingRun) -> LayerMaps:
    """Value zeroing, one prompt at a time (``context_mixing`` passes one)."""
    n_layers = model.cfg.n_layers
    length = int(run.mask[0].sum())
    tokens = run.tokens[:, :length]  # (1, pos): the real tokens only
    names = [f"blocks.{layer}.hook_resid_pre" for layer in range(n_layers)]
    names += [f"blocks.{layer}.hook_resid_post" for layer in range(n_layers)]
    _, cache = run_with_cache(model, tokens, names_filter=names)
    size = run.batch_size or copies_per_pass(model, length, run.memory_budget)
    maps = torch.zeros(n_layers, 1, run.n_pos, run.n_pos, device=tokens.device)
    with progress_bar(n_layers * length, "value zeroing", enabled=run.progress) as bar:
        for layer in range(n_layers):
            x = cache[f"blocks.{layer}.hook_resid_pre"]  # (1, pos, d_model)
            h = cache[f"blocks.{layer}.hook_resid_post"][0]  # (pos, d_model)
            scores = torch.zeros(length, length, device=x.device)  # (zeroed key, query)

            def work(
                keys: slice,
                layer: int = layer,
                x: Tensor = x,
                h: Tensor = h,
                scores: Tensor = scores,
            ) -> None:
                zeroed = torch.arange(keys.start, keys.stop, device=x.device)
                fired = []

                def zero(v: Tensor, hook: object) -> Tensor:  # (copy, pos, kv_head, d_head)
                    v = v.clone()
                    v[torch.arange(v.shape[0]), zeroed] = 0.0
                    fired.append(True)
                    return v

                with hook_scope(model, fwd_hooks=[(f"blocks.{layer}.attn.hook_v", zero)]):
                    out = model(
                        x.expand(len(zeroed), -1, -1),
                        start_at_layer=layer,
                        stop_at_layer=layer + 1,
                    )  # (copy, pos, d_model)
                if not fired:
                    raise UnsupportedModelError(
                        f"Expected block {layer}'s value vectors to pass through "
                        f"blocks.{layer}.attn.hook_v; the hook never ran (a fused attention "
                        "kernel?). Hint: load the model with mk.load_model."
                    )
                cos = torch.nn.functional.cosine_similarity(out, h[None], dim=-1)
                scores[keys] = 1.0 - cos  # (copy = zeroed key, query)
                bar.update(len(zeroed))

            each_batch(length, size, work)
            causal = torch.ones(length, length, device=x.device).tril()  # (query, key)
            maps[layer, 0, :length, :length] = scores.T * causal
    return LayerMaps(
        maps=maps,
        aggregated=roll_out(row_normalise(maps))[-1],
        aggregation="rollout of the row-normalised maps",
        cumulative=False,
        layers=tuple(range(n_layers)),
    )
