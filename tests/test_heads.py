"""Head detection against answers known in advance: hand-built attention patterns, hand-built
models whose OV circuit copies or increments, a naive per-prompt, per-head loop on SmolLM2, an
independent per-head OV computation on a small GQA model, and the toy model's induction circuit."""

from __future__ import annotations

import warnings

import pytest
import torch

import mechkit.heads as heads
from mechkit.errors import (
    EmptyDatasetError,
    InvalidSiteError,
    MechkitError,
    ShapeError,
    UnknownKindError,
)
from mechkit.heads import HeadScores, attention_targets, detect_heads, render_attention
from mechkit.heads import score_patterns as score
from tests.conftest import hook_count

ATTENTION_KINDS = ["previous_token", "duplicate_token", "induction"]


def _hooked(**cfg):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return HookedTransformer(HookedTransformerConfig(device="cpu", **cfg))


def _ov_model(mlp_shift: bool = False):
    """One layer, one-hot embeddings and unembedding, three heads: H0 copies the token it reads,
    H1 has W_O = 0, H2 maps token i to i + 1. With ``mlp_shift`` the model has an MLP that turns
    token i's embedding into token i + 1's (so MLP0's "effective embedding" is the successor)."""
    V = 16
    extra = {"d_mlp": V, "act_fn": "relu"} if mlp_shift else {"attn_only": True}
    model = _hooked(
        n_layers=1, d_model=V, d_head=V, n_heads=3, d_vocab=V, n_ctx=12,
        normalization_type=None, **extra,
    )  # fmt: skip
    shift = torch.eye(V).roll(1, dims=1)  # e_i @ shift = e_{i+1} (mod V)
    with torch.no_grad():
        model.embed.W_E.copy_(torch.eye(V))
        model.unembed.W_U.copy_(torch.eye(V))
        model.unembed.b_U.zero_()
        attn = model.blocks[0].attn
        attn.W_V.copy_(torch.stack([torch.eye(V), torch.eye(V), shift]))
        attn.W_O.copy_(torch.stack([torch.eye(V), torch.zeros(V, V), torch.eye(V)]))
        if mlp_shift:
            mlp = model.blocks[0].mlp
            mlp.W_in.copy_(torch.eye(V))
            mlp.b_in.zero_()
            mlp.W_out.copy_(shift - torch.eye(V))  # e_i + relu(e_i) (shift - I) = e_{i+1}
            mlp.b_out.zero_()
    return model


# ----------------------------------------------------------------------------------------------
# Targets and the pattern -> score step, on hand-built patterns
# ----------------------------------------------------------------------------------------------


def test_targets_by_hand():
    tokens = torch.tensor([[0, 7, 8, 7, 8, 7]])

    def keys(kind):
        t = attention_targets(tokens, kind)[0]
        return [t[q].nonzero().flatten().tolist() for q in range(6)]

    assert keys("previous_token") == [[], [0], [1], [2], [3], [4]]
    assert keys("duplicate_token") == [[], [], [], [1], [2], [1, 3]]
    assert keys("induction") == [[], [], [], [2], [3], [2, 4]]


def _perfect(targets):
    """Attention spread over each row's targets; rows with no target attend to position 0."""
    pattern = targets.float()
    pattern[..., 0] += ~targets.any(-1)
    return (pattern / pattern.sum(-1, keepdim=True))[:, None]  # (batch, 1, query, key)


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_a_perfect_head_scores_one(kind):
    tokens = torch.tensor([[0, 5, 6, 7, 5, 6, 7], [0, 9, 4, 9, 4, 9, 4]])
    targets = attention_targets(tokens, kind)
    assert score(_perfect(targets), targets).item() == pytest.approx(1.0, abs=1e-6)
    # a head that looks only at BOS gets credit only where BOS is the target (q = 1, previous)
    on_bos = torch.zeros(2, 1, 7, 7)
    on_bos[..., 0] = 1.0
    expected = 1 / 6 if kind == "previous_token" else 0.0
    assert score(on_bos, targets).item() == pytest.approx(expected, abs=1e-6)


def test_uniform_attention_scores_the_expected_value():
    tokens = torch.tensor([[0, 3, 4, 3, 4, 3, 9]])
    uniform = torch.ones(7, 7).tril()
    uniform = (uniform / uniform.sum(-1, keepdim=True))[None, None]  # row q: 1 / (q + 1)
    prev = attention_targets(tokens, "previous_token")
    assert score(uniform, prev).item() == pytest.approx(sum(1 / (q + 1) for q in range(1, 7)) / 6)
    dup = attention_targets(tokens, "duplicate_token")  # rows 3, 4, 5 with 1, 1, 2 targets
    assert score(uniform, dup).item() == pytest.approx((1 / 4 + 1 / 5 + 2 / 6) / 3)


def test_rows_without_target_are_left_out():
    """Changing the attention of rows that have no target changes nothing."""
    tokens = torch.tensor([[0, 3, 4, 5, 3, 4, 5]])
    targets = attention_targets(tokens, "induction")
    pattern = _perfect(targets)
    other = pattern.clone()
    other[0, 0, :4] = torch.ones(4, 7).tril() / torch.arange(1, 5)[:, None]
    assert torch.equal(score(pattern, targets), score(other, targets))
    assert score(pattern, targets).item() == pytest.approx(1.0)


def test_score_patterns_errors():
    tokens = torch.tensor([[0, 1, 2, 3]])
    with pytest.raises(EmptyDatasetError, match="repeated|more than once"):
        score(torch.ones(1, 2, 4, 4) / 4, attention_targets(tokens, "induction"))
    with pytest.raises(ShapeError, match="got pattern"):
        score(torch.ones(1, 2, 4, 5), attention_targets(tokens, "previous_token"))


# ----------------------------------------------------------------------------------------------
# SmolLM2: batched scores equal a naive per-prompt, per-head loop
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_prompts(smollm2):
    generator = torch.Generator().manual_seed(1)
    segment = torch.randint(100, 20000, (6,), generator=generator)
    repeated = torch.cat([torch.tensor([1]), segment, segment])  # (13,)
    text = smollm2.to_tokens(
        "the cat saw the dog and the cat saw the red dog and the dog saw the cat", prepend_bos=False
    )
    return torch.stack([repeated, text[0, :13]])  # (2, 13)


@pytest.fixture(scope="module")
def smol_patterns(smollm2, smol_prompts):
    """Each prompt's patterns from its own forward pass: [prompt][layer][head][query][key]."""
    out = []
    with torch.no_grad():
        for prompt in smol_prompts:
            _, cache = smollm2.run_with_cache(prompt[None], names_filter=lambda n: "pattern" in n)
            out.append([cache["pattern", layer][0].tolist() for layer in range(30)])
    return out


def _naive(patterns, tokens, kind):
    """Mean attention on the targets, prompt by prompt, row by row, head by head, in Python."""
    sums = [[0.0] * 9 for _ in range(30)]
    rows = 0
    for prompt, toks in zip(patterns, tokens.tolist(), strict=True):
        for q, tok in enumerate(toks):
            earlier = [k for k in range(q) if toks[k] == tok]
            keys = {"previous_token": [q - 1] if q else [], "duplicate_token": earlier}.get(
                kind, [k + 1 for k in earlier]
            )
            if not keys:
                continue
            rows += 1
            for layer in range(30):
                for head in range(9):
                    sums[layer][head] += sum(prompt[layer][head][q][k] for k in keys)
    return torch.tensor(sums, dtype=torch.float64) / rows


@torch.no_grad()
@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_matches_a_naive_loop_on_smollm2(smollm2, smol_prompts, smol_patterns, kind):
    batch_size = 1 if kind == "induction" else 2  # one batch, and a sum over two
    ours = detect_heads(smollm2, kind, tokens=smol_prompts, batch_size=batch_size)
    assert ours.scores.shape == (30, 9) and ours.kind == kind
    assert ours.model_name == "smollm2-135m"
    naive = _naive(smol_patterns, smol_prompts, kind)
    assert (ours.scores.double() - naive).abs().max() < 1e-5
    assert ours.scores.max() > 0.3  # the prompts give every kind something to find
    assert hook_count(smollm2) == 0


@torch.no_grad()
def test_smollm2_default_data(smollm2):
    """SmolLM2 has strong induction heads (in its late-middle layers) and previous-token heads."""
    induction = detect_heads(smollm2, "induction", n_prompts=2, seq_len=20)
    previous = detect_heads(smollm2, "previous_token", n_prompts=2, seq_len=20)
    assert induction.scores.max() > 0.6 and previous.scores.max() > 0.6
    assert induction.scores.min() >= 0.0 and induction.scores.max() <= 1.0
    assert int(induction.top(1)[0][0][1:].split("H")[0]) >= 10  # not an early layer
    assert hook_count(smollm2) == 0


def test_default_tokens(smollm2):
    tokens = heads._repeated_random_tokens(smollm2, 3, 25, seed=0)
    assert tokens.shape == (3, 51)
    assert (tokens[:, 0] == smollm2.tokenizer.bos_token_id).all()
    assert torch.equal(tokens[:, 1:26], tokens[:, 26:])
    special = set(smollm2.tokenizer.all_special_ids) | set(smollm2.tokenizer.added_tokens_decoder)
    assert not special & set(tokens[:, 1:].flatten().tolist())
    assert all(len(set(row[1:26].tolist())) == 25 for row in tokens)  # distinct in a segment
    assert torch.equal(tokens, heads._repeated_random_tokens(smollm2, 3, 25, seed=0))
    assert not torch.equal(tokens, heads._repeated_random_tokens(smollm2, 3, 25, seed=1))


# ----------------------------------------------------------------------------------------------
# The toy model: previous-token heads in layer 0, induction heads in layer 1
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def test_toy_has_a_previous_token_head_and_an_induction_head(toy):
    previous = detect_heads(toy, "previous_token")
    induction = detect_heads(toy, "induction")
    # The shipped toy's previous-token head is diffuse (0.5; uniform attention scores ~0.05): it
    # is the one layer-0 head far above the others. Its induction heads are sharp.
    layer0 = previous.scores[0].sort(descending=True).values
    assert layer0[0] > 0.4 and layer0[1] < 0.2
    assert induction.scores[1].max() > 0.9
    # one layer alone cannot match prefixes (Olsson et al.): layer 0 has no induction head
    assert induction.scores[0].max() < 0.5
    # and the induction head copies what it attends to
    best = int(induction.scores[1].argmax())
    assert detect_heads(toy, "copying").scores[1, best] > 0.9
    assert hook_count(toy) == 0


# ----------------------------------------------------------------------------------------------
# OV scores on hand-built models
# ----------------------------------------------------------------------------------------------


def test_copying_on_a_hand_built_model():
    model = _ov_model()
    scores = detect_heads(model, "copying").scores
    assert scores.tolist() == [[1.0, 0.0, 0.0]]  # W_O = 0: every logit ties; ties count against
    assert detect_heads(model, "copying", top_k=1, tokens=[3, 4, 4]).scores[0, 0] == 1.0


def test_successor_on_a_hand_built_model():
    model = _ov_model()
    families = [list(range(0, 8)), list(range(8, 16))]
    assert detect_heads(model, "successor", tokens=families).scores.tolist() == [[0.0, 0.0, 1.0]]
    # the shift maps 5 to 6 and 9 to 10, not to 9 and 2: 14 of 16 items are right
    families.append([5, 9, 2])
    assert detect_heads(model, "successor", tokens=families).scores.tolist() == [[0, 0, 0.875]]
    with pytest.raises(EmptyDatasetError, match="tokens="):
        detect_heads(model, "successor")  # no tokenizer, no built-in sequences


def test_effective_embedding_goes_through_mlp0():
    model = _ov_model(mlp_shift=True)  # MLP0 turns token i into token i + 1
    families = [list(range(0, 8)), list(range(8, 15))]
    through = detect_heads(model, "successor", tokens=families).scores
    bare = detect_heads(model, "successor", tokens=families, effective_embedding=False).scores
    assert through[0, 0] == 1.0 and bare[0, 0] == 0.0  # copying head reads i + 1
    assert bare[0, 2] == 1.0 and through[0, 2] == 0.0  # successor head writes i + 2


def _naive_copying(model, ids, top_k):
    """Per layer and head, with the head's own key/value group picked by hand (GQA)."""
    cfg = model.cfg
    group = cfg.n_heads // (cfg.n_key_value_heads or cfg.n_heads)
    x = model.W_E[ids]
    x = x + model.blocks[0].mlp(model.blocks[0].ln2(x[None]))[0]
    out = torch.zeros(cfg.n_layers, cfg.n_heads)
    for layer in range(cfg.n_layers):
        attn = model.blocks[layer].attn
        xn = x - x.mean(-1, keepdim=True)
        xn = xn / (xn.pow(2).mean(-1, keepdim=True) + cfg.eps).sqrt()
        for head in range(cfg.n_heads):
            o = xn @ attn._W_V[head // group] @ attn.W_O[head]
            logits = (o - o.mean(-1, keepdim=True)) @ model.W_U  # (n, d_vocab)
            kth = logits.topk(top_k, dim=-1).values[:, -1]
            out[layer, head] = (logits[torch.arange(len(ids)), ids] >= kth).float().mean()
    return out


@pytest.mark.parametrize("n_ids", [40, 5])  # more tokens than d_head (8), and fewer
@torch.no_grad()
def test_copying_matches_a_per_head_computation_on_a_gqa_model(monkeypatch, n_ids):
    torch.manual_seed(0)
    model = _hooked(
        n_layers=2, d_model=32, d_head=8, n_heads=4, n_key_value_heads=2, d_vocab=300,
        n_ctx=16, d_mlp=64, act_fn="gelu", normalization_type="LNPre",
    )  # fmt: skip
    with torch.no_grad():  # tied unembedding and W_O = W_V^T: a head that roughly copies
        model.unembed.W_U.copy_(model.W_E.T)
        model.blocks[1].attn.W_O[3] = model.blocks[1].attn._W_V[1].T
    monkeypatch.setattr(heads, "_LOGIT_BUDGET", 1000)  # force many vocabulary chunks
    ids = torch.randperm(300)[:n_ids]
    ours = detect_heads(model, "copying", tokens=ids, top_k=20).scores
    assert torch.equal(ours, _naive_copying(model, ids, top_k=20))
    assert ours.max() > ours.min()


# ----------------------------------------------------------------------------------------------
# Results, errors, hooks
# ----------------------------------------------------------------------------------------------


def test_head_scores_object():
    result = HeadScores("induction", torch.tensor([[0.125, 0.25], [0.75, float("nan")]]), "m")
    assert result.top(2) == [("L1H0", 0.75), ("L0H1", 0.25)]
    assert result.top(4)[-1][0] == "L1H1"  # NaN last
    frame = result.to_dataframe()
    assert list(frame.columns) == ["layer", "head", "label", "score"] and len(frame) == 4
    assert frame.loc[frame.label == "L1H0", "score"].item() == 0.75
    fig = result.plot()
    assert fig.data[0].z.shape == (2, 2) and "induction" in fig.layout.title.text
    with pytest.raises(ShapeError):
        HeadScores("induction", torch.zeros(4), "m")


def test_unknown_kind_and_bad_arguments():
    model = _ov_model()
    with pytest.raises(UnknownKindError, match="Did you mean 'induction'") as info:
        detect_heads(model, "inductoin")
    assert isinstance(info.value, ValueError) and isinstance(info.value, MechkitError)
    assert "previous_token, duplicate_token" in str(info.value)
    with pytest.raises(ShapeError, match="n_ctx"):
        detect_heads(model, "induction", seq_len=6)  # 13 positions > n_ctx 12
    with pytest.raises(ShapeError, match="top_k"):
        detect_heads(model, "copying", top_k=0)
    with pytest.raises(ShapeError, match=r"\[0, 16\)"):
        detect_heads(model, "induction", tokens=[[0, 1, 16]])
    with pytest.raises(EmptyDatasetError):
        detect_heads(model, "induction", tokens=[[0, 1, 2, 3]])  # no token repeats


def test_no_hook_left_when_a_hook_raises(monkeypatch):
    model = _ov_model()

    def boom(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(heads, "_target_attention", boom)
    with pytest.raises(RuntimeError, match="boom"):
        detect_heads(model, "previous_token", seq_len=5)
    assert hook_count(model) == 0


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------


def test_render_attention_writes_a_self_contained_file(tmp_path):
    model = _ov_model()
    view = render_attention(
        model, [0, 3, 4, 3, 4], heads=[(0, 2), (-1, 0)], path=tmp_path / "a.html"
    )
    assert view.path == tmp_path / "a.html" and view.heads == ((0, 2), (0, 0))
    assert [p.name for p in tmp_path.iterdir()] == ["a.html"]  # no temporary file left
    text = view.path.read_text()
    assert text.startswith("<!DOCTYPE html>") and "L0H2" in text and "L0H0" in text
    assert "unpkg.com" not in text and "CircuitsVis" in text  # JavaScript inlined
    assert view._repr_html_() in text and view.tokens == ("0", "3", "4", "3", "4")
    with pytest.raises(InvalidSiteError, match="head"):
        render_attention(model, [0, 3], heads=[(0, 3)], path=tmp_path / "b.html")
    assert hook_count(model) == 0


@torch.no_grad()
def test_render_attention_on_text(smollm2, tmp_path):
    view = render_attention(smollm2, "The cat sat. The cat", heads=[(18, 6)], path=tmp_path / "x")
    assert view.tokens == tuple(smollm2.to_str_tokens("The cat sat. The cat"))
    assert view.path.read_text().count("circuits-vis-") >= 1
    assert hook_count(smollm2) == 0


# ----------------------------------------------------------------------------------------------
# Issue 15: the core's ranking, naming and BOS helper
# ----------------------------------------------------------------------------------------------


def test_head_scores_top_defaults_to_ten_by_the_rank_rule():
    from mechkit.core import rank

    scores = torch.arange(24.0).reshape(4, 6) / 24  # 24 heads, all distinct
    result = HeadScores("induction", scores, "m")
    top = result.top()
    assert len(top) == 10  # was 5 before the one .top(n=10) signature
    labels = [f"L{layer}H{head}" for layer in range(4) for head in range(6)]
    assert top == rank(labels, scores.flatten(), 10)
    assert top[0][0] == "L3H5" and top[-1][0] == "L2H2"  # the largest first
    assert result.top(3, absolute=False) == top[:3]


def test_render_attention_takes_head_names_and_sites(tmp_path):
    model = _ov_model()
    by_pair = render_attention(model, [0, 3, 4], heads=[(0, 2)], path=tmp_path / "a.html")
    for spec in ("L0H2", "a0.h2", "0.2", mk_site("z", 0, 2)):
        view = render_attention(model, [0, 3, 4], heads=[spec], path=tmp_path / "b.html")
        assert view.heads == by_pair.heads == ((0, 2),) and "L0H2" in view.html
    with pytest.raises(InvalidSiteError, match="attention head"):
        render_attention(model, [0, 3, 4], heads=["L0.mlp"], path=tmp_path / "c.html")


def mk_site(component, layer, head):
    from mechkit.sites import Site

    return Site(component, layer=layer, head=head)


def test_bos_token_id_is_public_in_tokens(toy):
    from mechkit.tokens import bos_token_id

    assert bos_token_id(toy) == 0
    assert bos_token_id(_ov_model()) == 0


def _recording_progress_bar(monkeypatch, module):
    """Replace ``module.progress_bar`` (mechkit.core's, as imported there) by one that records
    each bar's arguments and how far it got, and shows nothing."""
    from mechkit.core import progress_bar

    bars = []

    def recording(total, description, *, enabled=True, **kw):
        bar = progress_bar(total, description, enabled=False, **kw)
        bars.append({"total": total, "enabled": enabled, "bar": bar})
        return bar

    monkeypatch.setattr(module, "progress_bar", recording)
    return bars


@pytest.mark.parametrize("kind", ["induction", "copying"])
def test_detect_heads_progress_argument_drives_the_core_progress_bar(toy, monkeypatch, kind):
    bars = _recording_progress_bar(monkeypatch, heads)
    kw = {"n_prompts": 5, "seq_len": 6, "batch_size": 2} if kind == "induction" else {}
    shown = detect_heads(toy, kind, n_tokens=32, **kw)
    hidden = detect_heads(toy, kind, n_tokens=32, progress=False, **kw)
    torch.testing.assert_close(shown.scores, hidden.scores)
    assert [b["enabled"] for b in bars] == [True, False]
    total = 5 if kind == "induction" else toy.cfg.n_layers  # prompts, or layers for OV kinds
    assert [(b["total"], b["bar"].n) for b in bars] == [(total, total)] * 2


def test_successor_and_copying_scores_include_gemma_post_norms():
    """Gemma normalizes the attention's and the MLP's outputs before adding them: the scores
    read each token as the residual after block 0 with the attention zeroed, and each head's
    output through ln1_post's weights. Checked against real one-token runs of each head."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=1, d_model=16, n_heads=2, d_head=8, d_mlp=32, n_ctx=8, d_vocab=12,
        act_fn="gelu", normalization_type="RMS", positional_embedding_type="rotary",
        use_normalization_before_and_after=True, seed=5,
    )  # fmt: skip
    model = HookedTransformer(cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".w"):  # weights away from 1, so that leaving one out shows
                param.uniform_(0.2, 3.0, generator=torch.Generator().manual_seed(len(name)))
        model.blocks[0].attn.b_V.zero_()
        model.blocks[0].attn.b_O.zero_()
    families = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    ids = torch.arange(12)
    zero_attn = [("blocks.0.hook_attn_out", lambda act, hook: torch.zeros_like(act))]
    with torch.no_grad():
        effective = model.run_with_hooks(
            ids[:, None], fwd_hooks=zero_attn, return_type=None, stop_at_layer=1
        )  # (token, 1, d_model): the residual after block 0 without attention
    expected = torch.zeros(1, 2)
    for head in range(2):

        def only(act, hook, head=head):
            act = act.clone()
            act[:, :, 1 - head] = 0
            return act

        hooks = [
            ("blocks.0.hook_resid_pre", lambda act, hook: effective),
            ("blocks.0.attn.hook_z", only),
        ]
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            _, cache = model.run_with_cache(ids[:, None], return_type=None)
        logits = (cache["blocks.0.hook_attn_out"][:, 0] * model.ln_final.w) @ model.W_U
        wins = [
            bool(logits[item, nxt] > logits[item, [t for t in family if t != nxt]].max())
            for family in families
            for item, nxt in zip(family[:-1], family[1:], strict=True)
        ]
        expected[0, head] = sum(wins) / len(wins)
    got = detect_heads(model, "successor", tokens=families, progress=False).scores
    torch.testing.assert_close(got, expected)
