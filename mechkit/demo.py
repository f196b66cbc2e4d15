"""The main job behind ``make demo``: run mechkit's analyses on a model and write a report.

The report is a folder with ``index.html`` linking each section's figures. This first version
holds the model card and the next-token predictions of a few prompts; each technique adds its
section as it lands.
"""

from __future__ import annotations

import dataclasses
import html
import os
import tempfile
import time
from pathlib import Path

from mechkit.models import load_model, model_info
from mechkit.predictions import predict_next_tokens

__all__ = ["DEMO_PROMPTS", "run_demo"]

DEMO_PROMPTS = (
    "When Mary and John went to the store, John gave a drink to",
    "The Eiffel Tower is located in the city of",
    "The capital of Japan is",
    "def add(a, b):\n    return a",
    "One, two, three, four,",
)


def _write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, so readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run_demo(out_dir: str | Path = "reports", model_name: str = "smollm2-135m") -> Path:
    """Load ``model_name``, run the demo analyses, and write ``out_dir/index.html``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    print(f"[mechkit demo] loading {model_name} ...", flush=True)
    model = load_model(model_name)
    info = model_info(model)
    print(f"[mechkit demo] loaded in {info.load_seconds:.1f} s (cache: {info.from_cache})")

    preds = predict_next_tokens(model, list(DEMO_PROMPTS), k=5)
    preds.to_dataframe().to_csv(out / "next_tokens.csv", index=False)
    fig = preds.plot()
    _write_atomically(out / "next_tokens.html", fig.to_html(include_plotlyjs="directory"))

    cfg = model.cfg
    card = {
        "layers": cfg.n_layers,
        "d_model": cfg.d_model,
        "heads": f"{cfg.n_heads} (key/value heads: {cfg.n_key_value_heads or cfg.n_heads})",
        "d_mlp": cfg.d_mlp,
        "vocabulary": cfg.d_vocab,
        **{k: v for k, v in dataclasses.asdict(info).items() if k != "processing"},
        "processing": ", ".join(f"{k}={v}" for k, v in info.processing.as_dict().items()),
    }
    rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
        for k, v in card.items()
    )
    pred_rows = "".join(
        "<tr><td><pre>{}</pre></td>{}</tr>".format(
            html.escape(prompt),
            "".join(
                f"<td><code>{html.escape(repr(tok))}</code> {p:.2f}</td>"
                for tok, p in zip(preds.tokens[i], preds.probs[i].tolist(), strict=True)
            ),
        )
        for i, prompt in enumerate(preds.prompts)
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>mechkit report: {html.escape(model_name)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}
pre{{margin:0;white-space:pre-wrap}}</style></head><body>
<h1>mechkit report: {html.escape(model_name)}</h1>
<h2>Model</h2><table>{rows}</table>
<h2>Next-token predictions</h2>
<p>Top 5 next tokens with their probabilities (<a href="next_tokens.html">chart</a>,
<a href="next_tokens.csv">CSV</a>).</p>
<table><tr><th>prompt</th><th>1</th><th>2</th><th>3</th><th>4</th><th>5</th></tr>
{pred_rows}</table>
<p><small>Written by mechkit in {time.perf_counter() - start:.1f} s.</small></p>
</body></html>
"""
    index = out / "index.html"
    _write_atomically(index, page)
    print(f"[mechkit demo] wrote {index}")
    return index
