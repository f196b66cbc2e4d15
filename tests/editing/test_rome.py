"""ROME against the closed form's defining properties, a direct constrained least-squares
solve, and a hand-averaged key; edits applied and reverted bitwise."""

from __future__ import annotations

import pytest
import torch

import mechkit as mk
from mechkit.editing import RomeConfig, WeightEdit, rome, rome_update
from mechkit.editing.rome import context_prefixes, essence_prompt, prefixed, target_value
from tests.conftest import hook_count

CONFIG = RomeConfig(steps=8, n_prefixes=3, prefix_len=3)


def hand_key(model, fact, layer, prefixes):
    """The MLP key at the subject's last token, one plain forward per prompt, averaged."""
    keys = []
    for prefix in [[], *prefixes]:
        tokens = torch.tensor([*prefix, *fact.tokens.tolist()])[None]
        _, cache = model.run_with_cache(tokens)
        keys.append(cache[f"blocks.{layer}.mlp.hook_post"][0, len(prefix) + fact.subject[1] - 1])
    return torch.stack(keys).mean(0)


@pytest.fixture(scope="module")
def edit_and_key(tiny, tiny_facts):
    fact = tiny_facts[0]
    C = torch.eye(64) + 0.3 * torch.ones(64, 64) / 64  # a covariance that is not the identity
    e = rome(tiny, fact, layer=1, covariance=C, config=CONFIG)
    prefixes = context_prefixes(tiny, CONFIG.n_prefixes, CONFIG.prefix_len, CONFIG.seed)
    return e, hand_key(tiny, fact, 1, prefixes), C


def test_the_update_maps_the_averaged_key_to_the_value_exactly(tiny, edit_and_key, tiny_facts):
    e, k_hand, C = edit_and_key
    W = tiny.blocks[1].mlp.W_out.detach()
    delta = e.deltas["blocks.1.mlp.W_out"]
    assert torch.allclose(e.keys["L1"], k_hand, atol=1e-5)
    v = e.values["L1"]
    assert torch.allclose(k_hand @ (W + delta), v, atol=1e-4)
    # the original code's mistake: u from the averaged key, the denominator from the prompt's
    # own key; this check catches it
    fact = tiny_facts[0]
    k_plain = hand_key(tiny, fact, 1, [])
    u = torch.linalg.solve(C, k_hand)
    wrong = torch.outer(u, v - W.T @ k_hand) / (u @ k_plain)
    assert not torch.allclose(k_hand @ (W + wrong), v, atol=1e-3)


def test_the_update_is_the_least_C_weighted_norm_change(edit_and_key, tiny):
    e, k, C = edit_and_key
    W = tiny.blocks[1].mlp.W_out.detach().double()
    r = e.values["L1"].double() - W.T @ k.double()
    # min x^T C x subject to k^T x = r_j, one column at a time: the KKT system, solved directly
    n = k.shape[0]
    kkt = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    kkt[:n, :n] = 2 * C.double()
    kkt[:n, n] = k.double()
    kkt[n, :n] = k.double()
    rhs = torch.zeros(n + 1, r.shape[0], dtype=torch.float64)
    rhs[n] = r
    direct = torch.linalg.solve(kkt, rhs)[:n]  # (d_mlp, d_model)
    assert torch.allclose(e.deltas["blocks.1.mlp.W_out"].double(), direct, atol=1e-5)
    # and identity C is a plain least-norm solve: the pseudo-inverse of k^T
    plain = rome_update(W, k.double(), e.values["L1"].double())
    assert torch.allclose(plain, torch.linalg.pinv(k.double()[None]) @ r[None], atol=1e-8)


def test_the_edit_changes_the_prediction_and_reverts_bitwise(tiny, tiny_facts):
    # (that it makes the new object likely is checked on SmolLM2: this random model's
    # residual stream is too large for a small change to move it much)
    fact = tiny_facts[0]
    e = rome(tiny, fact, layer=1, covariance="identity", config=CONFIG)
    params = {k: v.clone() for k, v in tiny.state_dict().items()}
    tokens = fact.tokens[None]
    before = tiny(tokens)[0, -1].softmax(-1)
    with mk.edit(tiny, e):
        after = tiny(tokens)[0, -1].softmax(-1)
    assert after[fact.new_target] > before[fact.new_target]
    assert all(torch.equal(v, params[k]) for k, v in tiny.state_dict().items())
    handle = e.apply(tiny)
    assert not torch.equal(tiny.blocks[1].mlp.W_out, params["blocks.1.mlp.W_out"])
    handle.revert()
    handle.revert()  # twice is a no-op
    assert all(torch.equal(v, params[k]) for k, v in tiny.state_dict().items())
    with pytest.raises(RuntimeError, match="inside"), mk.edit(tiny, [e, e]):
        raise RuntimeError("inside")
    assert all(torch.equal(v, params[k]) for k, v in tiny.state_dict().items())
    assert hook_count(tiny) == 0


def test_save_and_load(tiny, edit_and_key, tmp_path):
    e, _, _ = edit_and_key
    back = WeightEdit.load(e.save(tmp_path / "e.safetensors"))
    assert back.method == "ROME" and back.requests == e.requests and back.record == e.record
    assert torch.equal(back.deltas["blocks.1.mlp.W_out"], e.deltas["blocks.1.mlp.W_out"])
    assert torch.equal(back.keys["L1"], e.keys["L1"])
    (tmp_path / "bad.safetensors").write_bytes(b"\x89PNG" + bytes(100))
    with pytest.raises(mk.FileFormatError, match="weight edit"):
        WeightEdit.load(tmp_path / "bad.safetensors")


def test_prefixed_prompts_shift_the_subject(tiny_facts):
    f = tiny_facts[0]
    [same, moved] = prefixed(f, [[3, 4]])
    assert same is f and moved.subject == (f.subject[0] + 2, f.subject[1] + 2)
    assert moved.tokens[moved.last_subject] == f.tokens[f.last_subject]


def test_bad_input(tiny, toy, tiny_facts):
    with pytest.raises(mk.InvalidArgumentError, match=r"layer in 0..3"):
        rome(tiny, tiny_facts[0], layer=4, covariance="identity")
    with pytest.raises(mk.UnsupportedModelError, match="attention-only"):
        rome(toy, tiny_facts[0], layer=0, covariance="identity")
    no_target = mk.editing.TokenizedFact(torch.tensor([1, 2, 3]), (0, 1), 4)
    with pytest.raises(mk.InvalidArgumentError, match="new_target"):
        rome(tiny, no_target, layer=0, covariance="identity", config=CONFIG)
    with pytest.raises(mk.InvalidArgumentError, match="covariance"):
        rome(tiny, tiny_facts[0], layer=0, covariance="wikipedia", config=CONFIG)
    with pytest.raises(mk.InvalidArgumentError, match="steps"):
        RomeConfig(steps=0)


def test_the_batched_value_loss_equals_one_hooked_forward_per_prompt(tiny, tiny_facts):
    # target_value runs all prompts (of several lengths) and the KL prompt as one right-padded
    # batch from block layer + 1 on; its reported losses must be those of plain forwards
    fact, layer = tiny_facts[0], 1
    prompts = prefixed(fact, [[3, 4, 5], [7]])  # lengths 10, 8 and 7
    essence = essence_prompt(tiny, fact)
    delta, losses = target_value(tiny, prompts, layer, CONFIG, essence=essence)
    assert losses["steps"] == CONFIG.steps and delta.norm() > 0

    def last_logp(p, add):
        def hook(act, hook):
            act = act.clone()
            act[0, p.last_subject] += add
            return act

        with tiny.hooks(fwd_hooks=[(f"blocks.{layer}.hook_mlp_out", hook)]), torch.no_grad():
            return tiny(p.tokens[None])[0, -1].log_softmax(-1)

    nll = -sum(float(last_logp(p, delta)[p.new_target]) for p in prompts) / len(prompts)
    before, after = last_logp(essence, 0 * delta), last_logp(essence, delta)
    kl = float((before.exp() * (before - after)).sum())
    assert losses["nll"] == pytest.approx(nll, rel=1e-4)
    assert losses["kl"] == pytest.approx(kl, rel=1e-3, abs=1e-6)
