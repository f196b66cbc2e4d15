"""The result of every input-attribution method: one layout, so methods compare side by side.

Scores are per prompt and position, ``(batch, pos)``, for the whole target, and per step of the
target, ``(batch, step, pos)`` (one step for a next-token target; one per generated token for a
continuation). Positions that are padding hold NaN; positions that are not attributed (a
leading BOS) hold 0 and are False in ``attributed``. :meth:`InputAttribution.to_words` groups
sub-word tokens into words. The HTML view colours each token red (pushes the target up) or blue
(pushes it down), with the strength scaled per prompt.
"""

from __future__ import annotations

import dataclasses
import html
import json
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mechkit.atomic_io import write_atomically, write_text_atomically
from mechkit.core.results import rank
from mechkit.errors import FileFormatError, InvalidArgumentError, check_choice
from mechkit.reading import read_json, read_safetensors

__all__ = ["InputAttribution"]


@dataclasses.dataclass(frozen=True, eq=False)
class InputAttribution:
    """Attribution of a target to each input token (or word) of each prompt.

    Attributes:
        scores: ``(batch, pos)`` the attribution of the target (summed over its steps); NaN at
            padding, 0 where not attributed.
        step_scores: ``(batch, step, pos)`` the attribution of each step's target (NaN where a
            prompt has fewer steps).
        tokens: ``(batch, pos)`` the prompts' token ids (right-padded), or None at word level.
        mask: ``(batch, pos)`` True at real tokens (words).
        attributed: ``(batch, pos)`` True where the method attributes (not a leading BOS).
        labels: the token (word) strings of each prompt.
        step_labels: the answer token strings of each prompt's steps.
        target_values: ``(batch,)`` the target on the unperturbed prompts.
        method, target, model: names of the method, the target and the model.
        options: the method's settings (JSON values).
        extras: ``name -> (batch,)`` numbers of the method (IG: ``baseline_value``,
            ``completeness_gap``).
        unit: ``"token"`` or ``"word"``.
        word_ids: per prompt, the word index of each token (-1 where not attributed).
        resolved: the resolved target (the faithfulness measures rerun it); not saved.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> r = mk.attribute_inputs(model, [[1, 2, 3, 4]], 5, method="input_x_gradient")
        >>> tuple(r.scores.shape), tuple(r.step_scores.shape), len(r.top(2))  # (batch, pos)
        ((1, 4), (1, 1, 4), 2)
    """

    scores: Float[Tensor, "batch pos"]
    step_scores: Float[Tensor, "batch step pos"]
    tokens: Int[Tensor, "batch pos"] | None
    mask: Bool[Tensor, "batch pos"]
    attributed: Bool[Tensor, "batch pos"]
    labels: list[list[str]]
    step_labels: list[list[str]]
    target_values: Float[Tensor, " batch"]
    method: str
    target: str
    model: str
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    extras: dict[str, Tensor] = dataclasses.field(default_factory=dict)
    unit: str = "token"
    word_ids: list[list[int]] = dataclasses.field(default_factory=list)
    resolved: Any = dataclasses.field(default=None, repr=False)

    @property
    def n_prompts(self) -> int:
        return int(self.scores.shape[0])

    @property
    def completeness_gap(self) -> Tensor | None:
        """IG only: ``sum(scores) - (F(x) - F(baseline))`` per prompt (None for the others).

        Example:
            >>> model = mk.load_model("attn-only-2l")
            >>> r = mk.attribute_inputs(model, [[1, 2, 3]], 5, baseline="zero", n_steps=64)
            >>> bool(r.completeness_gap.abs().max() < 1e-3)
            True
        """
        return self.extras.get("completeness_gap")

    def top(
        self, n: int = 10, *, absolute: bool = True
    ) -> list[tuple[tuple[int, int, str], float]]:
        """The ``n`` highest-ranked attributed tokens over all prompts, as
        ``((prompt, position, token), score)`` by :func:`~mechkit.core.rank`'s rule.

        Example:
            >>> model = mk.load_model("attn-only-2l")
            >>> r = mk.attribute_inputs(model, [[1, 2, 3]], 5, method="occlusion")
            >>> [label for label, _ in r.top(2)][0][0]  # prompt index of the best token
            0
        """
        labels, values = [], []
        for i in range(self.n_prompts):
            for p in range(len(self.labels[i])):
                if bool(self.attributed[i, p]):
                    labels.append((i, p, self.labels[i][p]))
                    values.append(float(self.scores[i, p]))
        return rank(labels, values, n, absolute=absolute)

    def to_words(self, how: str = "sum") -> InputAttribution:
        """Word-level scores: the sum (or ``"max"``) of each word's tokens' scores; words as
        :func:`~mechkit.input_attribution.runs.word_starts` finds them.

        Example:
            >>> model = mk.load_model("attn-only-2l")
            >>> r = mk.attribute_inputs(model, [[1, 2, 3]], 5, method="occlusion")
            >>> r.to_words().unit, tuple(r.to_words().scores.shape)
            ('word', (1, 3))
        """
        check_choice("how", how, ["sum", "max"])
        if self.unit == "word":
            return self
        n_words = max((max(w, default=-1) + 1 for w in self.word_ids), default=0)
        steps = self.step_scores.shape[1]
        scores = torch.full((self.n_prompts, n_words), float("nan"))
        step_scores = torch.full((self.n_prompts, steps, n_words), float("nan"))
        mask = torch.zeros(self.n_prompts, n_words, dtype=torch.bool)
        labels: list[list[str]] = []
        for i, ids in enumerate(self.word_ids):
            words: list[str] = []
            for w in range(max(ids, default=-1) + 1):
                members = [p for p, k in enumerate(ids) if k == w]
                words.append("".join(self.labels[i][p] for p in members))
                part = self.scores[i, members]
                step_part = self.step_scores[i, :, members]
                if how == "sum":
                    scores[i, w], step_scores[i, :, w] = part.sum(), step_part.sum(-1)
                else:
                    scores[i, w] = part[part.abs().argmax()]
                    pick = step_part.abs().argmax(-1)
                    step_scores[i, :, w] = step_part.gather(-1, pick[:, None])[:, 0]
                mask[i, w] = True
            labels.append(words)
        return dataclasses.replace(
            self,
            scores=scores,
            step_scores=step_scores,
            tokens=None,
            mask=mask,
            attributed=mask.clone(),
            labels=labels,
            unit="word",
            word_ids=[list(range(len(w))) for w in labels],
            options={**self.options, "word_aggregation": how},
            resolved=None,
        )

    def to_dataframe(self) -> Any:
        """One row per prompt, step and token (word): ``prompt``, ``position``, ``token``,
        ``step``, ``answer``, ``score`` (``step`` is -1 for the whole target).

        Example:
            >>> model = mk.load_model("attn-only-2l")
            >>> r = mk.attribute_inputs(model, [[1, 2, 3]], 5, method="saliency")
            >>> list(r.to_dataframe().columns)
            ['method', 'prompt', 'position', 'token', 'step', 'answer', 'score', 'attributed']
        """
        import pandas as pd

        rows = []
        for i in range(self.n_prompts):
            n_steps = len(self.step_labels[i])
            for p, token in enumerate(self.labels[i]):
                base = dict(method=self.method, prompt=i, position=p, token=token)
                attributed = bool(self.attributed[i, p])
                rows.append(
                    {**base, "step": -1, "answer": "".join(self.step_labels[i]),
                     "score": float(self.scores[i, p]), "attributed": attributed}
                )  # fmt: skip
                if n_steps > 1:
                    for s in range(n_steps):
                        rows.append(
                            {**base, "step": s, "answer": self.step_labels[i][s],
                             "score": float(self.step_scores[i, s, p]), "attributed": attributed}
                        )  # fmt: skip
        return pd.DataFrame(rows)

    def plot(
        self, prompt: int | None = None, *, steps: bool = False, title: str | None = None
    ) -> Any:
        """A plotly heatmap: prompts x positions (tokens as text), or with ``steps`` the
        steps x positions matrix of one prompt (as inseq shows a generated continuation).

        Example:
            >>> model = mk.load_model("attn-only-2l")
            >>> r = mk.attribute_inputs(model, [[1, 2, 3]], 5, method="saliency")
            >>> type(r.plot()).__name__
            'Figure'
        """
        import plotly.graph_objects as go

        if steps:
            i = prompt or 0
            n = len(self.labels[i])
            z = self.step_scores[i, : len(self.step_labels[i]), :n]
            x, y = self.labels[i], self.step_labels[i]
            text = [list(x) for _ in y]
        else:
            picks = range(self.n_prompts) if prompt is None else [prompt]
            n = max(len(self.labels[i]) for i in picks)
            z = self.scores[list(picks), :n]
            x = [str(p) for p in range(n)]
            y = [f"prompt {i}" for i in picks]
            text = [self.labels[i] + [""] * (n - len(self.labels[i])) for i in picks]
        bound = float(z.nan_to_num().abs().max()) or 1.0
        fig = go.Figure(
            go.Heatmap(
                z=z.tolist(),
                x=list(range(len(x))),
                y=y,
                text=text,
                texttemplate="%{text}",
                colorscale="RdBu",
                reversescale=True,
                zmin=-bound,
                zmax=bound,
            )  # fmt: skip
        )
        fig.update_layout(
            title=title or f"{self.method}: {self.target} ({self.model})",
            xaxis_title="input token",
            yaxis_autorange="reversed",
        )
        return fig

    def html(self) -> str:
        """The token heatmap as an HTML fragment: each prompt's tokens on a red (positive) or
        blue (negative) background, the strength scaled to the prompt's largest |score|.

        Example:
            >>> model = mk.load_model("attn-only-2l")
            >>> r = mk.attribute_inputs(model, [[1, 2, 3]], 5, method="saliency")
            >>> r.html().startswith("<div")
            True
        """
        parts = [
            f"<div class='mechkit-input-attribution'><p><b>{html.escape(self.method)}</b>: "
            f"{html.escape(self.target)} ({html.escape(self.model)})</p>"
        ]
        for i in range(self.n_prompts):
            n = len(self.labels[i])
            row = self.scores[i, :n].nan_to_num()
            bound = float(row.abs().max()) or 1.0
            spans = []
            for p, token in enumerate(self.labels[i]):
                v = float(row[p]) / bound
                colour = f"rgba(214,39,40,{v:.3f})" if v >= 0 else f"rgba(31,119,180,{-v:.3f})"
                tip = html.escape(f"{token!r}: {float(self.scores[i, p]):.4g}")
                spans.append(
                    f"<span title='{tip}' style='background:{colour};padding:1px 0;"
                    f"white-space:pre'>{html.escape(token)}</span>"
                )
            answer = html.escape("".join(self.step_labels[i]))
            parts.append(
                f"<p style='font-family:monospace'>{''.join(spans)} &rarr; <b>{answer}</b> "
                f"<span style='color:#888'>({float(self.target_values[i]):.3g})</span></p>"
            )
        parts.append("</div>")
        return "".join(parts)

    def _repr_html_(self) -> str:
        return self.html()

    def save_html(self, path: str | Path) -> Path:
        """Write :meth:`html` as a page, atomically.

        Example:
            >>> import tempfile
            >>> model = mk.load_model("attn-only-2l")
            >>> r = mk.attribute_inputs(model, [[1, 2, 3]], 5, method="saliency")
            >>> r.save_html(Path(tempfile.mkdtemp()) / "a.html").suffix
            '.html'
        """
        page = f"<!doctype html><meta charset='utf-8'><body>{self.html()}</body>"
        return write_text_atomically(path, page)

    def save(self, folder: str | Path) -> Path:
        """Save to ``folder`` as ``scores.safetensors`` (the tensors) and ``attribution.json``
        (labels, names, options), atomically; :meth:`load` reads it back.

        Example:
            >>> import tempfile
            >>> model = mk.load_model("attn-only-2l")
            >>> r = mk.attribute_inputs(model, [[1, 2, 3]], 5, method="saliency")
            >>> back = InputAttribution.load(r.save(Path(tempfile.mkdtemp()) / "r"))
            >>> torch.equal(back.scores, r.scores), back.method
            (True, 'saliency')
        """
        from safetensors.torch import save_file

        folder = Path(folder)
        tensors = {
            "scores": self.scores.contiguous(),
            "step_scores": self.step_scores.contiguous(),
            "mask": self.mask.contiguous(),
            "attributed": self.attributed.contiguous(),
            "target_values": self.target_values.contiguous(),
            **{f"extra.{k}": v.contiguous() for k, v in self.extras.items()},
        }
        if self.tokens is not None:
            tensors["tokens"] = self.tokens.contiguous()
        meta = {
            "format": "mechkit.InputAttribution",
            "version": 1,
            "labels": self.labels,
            "step_labels": self.step_labels,
            "method": self.method,
            "target": self.target,
            "model": self.model,
            "options": self.options,
            "unit": self.unit,
            "word_ids": self.word_ids,
        }
        write_atomically(folder / "scores.safetensors", lambda p: save_file(tensors, p))
        write_text_atomically(folder / "attribution.json", json.dumps(meta, indent=1))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> InputAttribution:
        """Read what :meth:`save` wrote (a :class:`~mechkit.errors.FileFormatError` if it is
        damaged).

        Example:
            >>> InputAttribution.load("/no/such/folder")  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            mechkit.errors.FileFormatError: ...
        """
        folder = Path(folder)
        hint = "save it again with InputAttribution.save(folder)."
        try:
            meta = read_json(folder / "attribution.json", "an input attribution", hint)
            tensors, _ = read_safetensors(folder / "scores.safetensors", "attribution scores", hint)
        except OSError as exc:
            raise FileFormatError(
                f"Expected a folder written by InputAttribution.save; cannot read {folder}: "
                f"{exc}. Hint: {hint}"
            ) from exc
        if not isinstance(meta, dict) or meta.get("format") != "mechkit.InputAttribution":
            raise FileFormatError(
                f"Expected {folder / 'attribution.json'} to describe a mechkit InputAttribution; "
                f"got another JSON. Hint: {hint}"
            )
        try:
            return cls(
                scores=tensors["scores"],
                step_scores=tensors["step_scores"],
                tokens=tensors.get("tokens"),
                mask=tensors["mask"],
                attributed=tensors["attributed"],
                labels=meta["labels"],
                step_labels=meta["step_labels"],
                target_values=tensors["target_values"],
                method=meta["method"],
                target=meta["target"],
                model=meta["model"],
                options=meta["options"],
                extras={k[6:]: v for k, v in tensors.items() if k.startswith("extra.")},
                unit=meta["unit"],
                word_ids=meta["word_ids"],
            )
        except (KeyError, TypeError) as exc:
            raise FileFormatError(
                f"Expected every field of an InputAttribution in {folder}; missing {exc}. "
                f"Hint: {hint}"
            ) from exc

    def __repr__(self) -> str:
        return (
            f"InputAttribution({self.method}, {self.n_prompts} prompt(s), unit={self.unit}, "
            f"target={self.target!r})"
        )


def check_same_layout(a: InputAttribution, b: InputAttribution) -> None:
    """Refuse to compare attributions of different prompts."""
    if a.scores.shape != b.scores.shape or a.labels != b.labels:
        raise InvalidArgumentError(
            f"Expected attributions of the same prompts; got {a!r} and {b!r}."
        )
