"""The README's quickstart runs as written, and the demo job writes its report."""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys
from pathlib import Path

import torch

import mechkit as mk
from mechkit.demo import run_demo
from tests.conftest import hook_count

ROOT = Path(__file__).resolve().parents[1]


def test_readme_quickstart_runs(smollm2):
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Quickstart\s+```python\n(.*?)```", readme, re.S).group(1)
    out = io.StringIO()
    namespace: dict = {}
    with contextlib.redirect_stdout(out):
        exec(compile(block, "README.md quickstart", "exec"), namespace)
    clean, patched = (
        namespace["metric"](namespace["clean_logits"]),
        namespace["metric"](namespace["patched"]),
    )
    assert abs(float(clean) - float(patched)) < 1e-4  # the claim in the README's comment
    assert float(clean) > 2
    assert "tensor(" in out.getvalue()


def test_demo_writes_report(smollm2, tmp_path, monkeypatch):
    def session_model(name):  # the session's model, not a second copy loaded from the cache
        assert name == "smollm2-135m"
        return smollm2

    monkeypatch.setattr(sys.modules[run_demo.__module__], "load_model", session_model)
    config, sums = smollm2.cfg.to_dict(), {n: p.sum() for n, p in smollm2.named_parameters()}
    from mechkit.demo import registered_sections

    # the paper reproductions' sections come through their entry point (mechkit_circuits)
    assert registered_sections(), "no demo sections registered: run `pip install -e .` again"
    index = run_demo(tmp_path / "reports", "smollm2-135m", quick=True)
    # the demo leaves the shared model as it found it: no hooks, settings or weights changed
    assert hook_count(smollm2) == 0 and smollm2.cfg.to_dict() == config
    assert all(torch.equal(p.sum(), sums[n]) for n, p in smollm2.named_parameters())
    page = index.read_text()
    assert index.name == "index.html" and "smollm2-135m" in page
    assert "&#x27; Paris&#x27;" in page or "' Paris'" in page  # top prediction shown
    figures = ["next_tokens", "logit_lens", "logit_lens_answer_rank", "dla", "heads_induction"]
    for figure in [*figures, "attribution_vs_patching", "faithfulness", "ioi_circuit"]:
        assert (tmp_path / "reports" / f"{figure}.html").is_file(), figure
        assert f'href="{figure}.html"' in page
    assert (tmp_path / "reports" / "plotly.min.js").is_file()  # the report opens offline
    assert (tmp_path / "reports" / "next_tokens.csv").read_text().count("\n") > 5
    assert not list((tmp_path / "reports").glob("*.tmp"))
    circuit = mk.CircuitGraph.load(tmp_path / "reports" / "ioi_circuit.json")
    assert 0 < circuit.n_edges <= 150 and circuit.model_name == "smollm2-135m"
    assert (tmp_path / "reports" / "ioi_circuit.svg").read_text().startswith("<svg")
    for report in ["ioi/index.html", "induction/index.html", "greater_than/index.html"]:
        assert (tmp_path / "reports" / report).is_file(), report
        assert f'href="{report}"' in page
    assert (tmp_path / "reports" / "features.html").is_file()
    features = mk.CircuitGraph.load(tmp_path / "reports" / "feature_circuit.json")
    assert features.layout.row_labels() == ["input", "r6", "m12", "r12", "r18", "r24", "logits"]
    assert 0 < features.n_edges <= 60 and features.node_scores
    assert 'href="feature_circuit.html"' in page and 'href="feature_faithfulness.html"' in page
    numbers = json.loads((tmp_path / "reports" / "ioi" / "ioi.json").read_text())
    assert numbers["logit_diff"] > 1 and numbers["classes"]["name mover"]


def test_cli_reports_errors_plainly(capsys):
    from mechkit.__main__ import main

    code = main(["demo", "--model", "no-such-model", "--out", "/tmp/unused"])
    assert code == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("mechkit: error: Expected a built-in model name") and "Traceback" not in err
    )
    assert isinstance(mk.UnknownModelError("x"), mk.MechkitError)


def test_readme_tokenizer_note_holds(smollm2):
    """The README's model section says what the tokenizer adds and what to_tokens does."""
    text = (ROOT / "README.md").read_text()
    assert "`[1, 19556]`" in text and "add_special_tokens=False" in text
    assert smollm2.tokenizer("Hello")["input_ids"] == [1, 19556]
    assert smollm2.tokenizer("Hello", add_special_tokens=False)["input_ids"] == [19556]
    assert smollm2.to_tokens("Hello").tolist() == [[19556]]
    assert mk.PromptPairs.from_lists(
        smollm2, ["Hello"], ["Hello"], [" a"], [" b"]
    ).clean_tokens.tolist() == [[19556]]
