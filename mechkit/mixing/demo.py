"""The context-mixing section of ``mechkit demo``: the methods on an IOI prompt, the per-layer
ALTI heatmap, and (unless ``quick``) the agreement table on a few prompts."""

from __future__ import annotations

import html
from pathlib import Path

from mechkit.core.types import Model
from mechkit.mixing.agreement import mixing_agreement
from mechkit.mixing.api import context_mixing
from mechkit.report_parts import figure_link, html_table

__all__ = ["demo_section", "IOI_PROMPT", "AGREEMENT_PROMPTS"]

IOI_PROMPT = "When Mary and John went to the store, John gave a drink to"
"""The prompt of the section (SmolLM2 answers " Mary")."""

AGREEMENT_PROMPTS = (
    IOI_PROMPT,
    "When Tom and Anna went to the park, Anna gave a ball to",
    "The Eiffel Tower is located in the city of",
)
"""The prompts of the agreement table (each scored at its last token)."""


def demo_section(model: Model, out: Path, quick: bool = False) -> str:
    """Run the methods on :data:`IOI_PROMPT`, write ``context_mixing_alti.html`` (the per-layer
    map with a slider) under ``out``, and return the section's HTML.

    Example:
        >>> import tempfile
        >>> model = mk.load_model("smollm2-135m")
        >>> section = demo_section(model, Path(tempfile.mkdtemp()), quick=True)
        >>> "<table>" in section and "context_mixing_alti.html" in section
        True
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    methods = ["attention", "rollout", "alti"]
    if not quick:
        methods += ["attention_norm", "globenc", "alti_logit", "value_zeroing", "decompx"]
    rows = []
    alti = None
    for method in methods:
        mix = context_mixing(model, IOI_PROMPT, method=method, progress=False)
        if method == "alti":
            alti = mix
        row = (mix.logit if mix.logit is not None else mix.aggregated)[0, -1]
        words = mix.str_tokens[0]
        best = sorted(range(len(words)), key=lambda k: -float(row[k]))[:3]
        rows.append([method, ", ".join(f"{words[k]!r} {float(row[k]):.2f}" for k in best)])
    assert alti is not None  # "alti" is always among the methods
    alti_link = figure_link(out, "context_mixing_alti.html", alti.plot())
    parts = [
        f"<p>What the last position of <code>{html.escape(IOI_PROMPT)}</code> draws on, by "
        "method (the three largest entries of its row over all layers; ALTI-Logit and DecompX "
        "give shares of the top prediction's logit). ALTI's map per layer: "
        f"{alti_link}.</p>",
        html_table(rows, ["method", "largest shares (token, value)"]),
    ]
    if not quick:
        agree = mixing_agreement(model, list(AGREEMENT_PROMPTS), methods=methods, progress=False)
        table = agree.table
        agree_rows = [
            [m, *(f"{float(v):+.2f}" for v in table[i])] for i, m in enumerate(agree.methods)
        ]
        parts.append(
            f"<p>Agreement with input attributions (Spearman, mean over {len(AGREEMENT_PROMPTS)} "
            "prompts):</p>" + html_table(agree_rows, ["method", *agree.baselines])
        )
    return "\n".join(parts)
