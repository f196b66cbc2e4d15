"""The result of :func:`~mechkit.mixing.context_mixing`: per-layer maps, their aggregate, and
the views of them (heatmaps with a layer slider, a token view of one position, word level)."""

from __future__ import annotations

import dataclasses
import html as html_module
import json
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mechkit.atomic_io import write_atomically, write_text_atomically
from mechkit.core.results import rank
from mechkit.errors import FileFormatError, InvalidArgumentError, ShapeError, check_choice
from mechkit.reading import read_json, read_safetensors

__all__ = ["ContextMixing"]


@dataclasses.dataclass(frozen=True, eq=False)
class ContextMixing:
    """How much each earlier token contributes to each position's representation.

    Attributes:
        method: the method's registered name (``"rollout"``, ``"alti"``, ...).
        maps: ``(layer, batch, query, key)``: the map of each layer in ``layers`` (float16 when
            every layer was kept). For cumulative methods ``maps[l]`` covers blocks ``0..l``.
        layers: the block of each map.
        aggregated: ``(batch, query, key)`` the map over all layers (float32).
        aggregation: how ``aggregated`` was made, in words.
        cumulative: whether the maps are cumulative (rollout-like) or one layer's mixing each.
        queries: the query position of each row of the maps.
        tokens, mask: ``(batch, pos)`` the prompts' ids and True at real tokens.
        str_tokens: each prompt's tokens as text.
        logit: ``(batch, query, key)`` contributions to the target logit (ALTI-Logit, DecompX).
        logit_rest: ``(batch, query)`` what no token carries of that logit (the biases).
        model: the model's name.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> mix = mk.context_mixing(model, torch.tensor([[1, 2, 3]]), method="rollout")
        >>> mix.maps.shape, mix.aggregated.shape       # (layer, batch, query, key)
        (torch.Size([2, 1, 3, 3]), torch.Size([1, 3, 3]))
    """

    method: str
    maps: Float[Tensor, "layer batch query key"]
    layers: tuple[int, ...]
    aggregated: Float[Tensor, "batch query key"]
    aggregation: str
    cumulative: bool
    queries: tuple[int, ...]
    tokens: Int[Tensor, "batch pos"]
    mask: Bool[Tensor, "batch pos"]
    str_tokens: tuple[tuple[str, ...], ...]
    logit: Float[Tensor, "batch query key"] | None = None
    logit_rest: Float[Tensor, "batch query"] | None = None
    model: str = ""

    def map(self, layer: int | None = None, prompt: int = 0) -> Float[Tensor, "query key"]:
        """One prompt's map at block ``layer`` (None: the aggregated map).

        Example:
            >>> model = mk.load_model("attn-only-2l")
            >>> mix = mk.context_mixing(model, torch.tensor([[1, 2, 3]]), method="attention")
            >>> mix.map(1).shape                                           # (query, key)
            torch.Size([3, 3])
        """
        self._check_prompt(prompt)
        if layer is None:
            return self.aggregated[prompt]
        if layer not in self.layers:
            raise InvalidArgumentError(
                f"Expected a layer among the kept layers {list(self.layers)}; got {layer!r}. "
                "Hint: layers=None keeps every layer (flow keeps only the last)."
            )
        return self.maps[self.layers.index(layer), prompt].float()

    def row(self, position: int = -1, prompt: int = 0) -> Float[Tensor, " key"]:
        """What position ``position`` draws on in the aggregated map (negative: from the end of
        the prompt), over keys ``0..position``.

        Example:
            >>> model = mk.load_model("attn-only-2l")
            >>> mix = mk.context_mixing(model, torch.tensor([[1, 2, 3]]), method="rollout")
            >>> round(float(mix.row(-1).sum()), 4)                     # rollout rows sum to 1
            1.0
        """
        index, pos = self._query_index(position, prompt)
        return self.aggregated[prompt, index, : pos + 1]

    def top(self, n: int = 10, *, absolute: bool = True) -> list[tuple[dict[str, int], float]]:
        """The ``n`` largest entries of the aggregated map, averaged over prompts, as
        ``({"query": i, "key": j}, value)`` ranked by :func:`mechkit.core.rank`.

        Example:
            >>> model = mk.load_model("attn-only-2l")
            >>> mix = mk.context_mixing(model, torch.tensor([[1, 2, 3]]), method="rollout")
            >>> mix.top(1)[0][0]
            {'query': 0, 'key': 0}
        """
        mean = self.aggregated.float().nanmean(0)  # (query, key)
        labels = [{"query": q, "key": k} for q in self.queries for k in range(mean.shape[1])]
        return rank(labels, mean.flatten(), n, absolute=absolute)

    def to_dataframe(self) -> Any:
        """One row per prompt, layer, query and real key at or before it: ``prompt``,
        ``layer`` (None for the aggregated map), ``query``, ``key``, both tokens and ``value``.

        Example:
            >>> model = mk.load_model("attn-only-2l")
            >>> mix = mk.context_mixing(model, torch.tensor([[1, 2]]), method="attention")
            >>> len(mix.to_dataframe())        # 3 (query, key) pairs x (2 layers + aggregate)
            9
        """
        import pandas as pd

        rows = []
        stacks: list[tuple[int | None, Tensor]] = [
            (layer, self.maps[i].float()) for i, layer in enumerate(self.layers)
        ]
        stacks.append((None, self.aggregated))
        for b, words in enumerate(self.str_tokens):
            for layer, values in stacks:
                for r, q in enumerate(self.queries):
                    if q >= len(words):
                        continue
                    for k in range(q + 1):
                        rows.append((b, layer, q, k, words[q], words[k], float(values[b, r, k])))
        columns = ["prompt", "layer", "query", "key", "query_token", "key_token", "value"]
        return pd.DataFrame(rows, columns=columns)

    def plot(self, prompt: int = 0) -> Any:
        """A query x key heatmap of one prompt with a slider over the layers and the
        aggregated map (the slider's last step).

        Example:
            >>> model = mk.load_model("attn-only-2l")
            >>> fig = mk.context_mixing(model, torch.tensor([[1, 2]]), method="rollout").plot()
            >>> len(fig.data), len(fig.layout.sliders[0].steps)   # a map per layer + aggregate
            (3, 3)
        """
        import plotly.graph_objects as go

        self._check_prompt(prompt)
        words = self.str_tokens[prompt]
        n = len(words)
        rows = [r for r, q in enumerate(self.queries) if q < n]
        ys = [f"{self.queries[r]}:{words[self.queries[r]]}" for r in rows]
        xs = [f"{k}:{w}" for k, w in enumerate(words)]
        panels = [
            (f"layer {layer}", self.maps[i, prompt].float()) for i, layer in enumerate(self.layers)
        ]
        panels.append(("aggregated", self.aggregated[prompt]))
        fig = go.Figure()
        for i, (name, values) in enumerate(panels):
            z = values[rows][:, :n].clone()
            for r_i, r in enumerate(rows):  # keys after the query carry nothing: blank
                z[r_i, self.queries[r] + 1 :] = float("nan")
            fig.add_trace(
                go.Heatmap(
                    z=z.numpy(),
                    x=xs,
                    y=ys,
                    visible=i == len(panels) - 1,
                    name=name,
                    colorscale="Viridis",
                    hovertemplate="query %{y}<br>key %{x}<br>%{z:.3f}<extra></extra>",
                )
            )
        steps = [
            {
                "method": "update",
                "label": name,
                "args": [
                    {"visible": [j == i for j in range(len(panels))]},
                    {"title": f"{self.method}: {name}"},
                ],
            }
            for i, (name, _) in enumerate(panels)
        ]
        fig.update_layout(
            title=f"{self.method}: aggregated ({self.aggregation})",
            sliders=[
                {"active": len(panels) - 1, "steps": steps, "currentvalue": {"prefix": "map: "}}
            ],
            xaxis_title="key (drawn on)",
            yaxis_title="query",
            height=max(400, 14 * len(rows) + 200),
        )
        fig.update_yaxes(autorange="reversed")
        return fig

    def token_view(self, position: int = -1, prompt: int = 0) -> str:
        """An HTML line of the prompt's tokens, each shaded by how much ``position`` draws on it
        in the aggregated map (the position itself boxed); a notebook shows it with
        ``IPython.display.HTML``.

        Example:
            >>> model = mk.load_model("attn-only-2l")
            >>> mix = mk.context_mixing(model, torch.tensor([[1, 2, 3]]), method="rollout")
            >>> mix.token_view(-1).count("<span")
            3
        """
        values = self.row(position, prompt)
        _, pos = self._query_index(position, prompt)
        top = float(values.abs().max()) or 1.0
        parts = []
        for k, word in enumerate(self.str_tokens[prompt][: pos + 1]):
            v = float(values[k])
            alpha = abs(v) / top
            colour = (
                f"rgba(220, 80, 30, {alpha:.3f})" if v >= 0 else f"rgba(30, 90, 220, {alpha:.3f})"
            )
            border = "border:1px solid black;" if k == pos else ""
            parts.append(
                f"<span title='{v:.4f}' style='background:{colour};{border}padding:1px 2px;"
                f"white-space:pre'>{html_module.escape(word)}</span>"
            )
        return f"<div style='font-family:monospace;line-height:1.8'>{''.join(parts)}</div>"

    def circuitsvis(self, view: str = "heads", prompt: int = 0, position: int = -1) -> Any:
        """The maps drawn by circuitsvis, where it draws such maps: ``view="heads"``
        (``circuitsvis.attention.attention_heads``) or ``"patterns"`` (``attention_patterns``)
        with each kept layer's map as a "head" (``L0``, ``L1``, ...) and the aggregated map last
        (``all``); ``"tokens"``: ``circuitsvis.tokens.colored_tokens`` of what ``position`` draws
        on in the aggregated map. Rows of queries not kept are zero; signed maps get a
        symmetric colour scale. A notebook displays the returned ``RenderedHTML``.

        Example:
            >>> model = mk.load_model("attn-only-2l")
            >>> mix = mk.context_mixing(model, torch.tensor([[1, 2, 3]]), method="rollout")
            >>> type(mix.circuitsvis()).__name__, type(mix.circuitsvis("tokens")).__name__
            ('RenderedHTML', 'RenderedHTML')
        """
        check_choice("view", view, ["heads", "patterns", "tokens"])
        self._check_prompt(prompt)
        import circuitsvis.attention
        import circuitsvis.tokens

        n = int(self.mask[prompt].sum())
        if view == "tokens":
            values = self.row(position, prompt).float().nan_to_num()
            words = list(self.str_tokens[prompt][: len(values)])
            top = float(values.abs().max()) or 1.0
            low = -top if bool((values < 0).any()) else 0.0
            return circuitsvis.tokens.colored_tokens(words, values, min_value=low, max_value=top)
        square = torch.zeros(len(self.layers) + 1, n, n)  # (layer map, query, key)
        rows = [i for i, q in enumerate(self.queries) if q < n]
        at = [self.queries[i] for i in rows]
        square[:-1, at] = self.maps[:, prompt, rows, :n].float()
        square[-1, at] = self.aggregated[prompt, rows, :n].float()
        square = square.nan_to_num()
        words = list(self.str_tokens[prompt][:n])
        if view == "patterns":
            return circuitsvis.attention.attention_patterns(tokens=words, attention=square)
        top = float(square.abs().max()) or 1.0
        return circuitsvis.attention.attention_heads(
            attention=square,
            tokens=words,
            attention_head_names=[f"L{layer}" for layer in self.layers] + ["all"],
            max_value=top,
            min_value=-top if bool((square < 0).any()) else 0.0,
        )

    def words(self) -> ContextMixing:
        """The maps at word level (Clark et al. 2019): a word's keys summed, its queries
        averaged. A token starting with a space (or ``Ġ``/``▁``), and the first token, start a
        word. Only for prompts of one length with every query kept.

        Example:
            >>> model = mk.load_model("attn-only-2l")
            >>> mix = mk.context_mixing(model, torch.tensor([[1, 2, 3]]), method="rollout")
            >>> mix.words().aggregated.shape   # no token starts with a space: a single word
            torch.Size([1, 1, 1])
        """
        if not bool(self.mask.all()) or len(self.queries) != self.tokens.shape[1]:
            raise InvalidArgumentError(
                "Expected unpadded prompts with every query position kept for word level; got "
                f"{int((~self.mask).sum())} padding token(s) and {len(self.queries)} of "
                f"{self.tokens.shape[1]} queries. Hint: one prompt, positions=None."
            )
        words = self.str_tokens[0]
        starts = [k for k, w in enumerate(words) if k == 0 or w[:1] in (" ", "Ġ", "▁", "\n")]
        group = torch.zeros(len(starts), len(words))  # (word, token)
        for w, start in enumerate(starts):
            stop = starts[w + 1] if w + 1 < len(starts) else len(words)
            group[w, start:stop] = 1.0
        mean_q = group / group.sum(-1, keepdim=True)

        def fold(x: Tensor) -> Tensor:  # (..., query, key) -> (..., word, word)
            return mean_q @ x.float() @ group.T

        text = tuple(
            "".join(words[start : (starts + [len(words)])[w + 1]]) for w, start in enumerate(starts)
        )
        return dataclasses.replace(
            self,
            maps=fold(self.maps).to(self.maps.dtype),
            aggregated=fold(self.aggregated),
            queries=tuple(range(len(starts))),
            tokens=self.tokens[:, starts],
            mask=self.mask[:, starts],
            str_tokens=tuple(text for _ in self.str_tokens),
            logit=None if self.logit is None else fold(self.logit),
            logit_rest=None if self.logit_rest is None else self.logit_rest[:, starts],
        )

    def save(self, path: str | Path) -> Path:
        """Write the result to ``path`` (a folder): tensors as safetensors, the rest as JSON.

        Example:
            >>> import tempfile
            >>> model = mk.load_model("attn-only-2l")
            >>> mix = mk.context_mixing(model, torch.tensor([[1, 2]]), method="rollout")
            >>> with tempfile.TemporaryDirectory() as folder:
            ...     again = ContextMixing.load(mix.save(folder + "/mix"))
            >>> bool(torch.equal(again.maps, mix.maps)), again.method
            (True, 'rollout')
        """
        from safetensors.torch import save_file

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {
            "maps": self.maps,
            "aggregated": self.aggregated,
            "tokens": self.tokens,
            "mask": self.mask,
        }
        if self.logit is not None and self.logit_rest is not None:
            tensors |= {"logit": self.logit, "logit_rest": self.logit_rest}
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        write_atomically(folder / "mixing.safetensors", lambda tmp: save_file(tensors, tmp))
        info = {
            "method": self.method,
            "layers": list(self.layers),
            "aggregation": self.aggregation,
            "cumulative": self.cumulative,
            "queries": list(self.queries),
            "str_tokens": [list(t) for t in self.str_tokens],
            "model": self.model,
        }
        text = json.dumps(info)
        write_text_atomically(folder / "mixing.json", text)
        return folder

    @classmethod
    def load(cls, path: str | Path) -> ContextMixing:
        """Read a result written by :meth:`save`.

        Example:
            >>> ContextMixing.load("/nonexistent")  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            FileNotFoundError: ...
        """
        folder = Path(path)
        hint = "Hint: write it with ContextMixing.save."
        info = read_json(folder / "mixing.json", "a context-mixing record", hint)
        tensors, _ = read_safetensors(folder / "mixing.safetensors", "context-mixing maps", hint)
        try:
            return cls(
                method=str(info["method"]),
                maps=tensors["maps"],
                layers=tuple(int(x) for x in info["layers"]),
                aggregated=tensors["aggregated"],
                aggregation=str(info["aggregation"]),
                cumulative=bool(info["cumulative"]),
                queries=tuple(int(x) for x in info["queries"]),
                tokens=tensors["tokens"],
                mask=tensors["mask"],
                str_tokens=tuple(tuple(str(w) for w in t) for t in info["str_tokens"]),
                logit=tensors.get("logit"),
                logit_rest=tensors.get("logit_rest"),
                model=str(info.get("model", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise FileFormatError(
                f"Expected a context-mixing result in {folder} (mixing.json with method, "
                f"layers, ...; mixing.safetensors with maps, ...); missing or bad {exc}. "
                "Hint: write it with ContextMixing.save."
            ) from None

    def _check_prompt(self, prompt: int) -> None:
        n = self.tokens.shape[0]
        if isinstance(prompt, bool) or not isinstance(prompt, int) or not 0 <= prompt < n:
            raise ShapeError(f"Expected a prompt index in [0, {n}); got {prompt!r}.")

    def _query_index(self, position: int, prompt: int) -> tuple[int, int]:
        self._check_prompt(prompt)
        length = int(self.mask[prompt].sum())
        pos = position + length if position < 0 else position
        if not 0 <= pos < length:
            raise ShapeError(
                f"Expected a position inside the prompt (length {length}: -{length} to "
                f"{length - 1}); got {position}."
            )
        if pos not in self.queries:
            raise InvalidArgumentError(
                f"Expected a query position that was kept {list(self.queries)[:10]}; got {pos}. "
                "Hint: positions=None keeps every query."
            )
        return self.queries.index(pos), pos
