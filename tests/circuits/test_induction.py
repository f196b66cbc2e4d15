"""Tests of circuits/induction.py and circuits/induction_phase_change.py.

Checked against independent computations: attention patterns read straight from TransformerLens's
cache, path patching into one key written by hand with TransformerLens's split-qkv hooks, the
ablated loss with a hand-written hook, and the losses with ``torch.nn.functional.cross_entropy``.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from circuits import induction_phase_change as pc
from circuits.induction import (
    InductionReport,
    icl_score,
    per_token_loss,
    repeated_tokens,
    reproduce,
)

SEQ = 20  # |r| in the toy tests: [BOS] + r + r = 41 tokens


@pytest.fixture(scope="module")
def toy_report(toy) -> InductionReport:
    torch.manual_seed(0)
    return reproduce(
        toy,
        n_prompts=8,
        seq_len=SEQ,
        n_path_prompts=8,
        path_seq_len=SEQ,
        path_heads=4,
        n_controls=3,
    )


def _direct_prefix_matching(model, tokens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Attention from each second-copy token to the token after its first occurrence."""
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    q = torch.arange(seq_len + 1, 2 * seq_len + 1)  # second-copy queries
    return torch.stack(
        [
            cache[f"blocks.{layer}.attn.hook_pattern"][:, :, q, q - seq_len + 1].mean((0, 2))
            for layer in range(model.cfg.n_layers)
        ]
    )  # (layer, head)


def test_finds_the_layer_one_induction_heads(toy, toy_report):
    tokens = repeated_tokens(toy, 8, SEQ)
    direct = _direct_prefix_matching(toy, tokens, SEQ)
    expected = {(1, h) for h in range(4) if direct[1, h] >= 0.4}
    assert expected, "the shipped toy model has induction heads in layer 1"
    assert set(toy_report.induction_heads) == expected
    assert torch.allclose(toy_report.prefix_matching.scores, direct, atol=0.02)
    best = toy_report.induction_heads[0]
    assert float(toy_report.prefix_matching.scores[best]) == float(
        toy_report.prefix_matching.scores.max()
    )


def test_path_patching_into_keys_picks_the_layer_zero_previous_token_head(toy, toy_report):
    feeding = toy_report.previous_token_heads
    assert feeding and all(layer == 0 for layer, _ in feeding)
    # the head the keys read is the one attending to the previous token (from its pattern)
    tokens = repeated_tokens(toy, 8, SEQ)
    _, cache = toy.run_with_cache(tokens, names_filter="blocks.0.attn.hook_pattern")
    pos = torch.arange(2, tokens.shape[1])
    previous = cache["blocks.0.attn.hook_pattern"][:, :, pos, pos - 1].mean((0, 2))  # (head,)
    assert feeding[0] == (0, int(previous.argmax()))


def test_path_patching_score_equals_a_hand_written_key_patch(toy, toy_report):
    """Sender L0H{h} into every layer-1 key: k_input of layer 1 gets the corrupt-minus-clean
    output of the sender added, nothing else changes (two layers: nothing to freeze)."""
    clean = repeated_tokens(toy, 8, SEQ)
    fresh = repeated_tokens(toy, 8, SEQ, seed=1)
    corrupt = torch.cat([clean[:, :1], fresh[:, 1 : 1 + SEQ], clean[:, 1 + SEQ :]], 1)
    layer0, head = toy_report.previous_token_heads[0]
    z = {}
    for name, toks in (("clean", clean), ("corrupt", corrupt)):
        _, cache = toy.run_with_cache(toks, names_filter="blocks.0.attn.hook_z")
        z[name] = cache["blocks.0.attn.hook_z"][:, :, head]  # (batch, pos, d_head)
    delta = (z["corrupt"] - z["clean"]) @ toy.blocks[0].attn.W_O[head]  # (batch, pos, d_model)

    def add_to_keys(k_input, hook):
        return k_input + delta[:, :, None, :]  # every layer-1 head's key input

    toy.set_use_split_qkv_input(True)
    try:
        with torch.no_grad():
            logits = toy.run_with_hooks(clean, fwd_hooks=[("blocks.1.hook_k_input", add_to_keys)])
    finally:
        toy.set_use_split_qkv_input(False)
    logprobs = logits[:, SEQ + 1 : -1].log_softmax(-1)
    direct = logprobs.gather(-1, clean[:, SEQ + 2 :, None]).mean()
    assert float(toy_report.path_patching.scores[layer0, head]) == pytest.approx(
        float(direct), abs=1e-4
    )
    assert float(direct) < float(toy_report.path_patching.clean_score) - 1.0


def test_ablating_induction_heads_raises_loss_far_more_than_control(toy, toy_report):
    summary = toy_report.ablation_summary()
    for method in ("zero", "mean"):
        assert summary["induction"][method] > 3.0  # the second copy becomes unpredictable
        # the toy's control is all 3 other layer-0 heads at once (zero: +2.2 nats, mean: +1.9;
        # they carry some of the diffuse previous-token signal too); induction heads: +6.7, +4.6
        assert summary["induction"][method] > 2 * max(summary["control"][method], 0.05)
        assert summary["induction"][method] - summary["control"][method] > 2.5
    taken = set(toy_report.induction_heads) | set(toy_report.previous_token_heads)
    controls = [a for a in toy_report.ablations if a.group == "control"]
    assert controls and all(not set(a.heads) & taken for a in controls)
    # the zero-ablated loss, by a hand-written hook on hook_z
    tokens = repeated_tokens(toy, 8, SEQ)
    heads = [h for _, h in toy_report.induction_heads]

    def zero(z, hook):
        z = z.clone()
        z[:, :, heads] = 0.0
        return z

    with torch.no_grad():
        logits = toy.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_z", zero)])
    loss = F.cross_entropy(logits[:, SEQ + 1 : -1].flatten(0, 1), tokens[:, SEQ + 2 :].flatten())
    zero_run = next(
        a for a in toy_report.ablations if a.group == "induction" and a.method == "zero"
    )
    assert zero_run.loss == pytest.approx(float(loss), abs=1e-3)
    assert (
        toy_report.repeated_loss["second_copy"] < 0.5 < 5.0 < toy_report.repeated_loss["first_copy"]
    )


def test_per_token_loss_and_icl_score_against_direct_computation(toy):
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(1, toy.cfg.d_vocab, (5, 60), generator=gen)
    tokens[:, 30:50] = tokens[:, 5:25]  # some repetition, so late tokens are easier
    losses = per_token_loss(toy, tokens, batch_size=2)
    assert losses.shape == tokens.shape and torch.isnan(losses[:, 0]).all()
    with torch.no_grad():
        for i in range(len(tokens)):
            logits = toy(tokens[i : i + 1])[0]
            direct = F.cross_entropy(logits[:-1], tokens[i, 1:], reduction="none")
            assert torch.allclose(losses[i, 1:], direct, atol=1e-5)
    score, stderr = icl_score(losses, early=10, late=40, window=2)
    diffs = [
        sum(losses[i, t].item() for t in range(38, 43)) / 5
        - sum(losses[i, t].item() for t in range(8, 13)) / 5
        for i in range(5)
    ]
    mean = sum(diffs) / 5
    assert score == pytest.approx(mean, abs=1e-5)
    assert stderr == pytest.approx(math.sqrt(sum((d - mean) ** 2 for d in diffs) / 4 / 5), rel=1e-4)
    assert score < -1.0  # the repeated tokens are predicted
    assert icl_score(torch.tensor([[0.0, 3.0, 2.0, 1.0]]), 1, 3)[0] == -2.0
    with pytest.raises(ValueError):
        icl_score(losses, early=1, late=40, window=2)  # the window reaches token 0


def test_report_serializes(toy_report, tmp_path):
    data = json.loads(toy_report.to_json(tmp_path / "r.json"))
    assert data["induction_heads"][0]["head"].startswith("L1H")
    assert data["icl"]["score"] is None  # the toy model has no tokenizer
    frame = toy_report.to_dataframe()
    assert len(frame) == 8 and frame["induction_head"].sum() == len(toy_report.induction_heads)
    page = toy_report.write(tmp_path)
    assert json.loads((tmp_path / "induction.json").read_text()) == toy_report.to_dict()
    assert "Induction heads" in page.read_text()
    assert (tmp_path / "plotly.min.js").exists() and (tmp_path / "index_ablation.html").exists()


def test_phase_change_script_tiny_run(tmp_path):
    cfg = pc.PhaseChangeConfig(steps_2l=3, steps_1l=2, eval_every=2, n_eval=8, batch_size=4)
    record = pc.run(cfg, log=False)
    assert set(record) >= {"config", "data", "models", "wall_seconds", "notes"}
    assert set(record) >= {"load_average_1_5_15", "cpu_seconds"}
    assert set(record["models"]) == {"2-layer", "1-layer"}
    two = record["models"]["2-layer"]
    assert [p["step"] for p in two["curve"]] == [0, 2, 3]
    fields = {"tokens_seen", "loss", "loss_first_copy", "loss_second_copy", "icl_score"}
    assert fields | {"prefix_matching_best", "best_head", "train_loss"} <= set(two["curve"][0])
    assert two["curve"][2]["tokens_seen"] == 3 * 4 * (cfg.n_ctx - 1)
    point = two["curve"][-1]
    score = point["loss_second_copy"] - point["loss_first_copy"]
    assert math.isclose(point["icl_score"], score, abs_tol=2e-4)
    assert record["models"]["1-layer"]["curve"][-1]["best_head"].startswith("L0")
    assert "first_step_prefix_matching_at_least_0.5" in two["summary"]
    assert "note" in record["phase_change"]  # 3 steps: no induction head
    json.dumps(record)
    assert pc.plot_record(record, tmp_path / "pc.png").stat().st_size > 1000


def test_phase_change_data_repeats_a_segment_then_text_or_noise():
    cfg = pc.PhaseChangeConfig(text_prob=0.5)
    stream = torch.arange(2, cfg.vocab_size)  # the "text": consecutive ids
    gen = torch.Generator().manual_seed(0)
    batch, lengths, is_text = pc.sample_batch(stream, gen, 64, cfg)
    assert batch.shape == (64, cfg.n_ctx) and (batch[:, 0] == pc.BOS).all()
    assert 0 < int(is_text.sum()) < 64
    assert int(lengths.min()) >= cfg.min_span and int(lengths.max()) <= cfg.max_span
    for row, length, text in zip(batch, lengths.tolist(), is_text.tolist(), strict=True):
        assert torch.equal(row[1 : 1 + length], row[1 + length : 1 + 2 * length])
        assert int(row[1:].min()) >= 2 and int(row.max()) < cfg.vocab_size
        filler = row[1 + 2 * length :]
        consecutive = bool((filler[1:] - filler[:-1] == 1).all())
        assert consecutive == text  # a window of the stream, or random tokens
    vocab = pc.build_vocabulary(["a cat sat", "the cat"], 20)
    ids = vocab.encode("the cat sat at")  # " at" is spelled in characters
    assert vocab.decode(ids) == "the cat sat at" and pc.UNK not in ids
    assert len(ids) == 6 and vocab.encode("w") == [pc.UNK]


def test_icl_copy_score_compares_the_same_tokens_in_both_copies():
    losses = torch.full((2, 12), float("nan"))
    losses[0, 1:] = torch.tensor([9.0, 5.0, 5.0, 9.0, 9.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0])
    losses[1, 1:] = torch.tensor([9.0, 4.0, 9.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    # row 0: L = 3, first copy tokens 2..3 (5, 5), second copy tokens 5..6 (9, 1)
    # row 1: L = 2, first copy token 2 (4), second copy token 4 (3)
    score, first, second = pc.icl_copy_score(losses, torch.tensor([3, 2]))
    assert math.isclose(first, (5.0 + 4.0) / 2) and math.isclose(second, (5.0 + 3.0) / 2)
    assert math.isclose(score, ((5.0 - 5.0) + (3.0 - 4.0)) / 2)


# The reproduction on SmolLM2 (induction heads found, previous-token heads in an earlier layer,
# ablations above the random control) is checked by the demo's section test in
# tests/test_readme_and_demo.py, which runs it at the same small settings: one run, not two.
