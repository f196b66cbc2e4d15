"""ContextMixing's views: word level by hand, save and load, dataframe, plot, token view."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import mechkit as mk
from mechkit.mixing import ContextMixing


def _with_words(mix: ContextMixing, words: tuple[str, ...]) -> ContextMixing:
    return dataclasses.replace(mix, str_tokens=(words,))


def test_word_level_sums_keys_and_averages_queries(toy):
    tokens = torch.tensor([[1, 2, 3, 4, 5]])
    mix = _with_words(
        mk.context_mixing(toy, tokens, method="rollout"), ("The", " ca", "t", " sa", "t")
    )
    m = mix.aggregated[0]
    words = mix.words()
    assert words.str_tokens[0] == ("The", " cat", " sat")
    expected = torch.tensor(
        [
            [m[0, 0], m[0, 1] + m[0, 2], m[0, 3] + m[0, 4]],
            [(m[1, 0] + m[2, 0]) / 2, (m[1, 1:3].sum() + m[2, 1:3].sum()) / 2, 0.0],
            [
                (m[3, 0] + m[4, 0]) / 2,
                (m[3, 1:3].sum() + m[4, 1:3].sum()) / 2,
                (m[3, 3:].sum() + m[4, 3:].sum()) / 2,
            ],
        ]
    )
    assert torch.allclose(words.aggregated[0], expected, atol=1e-6)


def test_save_load_dataframe_plot_and_token_view(toy, tmp_path):
    tokens = torch.tensor([[1, 2, 3, 4]])
    mix = mk.context_mixing(toy, tokens, method="alti_logit", answer=3)
    again = ContextMixing.load(mix.save(tmp_path / "mix"))
    assert torch.equal(again.maps, mix.maps) and torch.equal(again.logit, mix.logit)
    assert again.layers == mix.layers and again.method == "alti_logit"
    frame = mix.to_dataframe()
    assert len(frame) == 10 * (len(mix.layers) + 1)  # 10 (query, key) pairs per map
    row = frame[(frame.layer.isna()) & (frame["query"] == 3)]
    assert row["value"].tolist() == pytest.approx(mix.aggregated[0, 3].tolist(), abs=1e-6)
    fig = mix.plot()
    assert len(fig.data) == len(mix.layers) + 1 and fig.data[-1].visible
    assert mix.token_view(-1).count("<span") == 4


def test_circuitsvis_views_draw_each_layer_map_and_the_row(toy, monkeypatch):
    cv_attention = pytest.importorskip("circuitsvis.attention")
    from circuitsvis.utils.render import RenderedHTML

    tokens = torch.tensor([[1, 2, 3, 4, 5]])
    mix = mk.context_mixing(toy, tokens, method="alti_logit", answer=3)  # signed maps
    for view in ("heads", "patterns", "tokens"):
        assert isinstance(mix.circuitsvis(view), RenderedHTML)
    seen = {}
    monkeypatch.setattr(cv_attention, "attention_heads", lambda **kw: seen.update(kw))
    mix.circuitsvis("heads")
    square = seen["attention"]  # (layer map, query, key): each layer, then the aggregated map
    assert square.shape == (len(mix.layers) + 1, 5, 5)
    assert torch.equal(square[:-1], mix.maps[:, 0].float())
    assert torch.equal(square[-1], mix.aggregated[0])
    assert seen["attention_head_names"] == ["L0", "L1", "all"] and seen["min_value"] < 0
    flow = mk.context_mixing(toy, tokens, method="flow", positions=[2])  # one query kept
    flow.circuitsvis("heads")
    assert seen["attention"].shape == (2, 5, 5)
    assert torch.equal(seen["attention"][-1, 2, :3], flow.aggregated[0, 0, :3])
    assert float(seen["attention"][-1, [0, 1, 3, 4]].abs().sum()) == 0.0
    with pytest.raises(mk.InvalidArgumentError, match="Did you mean"):
        mix.circuitsvis("head")
