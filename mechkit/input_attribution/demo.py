"""The input-attribution section of ``make demo``: a heatmap per method and the faithfulness
table, on a few prompts of the demo's model."""

from __future__ import annotations

from pathlib import Path

from mechkit.atomic_io import write_text_atomically
from mechkit.core.types import Model
from mechkit.input_attribution.compare import compare_input_attributions
from mechkit.report_parts import figure_link, html_table

__all__ = ["demo_section"]

PROMPTS = (
    "The Eiffel Tower is in the city of",
    "When Mary and John went to the store, John gave a drink to",
    "The capital of France is",
)


def demo_section(model: Model, out: Path, quick: bool = False) -> str:
    """Run every method on a few prompts, write the heatmaps (``input_attribution.html``) and
    the comparison figure under ``out``; return the section's HTML (the faithfulness table).

    Example:
        >>> import tempfile
        >>> part = demo_section(mk.load_model("attn-only-2l"), Path(tempfile.mkdtemp()),
        ...                     quick=True)
        >>> part.startswith("<p>Which prompt tokens") and "comprehensiveness" in part
        True
    """
    out = Path(out)
    prompts: list[str] | list[list[int]] = list(PROMPTS[:2] if quick else PROMPTS)
    if getattr(model, "tokenizer", None) is None:  # a toy model: token ids
        prompts = [[1, 7, 3, 9, 4, 12], [5, 8, 2, 6, 11]]
    options = {
        "integrated_gradients": {"n_steps": 8 if quick else 32, "max_steps": 8 if quick else 32},
        "kernel_shap": {"n_samples": 32 if quick else 200},
        "lime": {"n_samples": 32 if quick else 200},
    }
    comparison = compare_input_attributions(
        model, prompts, options=options, n_random=1 if quick else 5, progress=False
    )
    heatmaps = "".join(comparison.attributions[m].html() for m in comparison.methods)
    page = f"<!doctype html><meta charset='utf-8'><body>{heatmaps}</body>"
    write_text_atomically(out / "input_attribution.html", page)
    figure_link(out, "input_attribution_compare.html", comparison.plot())
    frame = comparison.to_dataframe().round(3)
    rows = [[name, *row] for name, row in zip(frame.index, frame.values.tolist(), strict=True)]
    return (
        "<p>Which prompt tokens drove the next-token prediction, by gradients, perturbation and "
        'attention (<a href="input_attribution.html">token heatmaps</a>), and how faithful each '
        'method is by erasure (<a href="input_attribution_compare.html">figure</a>): '
        "comprehensiveness (high is faithful), sufficiency (low is faithful), AOPC against "
        "random orders.</p>" + html_table(rows, ["method", *map(str, frame.columns)])
    )
