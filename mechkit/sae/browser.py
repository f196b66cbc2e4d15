"""A feature browser: what makes chosen latents fire, and what they write.

For each chosen latent of an SAE or transcoder, over a token set:

* its **top-activating contexts**: the sequences where its maximum activation is largest (one
  context per sequence), each shown as a window of tokens around that maximum, every token
  shaded by the latent's activation on it (the value on hover);
* its **activation histogram** over the tokens where it fires, and its firing frequency;
* the tokens its decoder direction **promotes and suppresses** through the unembedding,
  ``W_dec[i] @ W_U`` (the direct path to the logits; Bricken et al. 2023's "logit weights"),
  for dictionaries whose output lives in the residual stream (SAEs on ``resid_*``,
  ``attn_out``, ``mlp_out``; transcoders predicting ``mlp_out``).

:func:`collect_features` returns the data (:class:`FeatureReport`) for notebooks;
:func:`feature_browser` writes it as one self-contained HTML page (inline CSS and SVG, no
script, nothing fetched: it opens offline), written atomically.

    >>> from mechkit.sae import SAEConfig, SparseDictionary
    >>> model = mk.load_model("attn-only-2l")
    >>> sae = SparseDictionary.from_config(SAEConfig(
    ...     architecture="relu", d_in=128, d_sae=64, hook_name="blocks.0.hook_resid_post"))
    >>> tokens = torch.randint(1, 500, (8, 16), generator=torch.Generator().manual_seed(0))
    >>> report = mk.sae.collect_features(model, sae, tokens, [3], progress=False)
    >>> len(report[3].contexts[0].tokens) > 0     # the window around its strongest activation
    True
"""

from __future__ import annotations

import dataclasses
import html
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from mechkit.atomic_io import write_text_atomically
from mechkit.core.labels import model_name
from mechkit.core.progress import progress_bar
from mechkit.core.results import rank
from mechkit.core.types import Model, SparseDictionaryLike
from mechkit.errors import (
    EmptyDatasetError,
    InvalidArgumentError,
    NotFoundError,
    check_batch_size,
    check_choice,
)
from mechkit.sae.evaluate import Exclude, counted_positions, evaluation_tokens, run_until
from mechkit.sae.splice import SAESites, as_rows, check_hooks, check_latents, reconstruct, sae_sites

__all__ = [
    "FeatureContext",
    "FeatureData",
    "FeatureReport",
    "collect_features",
    "feature_browser",
]

_RESIDUAL_HOOKS = (
    "hook_resid_pre",
    "hook_resid_mid",
    "hook_resid_post",
    "hook_attn_out",
    "hook_mlp_out",
    "hook_embed",
    "hook_pos_embed",
)


@dataclasses.dataclass(frozen=True)
class FeatureContext:
    """One top-activating context of a latent.

    Attributes:
        row: the sequence (row of the token set).
        position: the position of the latent's maximum in that sequence.
        start: the position of the window's first token.
        token_ids, tokens: the window's token ids and their text.
        activations: the latent's activation on each token of the window.
        max_activation: the activation at ``position``.

    Example:
        >>> from mechkit.sae import SAEConfig, SparseDictionary
        >>> model = mk.load_model("attn-only-2l")
        >>> sae = SparseDictionary.from_config(SAEConfig(
        ...     architecture="relu", d_in=128, d_sae=64, hook_name="blocks.0.hook_resid_post"))
        >>> report = mk.sae.collect_features(model, sae, torch.randint(1, 500, (4, 16)), [1, 2],
        ...                                  progress=False)
        >>> context = report[1].contexts[0]               # its strongest context
        >>> context.activations[context.position - context.start] == context.max_activation
        True
    """

    row: int
    position: int
    start: int
    token_ids: tuple[int, ...]
    tokens: tuple[str, ...]
    activations: tuple[float, ...]
    max_activation: float

    @property
    def text(self) -> str:
        return "".join(self.tokens)


@dataclasses.dataclass(frozen=True, eq=False)
class FeatureData:
    """What :func:`collect_features` found about one latent.

    Attributes:
        latent: the latent's index.
        frequency: the fraction of counted tokens it fires (is non-zero) on.
        max_activation: its largest activation on a counted token (0 if it never fires).
        contexts: its top contexts, strongest first.
        activations: ``(n_fired,)`` its activation on every counted token where it fires.
        promoted, suppressed: ``(token, logit effect)`` of the tokens its decoder direction
            raises and lowers most; empty when the output is not in the residual stream.

    Example:
        >>> from mechkit.sae import SAEConfig, SparseDictionary
        >>> model = mk.load_model("attn-only-2l")
        >>> sae = SparseDictionary.from_config(SAEConfig(
        ...     architecture="relu", d_in=128, d_sae=64, hook_name="blocks.0.hook_resid_post"))
        >>> report = mk.sae.collect_features(model, sae, torch.randint(1, 500, (4, 16)), [1, 2],
        ...                                  progress=False)
        >>> feature = report[2]
        >>> 0 <= feature.frequency <= 1, feature.max_activation == float(feature.activations.max())
        (True, True)
    """

    latent: int
    frequency: float
    max_activation: float
    contexts: tuple[FeatureContext, ...]
    activations: Float[Tensor, " n_fired"]
    promoted: tuple[tuple[str, float], ...]
    suppressed: tuple[tuple[str, float], ...]


@dataclasses.dataclass(frozen=True, eq=False)
class FeatureReport:
    """The data of a feature browser: one :class:`FeatureData` per chosen latent.

    Attributes:
        hook_name, out_hook_name: where the dictionary reads and what it writes.
        model_name: the model's name, for titles.
        n_tokens: the counted tokens scanned.
        features: per latent, in the order asked.
        logit_note: how promoted/suppressed tokens were read (or why there are none).

    Example:
        >>> from mechkit.sae import SAEConfig, SparseDictionary
        >>> model = mk.load_model("attn-only-2l")
        >>> sae = SparseDictionary.from_config(SAEConfig(
        ...     architecture="relu", d_in=128, d_sae=64, hook_name="blocks.0.hook_resid_post"))
        >>> report = mk.sae.collect_features(model, sae, torch.randint(1, 500, (4, 16)), [1, 2],
        ...                                  progress=False)
        >>> report.latents, sorted(latent for latent, _ in report.top(2))  # by max activation
        ((1, 2), [1, 2])
    """

    hook_name: str
    out_hook_name: str
    model_name: str
    n_tokens: int
    features: tuple[FeatureData, ...]
    logit_note: str

    def __getitem__(self, latent: int) -> FeatureData:
        for feature in self.features:
            if feature.latent == latent:
                return feature
        raise NotFoundError(
            f"Expected one of the latents in this report {[f.latent for f in self.features]}; "
            f"got {latent!r}."
        )

    @property
    def latents(self) -> tuple[int, ...]:
        return tuple(f.latent for f in self.features)

    def top(self, n: int = 10, *, absolute: bool = True) -> list[tuple[int, float]]:
        """The ``n`` latents of largest maximum activation, ``(latent, max_activation)``, by the
        rule of :func:`mechkit.core.rank`."""
        return rank(
            list(self.latents), [f.max_activation for f in self.features], n, absolute=absolute
        )

    def to_dataframe(self) -> Any:
        """One row per (latent, context): ``latent, rank, row, position, max_activation,
        frequency, text``."""
        import pandas as pd

        rows = [
            {
                "latent": f.latent,
                "rank": rank,
                "row": c.row,
                "position": c.position,
                "max_activation": c.max_activation,
                "frequency": f.frequency,
                "text": c.text,
            }
            for f in self.features
            for rank, c in enumerate(f.contexts)
        ]
        columns = ["latent", "rank", "row", "position", "max_activation", "frequency", "text"]
        return pd.DataFrame(rows, columns=columns)

    def plot(self) -> Any:
        """A plotly figure: each latent's activation histogram (where it fires), overlaid."""
        import plotly.graph_objects as go

        fig = go.Figure()
        for f in self.features:
            fig.add_trace(
                go.Histogram(x=f.activations.numpy(), name=f"latent {f.latent}", opacity=0.6)
            )
        fig.update_layout(
            barmode="overlay",
            title=f"Activations where each latent fires: {self.out_hook_name}",
            xaxis_title="activation",
            yaxis_title="tokens",
        )
        return fig

    def to_html(self) -> str:
        """The self-contained HTML page (see :func:`feature_browser`)."""
        return _page(self)

    def save(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_html` to ``path`` atomically; returns the path."""
        return write_text_atomically(Path(path), self.to_html())

    def __repr__(self) -> str:
        return (
            f"FeatureReport({self.out_hook_name}: latents {list(self.latents)}, "
            f"{self.n_tokens} tokens)"
        )


# ----------------------------------------------------------------------------------------------
# Collecting
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def collect_features(
    model: Model,
    sae: SparseDictionaryLike,
    tokens: Any,
    latents: int | Sequence[int],
    *,
    n_contexts: int = 12,
    window: int = 16,
    n_logit_tokens: int = 10,
    batch_size: int = 8,
    exclude: Exclude = "first",
    mask: Bool[Tensor, "batch pos"] | None = None,
    progress: bool = True,
) -> FeatureReport:
    """Top contexts, activation histograms and logit effects of chosen latents.

    Args:
        model: a HookedTransformer.
        sae: an SAE or transcoder.
        tokens: ``(batch, pos)`` token ids (or texts); None for the corpus's held-out split
            (``mk.corpus.corpus_tokens(model, seq_len=128, split="test", max_sequences=64)``).
        latents: a latent index or a list of them.
        n_contexts: contexts per latent (one per sequence, strongest first).
        window: tokens per context, the maximum placed three quarters of the way in (more
            context before it than after: the model reads left to right).
        n_logit_tokens: promoted and suppressed tokens listed per latent.
        batch_size: sequences per forward pass.
        exclude: positions left out of the scan, as in :func:`mk.evaluate_sae` (``"first"``:
            position 0, the attention sink; ``"bos"``: position 0 when it holds BOS; ``"none"``);
            ``mask``: real tokens.
        progress: show a progress bar.

    Returns:
        A :class:`FeatureReport`.

    Example:
        >>> from mechkit.sae import SAEConfig, SparseDictionary
        >>> model = mk.load_model("attn-only-2l")
        >>> sae = SparseDictionary.from_config(SAEConfig(
        ...     architecture="relu", d_in=128, d_sae=64, hook_name="blocks.0.hook_resid_post"))
        >>> tokens = torch.randint(1, 500, (8, 16), generator=torch.Generator().manual_seed(0))
        >>> report = collect_features(model, sae, tokens, [5, 9], n_contexts=3, progress=False)
        >>> [len(f.contexts) for f in report.features]
        [3, 3]
    """
    check_choice("exclude", exclude, ["bos", "first", "none"])
    sites = sae_sites(sae)
    check_hooks(model, sites)
    index = check_latents([latents] if isinstance(latents, int) else latents, sites.d_sae)
    assert index is not None
    check_batch_size(batch_size)
    if n_contexts <= 0 or window <= 0 or n_logit_tokens < 0:
        raise InvalidArgumentError(
            f"Expected positive n_contexts, window and batch_size (and n_logit_tokens >= 0); "
            f"got {n_contexts}, {window}, {batch_size}, {n_logit_tokens}."
        )
    tokens, mask = evaluation_tokens(model, tokens, mask)
    size = batch_size or max(1, tokens.shape[0])  # None: one pass
    counted = counted_positions(model, tokens, exclude=exclude, mask=mask)
    if not bool(counted.any()):
        raise EmptyDatasetError(
            f"Expected some positions to scan; all are excluded (exclude={exclude!r})."
        )
    device = model.cfg.device
    chosen = index.to(device)
    per_batch = []  # (rows, pos, n_latents) activations of the chosen latents, on the CPU
    batches = [slice(i, i + size) for i in range(0, tokens.shape[0], size)]
    bar = progress_bar(len(batches), "scanning latents", enabled=progress, unit="batch")
    try:
        for rows in batches:
            acts = run_until(model, tokens[rows].to(device), [sites.in_hook])
            x = as_rows(acts[sites.in_hook], sites.d_in, sites.in_hook)
            f, _ = reconstruct(sae, x)
            per_batch.append(f[..., chosen.to(f.device)].float().cpu())
            bar.update(1)
    finally:
        bar.close()
    values = torch.cat(per_batch)  # (batch, pos, n_latents)
    counted = counted.cpu()
    effects, note = _logit_effects(model, sae, sites, index, n_logit_tokens)
    names = _TokenNames(model)
    features = []
    for j, latent in enumerate(index.tolist()):
        v = values[..., j]  # (batch, pos)
        on = v[counted]
        fired = on[on != 0]
        scored = v.masked_fill(~counted, float("-inf"))
        best, where = scored.max(dim=1)  # per sequence
        order = best.argsort(descending=True, stable=True)
        contexts = []
        for row in order[:n_contexts].tolist():
            if not best[row] > 0:
                break
            contexts.append(_context(tokens, v, row, int(where[row]), window, names))
        promoted: tuple[tuple[str, float], ...] = ()
        suppressed: tuple[tuple[str, float], ...] = ()
        if effects is not None:
            promoted, suppressed = _top_tokens(effects[j], n_logit_tokens, names)
        features.append(
            FeatureData(
                latent=latent,
                frequency=float(fired.numel() / on.numel()),
                max_activation=float(on.max()) if fired.numel() else 0.0,
                contexts=tuple(contexts),
                activations=fired.clone(),
                promoted=promoted,
                suppressed=suppressed,
            )
        )
    return FeatureReport(
        hook_name=sites.in_hook,
        out_hook_name=sites.out_hook,
        model_name=model_name(model),
        n_tokens=int(counted.sum()),
        features=tuple(features),
        logit_note=note,
    )


def feature_browser(
    model: Model,
    sae: SparseDictionaryLike,
    tokens: Any,
    latents: int | Sequence[int],
    *,
    out: str | os.PathLike = "features.html",
    n_contexts: int = 12,
    window: int = 16,
    n_logit_tokens: int = 10,
    batch_size: int = 8,
    exclude: Exclude = "first",
    mask: Bool[Tensor, "batch pos"] | None = None,
    progress: bool = True,
) -> Path:
    """Write a feature browser for chosen latents as one self-contained HTML page.

    Takes the arguments of :func:`collect_features`, and ``out``: the page to write (atomically:
    a reader never sees half of it). The page has no script and fetches nothing; token text is
    HTML-escaped.

    Returns:
        The path written.

    Example:
        >>> from mechkit.sae import SAEConfig, SparseDictionary
        >>> model = mk.load_model("attn-only-2l")
        >>> sae = SparseDictionary.from_config(SAEConfig(
        ...     architecture="relu", d_in=128, d_sae=64, hook_name="blocks.0.hook_resid_post"))
        >>> tokens = torch.randint(1, 500, (8, 16), generator=torch.Generator().manual_seed(0))
        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "features.html"
        >>> mk.feature_browser(model, sae, tokens, [3, 17], out=out, progress=False) == out
        True
    """
    started = time.perf_counter()
    report = collect_features(
        model,
        sae,
        tokens,
        latents,
        n_contexts=n_contexts,
        window=window,
        n_logit_tokens=n_logit_tokens,
        batch_size=batch_size,
        exclude=exclude,
        mask=mask,
        progress=progress,
    )
    return write_text_atomically(Path(out), _page(report, time.perf_counter() - started))


class _TokenNames:
    """Token id -> display text (decoded once per id); ``#id`` without a tokenizer."""

    def __init__(self, model: Model) -> None:
        self.tokenizer = getattr(model, "tokenizer", None)
        self.cache: dict[int, str] = {}

    def __call__(self, token: int) -> str:
        if token not in self.cache:
            if self.tokenizer is None:
                self.cache[token] = f"#{token}"
            else:
                self.cache[token] = str(self.tokenizer.decode([token]))
        return self.cache[token]


def _context(
    tokens: Tensor, values: Tensor, row: int, position: int, window: int, names: _TokenNames
) -> FeatureContext:
    seq = tokens.shape[1]
    before = window - max(1, window // 4)  # tokens up to and including the maximum
    start = max(0, min(position - before + 1, seq - window))
    end = min(seq, start + window)
    ids = tuple(int(t) for t in tokens[row, start:end].tolist())
    return FeatureContext(
        row=row,
        position=position,
        start=start,
        token_ids=ids,
        tokens=tuple(names(t) for t in ids),
        activations=tuple(float(a) for a in values[row, start:end].tolist()),
        max_activation=float(values[row, position]),
    )


def _logit_effects(
    model: Model, sae: SparseDictionaryLike, sites: SAESites, index: Tensor, n: int
) -> tuple[Tensor | None, str]:
    """``(n_latents, d_vocab)`` logit effect of each decoder direction, and how it was read."""
    if n == 0:
        return None, "Promoted and suppressed tokens were not asked for."
    writes_residual = sites.out_hook.split(".")[-1] in _RESIDUAL_HOOKS
    if not writes_residual or sites.d_out != model.cfg.d_model:
        return None, (
            f"No promoted/suppressed tokens: the dictionary writes to {sites.out_hook} "
            f"(width {sites.d_out}), not to the residual stream."
        )
    directions = sae.W_dec.detach()[index.to(sae.W_dec.device)].float()  # (n, d_model)
    norm = model.cfg.normalization_type
    steps = []
    if norm in ("LN", "LNPre"):
        directions = directions - directions.mean(-1, keepdim=True)
        steps.append("centred first, as the final LayerNorm removes the mean")
    if norm in ("LN", "RMS"):
        final_w = cast(Tensor, model.ln_final.w)  # (d_model,) a parameter of LN and RMS norms
        directions = directions * final_w.detach().float().to(directions.device)
        steps.append("multiplied by the final norm's weights")
    elif norm in ("LNPre", "RMSPre"):
        steps.append("the final norm's weights are folded into W_U")
    w_u = model.W_U.detach().float().to(directions.device)
    effects = (directions @ w_u).cpu()  # (n, d_vocab)
    how = "; ".join(steps) if steps else "the model has no final norm"
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None and len(tokenizer) < effects.shape[1]:
        effects[:, len(tokenizer) :] = float("nan")  # embedding rows no token uses
    scale = (
        " The final norm's division by the residual stream's scale is left out: it scales every"
        " logit alike, so the ranking is the one the model would see."
        if norm is not None
        else ""
    )
    return effects, (
        f"Promoted and suppressed tokens: W_dec[i] @ W_U, the direct path from the latent's "
        f"decoder direction to the logits ({how}).{scale}"
    )


def _top_tokens(
    effect: Tensor, n: int, names: _TokenNames
) -> tuple[tuple[tuple[str, float], ...], tuple[tuple[str, float], ...]]:
    valid = effect.nan_to_num(nan=float("-inf"))
    top = valid.topk(min(n, effect.numel()))
    low = effect.nan_to_num(nan=float("inf")).topk(min(n, effect.numel()), largest=False)
    promoted = tuple((names(int(i)), float(v)) for v, i in zip(*top, strict=True))
    suppressed = tuple((names(int(i)), float(v)) for v, i in zip(*low, strict=True))
    return promoted, suppressed


# ----------------------------------------------------------------------------------------------
# The page
# ----------------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 72em; color: #222; }
nav a { margin-right: .8em; }
section { border-top: 1px solid #ccc; margin-top: 1.5em; padding-top: .5em; }
.row { display: flex; gap: 2em; flex-wrap: wrap; align-items: flex-start; }
.ctx { font-family: ui-monospace, monospace; font-size: 13px; white-space: pre-wrap;
       margin: 2px 0; padding: 2px 4px; background: #fafafa; }
.tok { border-radius: 2px; }
.max { outline: 1px solid #c40; }
.meta { color: #777; font-size: 11px; margin-right: .6em; }
table { border-collapse: collapse; font-size: 13px; }
td, th { padding: 1px 8px; text-align: left; }
td.num { text-align: right; font-family: ui-monospace, monospace; }
code { background: #f3f3f3; }
.note { color: #555; font-size: 13px; }
"""


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _shown(token: str) -> str:
    """Token text made visible: newlines and tabs as symbols (spaces kept by the CSS)."""
    return token.replace("\n", "\u21b5").replace("\t", "\u2192").replace("\r", "")


def _page(report: FeatureReport, seconds: float | None = None) -> str:
    site = (
        report.hook_name
        if report.hook_name == report.out_hook_name
        else f"{report.hook_name} \u2192 {report.out_hook_name}"
    )
    nav = " ".join(f'<a href="#latent-{f.latent}">{f.latent}</a>' for f in report.features)
    sections = "\n".join(_section(f) for f in report.features)
    timing = "" if seconds is None else f" Built in {seconds:.1f} s."
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>Features: {_esc(report.model_name)} {_esc(site)}</title>"
        f"<style>{_CSS}</style></head>\n<body>\n"
        f"<h1>Features of {_esc(site)}</h1>\n"
        f"<p>Model <code>{_esc(report.model_name)}</code>; {report.n_tokens} tokens scanned."
        f"{timing} Tokens are shaded by the latent's activation (relative to its maximum); "
        "hover a token for its value; the outlined token is the context's maximum.</p>\n"
        f"<p class='note'>{_esc(report.logit_note)}</p>\n"
        f"<nav>Latents: {nav}</nav>\n{sections}\n</body></html>\n"
    )


def _section(f: FeatureData) -> str:
    stats = (
        f"fires on {100 * f.frequency:.3g}% of tokens ({f.activations.numel()}); "
        f"max activation {f.max_activation:.4g}"
    )
    contexts = "\n".join(_context_html(c, f.max_activation) for c in f.contexts)
    if not contexts:
        contexts = "<p class='note'>It never fires on these tokens.</p>"
    tables = ""
    if f.promoted or f.suppressed:
        tables = _token_table("promoted", f.promoted) + _token_table("suppressed", f.suppressed)
    return (
        f"<section id='latent-{f.latent}'><h2>Latent {f.latent}</h2>\n<p>{_esc(stats)}</p>\n"
        f"<div class='row'><div>{_histogram_svg(f.activations)}</div>{tables}</div>\n"
        f"<h3>Top contexts</h3>\n{contexts}\n</section>"
    )


def _context_html(c: FeatureContext, scale: float) -> str:
    spans = []
    for offset, (token, act) in enumerate(zip(c.tokens, c.activations, strict=True)):
        alpha = 0.0 if scale <= 0 else max(0.0, min(1.0, act / scale))
        cls = "tok max" if c.start + offset == c.position else "tok"
        style = f"background: rgba(255, 110, 0, {alpha:.3f})" if alpha > 0 else ""
        title = f"{act:.4g} (position {c.start + offset})"
        text = _esc(_shown(token))
        spans.append(f"<span class='{cls}' style='{style}' title='{_esc(title)}'>{text}</span>")
    meta = f"row {c.row}, pos {c.position}: {c.max_activation:.4g}"
    return f"<div class='ctx'><span class='meta'>{_esc(meta)}</span>{''.join(spans)}</div>"


def _token_table(title: str, items: tuple[tuple[str, float], ...]) -> str:
    rows = "".join(
        f"<tr><td><code>{_esc(_shown(repr(token)))}</code></td>"
        f"<td class='num'>{value:+.3f}</td></tr>"
        for token, value in items
    )
    return f"<table><tr><th colspan='2'>{_esc(title)}</th></tr>{rows}</table>"


def _histogram_svg(values: Tensor, bins: int = 30, width: int = 320, height: int = 120) -> str:
    """An inline SVG histogram of ``values`` (bar titles give each bin's range and count)."""
    if values.numel() == 0:
        return "<p class='note'>No activations to histogram.</p>"
    top = float(values.max())
    low = min(0.0, float(values.min()))
    span = top - low if top > low else 1.0
    counts = torch.histc(values.float(), bins=bins, min=low, max=low + span)
    peak = float(counts.max())
    bar_w = width / bins
    bars = []
    for i, count in enumerate(counts.tolist()):
        if count == 0:
            continue
        h = max(1.0, (height - 20) * math.sqrt(count / peak))  # sqrt: small bins stay visible
        a, b = low + span * i / bins, low + span * (i + 1) / bins
        bars.append(
            f"<rect x='{i * bar_w:.1f}' y='{height - 15 - h:.1f}' width='{bar_w - 1:.1f}' "
            f"height='{h:.1f}' fill='#e66e00'><title>{a:.3g} to {b:.3g}: {int(count)}</title>"
            "</rect>"
        )
    return (
        f"<svg width='{width}' height='{height}' "
        f"role='img' aria-label='activation histogram'>{''.join(bars)}"
        f"<line x1='0' y1='{height - 15}' x2='{width}' y2='{height - 15}' stroke='#999'/>"
        f"<text x='0' y='{height - 2}' font-size='10'>{low:.3g}</text>"
        f"<text x='{width}' y='{height - 2}' font-size='10' text-anchor='end'>{top:.3g}</text>"
        f"<text x='{width / 2}' y='10' font-size='10' text-anchor='middle'>activation where it "
        "fires (bar height: sqrt count)</text></svg>"
    )
