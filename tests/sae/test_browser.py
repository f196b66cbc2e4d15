"""The feature browser: top contexts, frequencies and histograms equal a direct scan; logit
effects equal W_dec @ W_U through the final norm's linear part; the page is self-contained and
escapes token text."""

from __future__ import annotations

import re

import pytest
import torch

import mechkit as mk
from mechkit.errors import InvalidSiteError
from mechkit.sae.base import SAEConfig, SparseDictionary
from mechkit.sae.browser import collect_features, feature_browser

torch.set_num_threads(1)

RESID = "blocks.1.hook_resid_pre"


def make_dict(hook, d_in, d_sae, seed=0):
    """A mechkit ReLU SAE: initial weights, random negative-leaning biases (sparser firing)."""
    cfg = SAEConfig(architecture="relu", d_in=d_in, d_sae=d_sae, hook_name=hook)
    sae = SparseDictionary.from_config(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(d_sae, generator=g) * 0.3 - 0.6)
    return sae


class StubTokenizer:
    """Token ``i`` decodes to ``t{i}``, except a few hostile strings."""

    bos_token_id = 0
    eos_token_id = 0
    padding_side = "right"  # TransformerLens reads it on every forward
    SPECIAL = {5: "<script>alert(1)</script>", 6: "\" onmouseover='x'", 7: "a & b\n"}

    def decode(self, ids):
        return "".join(self.SPECIAL.get(int(i), f"t{int(i)}") for i in ids)

    def __len__(self):
        return 500


def tokens_for_test(n: int = 8, length: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 500, (n, length), generator=g)
    tokens[:, 0] = 0  # BOS
    tokens[:, 5:8] = torch.tensor([5, 6, 7])  # the hostile tokens appear in every row
    return tokens


@pytest.fixture(scope="module")
def model():
    return mk.load_model("attn-only-2l", device="cpu")


@pytest.fixture(scope="module")
def sae():
    return make_dict(RESID, 128, 64, seed=2)


@torch.no_grad()
def _latent_values(model, sae, tokens):
    got = {}
    with model.hooks(fwd_hooks=[(RESID, lambda a, hook: got.setdefault("x", a.clone()))]):
        model(tokens)
    return sae.encode(got["x"])  # (batch, pos, d_sae)


def test_contexts_frequency_and_histogram_equal_a_direct_scan(model, sae):
    tokens = tokens_for_test()
    latents = [3, 10, 41]
    report = collect_features(
        model, sae, tokens, latents, n_contexts=3, window=8, batch_size=3, progress=False
    )
    f = _latent_values(model, sae, tokens)
    assert report.latents == tuple(latents) and report.n_tokens == 8 * 23
    for latent in latents:
        data = report[latent]
        v = f[:, 1:, latent]  # position 0 (BOS) is excluded
        assert data.frequency == pytest.approx(float((v > 0).float().mean()))
        assert data.max_activation == pytest.approx(float(v.max()))
        torch.testing.assert_close(data.activations.sort().values, v[v > 0].sort().values)
        best, where = v.max(dim=1)
        rows = best.argsort(descending=True)[: len(data.contexts)].tolist()
        assert [c.row for c in data.contexts] == rows
        assert len(data.contexts) == min(3, int((best > 0).sum()))
        for c in data.contexts:
            assert c.position == int(where[c.row]) + 1
            assert c.max_activation == pytest.approx(float(f[c.row, c.position, latent]))
            assert len(c.tokens) == 8 and c.start <= c.position < c.start + 8
            window = f[c.row, c.start : c.start + 8, latent]
            assert c.activations == pytest.approx(window.tolist(), abs=1e-6)
            assert list(c.token_ids) == tokens[c.row, c.start : c.start + 8].tolist()
    assert len(report[3].contexts) > 0
    frame = report.to_dataframe()
    assert set(frame["latent"]) <= set(latents)
    assert len(frame) == sum(len(report[i].contexts) for i in latents)
    assert len(report.plot().data) == 3


def test_logit_effects_are_the_decoder_direction_through_the_unembedding(model, sae):
    report = collect_features(model, sae, tokens_for_test(n=2), [3, 4], progress=False)
    assert model.cfg.normalization_type == "LNPre"  # folded LayerNorm: centre, then W_U
    for latent in (3, 4):
        d = sae.W_dec[latent].detach()
        effect = (d - d.mean()) @ model.W_U
        top = effect.topk(10)
        promoted = report[latent].promoted
        assert [name for name, _ in promoted] == [f"#{i}" for i in top.indices.tolist()]
        assert [v for _, v in promoted] == pytest.approx(top.values.tolist(), abs=1e-5)
        low = effect.topk(10, largest=False)
        assert [v for _, v in report[latent].suppressed] == pytest.approx(low.values.tolist())
    assert "centred" in report.logit_note
    z_sae = make_dict("blocks.0.attn.hook_z", 128, 16)  # heads flattened: not the residual
    z_report = collect_features(model, z_sae, tokens_for_test(n=2), [0], progress=False)
    assert z_report[0].promoted == () and "not to the residual stream" in z_report.logit_note


def test_page_is_self_contained_and_escapes_tokens(model, sae, tmp_path):
    named = mk.load_model("attn-only-2l", device="cpu")  # a copy we can give a tokenizer
    named.tokenizer = StubTokenizer()
    tokens = tokens_for_test()
    latent = 3
    assert bool((_latent_values(named, sae, tokens)[:, 1:, latent] > 0).any())
    # windows as long as the rows: every context shows the hostile tokens at positions 5-7
    path = feature_browser(
        named,
        sae,
        tokens,
        [latent, 1],
        out=tmp_path / "sub" / "f.html",
        window=24,
        progress=False,
    )
    page = path.read_text(encoding="utf-8")
    assert path == tmp_path / "sub" / "f.html"
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 1
    assert "<script" not in page.lower()  # neither the token nor any script of ours
    assert "onmouseover='x'" not in page and "&quot; onmouseover=&#x27;x&#x27;" in page
    assert "a &amp; b\u21b5" in page
    assert not re.search(r"(src|href)=['\"]?(https?:)?//", page)  # nothing fetched
    assert "http" not in page
    assert page.count("<section") == 2 and page.count("<svg") == 2
    assert f"id='latent-{latent}'" in page and "W_dec[i] @ W_U" in page
    assert not list(tmp_path.glob("sub/.f.html.*"))  # no temporary file left behind


def test_bad_latents_and_never_firing_latents(model, sae):
    tokens = tokens_for_test(n=2)
    with pytest.raises(InvalidSiteError, match=r"\[0, 64\)"):
        collect_features(model, sae, tokens, [64], progress=False)
    with pytest.raises(ValueError):
        feature_browser(model, sae, tokens, [-1], out="/tmp/never-written.html", progress=False)
    dead = make_dict(RESID, 128, 4)
    with torch.no_grad():
        dead.b_enc[2] = -1e6
    report = collect_features(model, dead, tokens, 2, progress=False)
    assert report[2].contexts == () and report[2].frequency == 0.0
    assert "never fires" in report.to_html()


def test_report_top_ranks_latents_by_max_activation(model, sae):
    """FeatureReport.top(n): the latents of largest maximum activation, checked against a sort
    of the features' own maxima."""
    tokens = torch.randint(1, 500, (6, 20), generator=torch.Generator().manual_seed(3))
    report = collect_features(model, sae, tokens, [0, 1, 2, 3, 4], progress=False)
    expected = sorted(report.features, key=lambda f: -f.max_activation)[:3]
    assert report.top(3) == [(f.latent, f.max_activation) for f in expected]
