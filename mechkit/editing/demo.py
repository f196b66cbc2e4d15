"""The editing section of ``make demo``: the causal-tracing figure of a few known facts and a
table of ROME edits evaluated as CounterFact."""

from __future__ import annotations

import html
from pathlib import Path

from mechkit.atomic_io import write_atomically
from mechkit.core.types import Model
from mechkit.editing.evaluation import evaluate_edits
from mechkit.editing.facts import builtin_facts, known_facts, tokenize_fact
from mechkit.editing.rome import RomeConfig, rome
from mechkit.editing.tracing import causal_trace
from mechkit.errors import MultiTokenAnswerError

__all__ = ["demo_section"]


def demo_section(model: Model, out: Path, quick: bool = False) -> str:
    """Trace a few facts the model knows and edit some with ROME; write ``out/trace.html`` and
    ``out/edits.csv``; return the section's HTML.

    Example:
        >>> import tempfile
        >>> demo_section  # doctest: +ELLIPSIS
        <function demo_section at ...>
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    known = known_facts(model, builtin_facts(["capital", "language", "continent"]))
    n_trace, samples, n_edits = (2, 2, 2) if quick else (8, 5, 5)
    trace = causal_trace(model, known[:n_trace], samples=samples, progress=False)
    fig = trace.plot()
    write_atomically(out / "trace.html", lambda t: fig.write_html(t, include_plotlyjs="directory"))
    peak = trace.peak("mlp")
    layer = int(peak["layer"])
    requests = []
    for fact in known:
        try:
            tokenize_fact(model, fact)
        except MultiTokenAnswerError:
            continue
        requests.append(fact)
    requests = requests[:n_edits]
    config = RomeConfig(steps=10 if quick else 20, n_prefixes=1 if quick else 3)
    edits = [rome(model, f, layer=layer, covariance="identity", config=config) for f in requests]
    ev = evaluate_edits(model, requests, edits, fluency_tokens=0 if quick else 10, progress=False)
    frame = ev.to_dataframe()
    frame.to_csv(out / "edits.csv", index=False)
    rows = "".join(
        f"<tr><td>{html.escape(r.request)}</td><td>{r.new_prob_before:.3f}</td>"
        f"<td>{r.new_prob_after:.3f}</td><td>{r.paraphrase_after:.2f}</td>"
        f"<td>{r.neighbourhood_after:.2f}</td></tr>"
        for r in frame.itertuples(index=False)
    )
    table = (
        "<table><tr><th>edit</th><th>P(new) before</th><th>P(new) after</th>"
        "<th>paraphrases won</th><th>neighbours kept</th></tr>" + rows + "</table>"
    )
    return (
        f"<p>Causal tracing (Meng et al. 2022) of {len(trace.prompts)} facts the model completes "
        f"({samples} noise samples of 3x the embedding std, windows of 10 layers): "
        '<a href="trace.html">trace.html</a>. Total effect '
        f"{trace.total_effect:.3f}; the MLPs' indirect effect peaks at layer {layer} "
        f"({peak['token']} token, {peak['effect']:.3f}). ROME edits at that layer (C = I), "
        'evaluated as CounterFact (<a href="edits.csv">CSV</a>):</p>' + table
    )
