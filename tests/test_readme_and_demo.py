"""The README's quickstart runs as written, and the demo job writes its report."""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys
from pathlib import Path

import pytest
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
    assert namespace["words"].top(1)[0][0][2] == " Mary"  # the README's comment
    shares = namespace["shares"]
    tokens = namespace["mixing"].str_tokens[0]
    assert shares[tokens.index(" Mary")] > shares[tokens.index(" John")]


# The files each demo section writes under the report folder (every .html one is linked from
# the page). A new section gets its entry here: test_every_demo_section_is_tested says so.
SECTION_FILES = {
    "Model": [],
    "Next-token predictions": ["next_tokens.html", "next_tokens.csv"],
    "Logit lens": ["logit_lens.html", "logit_lens_answer_rank.html"],
    "Direct logit attribution (IOI)": ["dla.html"],
    "Attention heads": ["heads_induction.html"],
    "Activation and path patching (IOI)": [
        "patch_resid_pre.html",
        "patch_heads.html",
        "path_patch.html",
        "path_patch.csv",
    ],
    "Attribution patching and the circuit graph (IOI)": [
        "attribution_vs_patching.html",
        "faithfulness.html",
        "ioi_circuit.html",
        "ioi_circuit.json",
        "ioi_circuit.svg",
    ],
    "Steering (activation addition)": ["steering_sweep.html", "steering_samples.csv"],
    "Sparse autoencoder features": ["features.html"],
    "Input attribution": ["input_attribution.html", "input_attribution_compare.html"],
    "Context mixing": ["context_mixing_alti.html"],
    "Probes, concept erasure and DAS": ["probe_name_gender.html"],
    "Causal tracing and editing (ROME)": ["trace.html", "edits.csv"],
    "Scaling out (Ray, torch.distributed, several GPUs)": ["gpu_placement.json"],
    "IOI circuit (Wang et al. 2022)": ["ioi/index.html", "ioi/ioi.json"],
    "Induction heads (Olsson et al. 2022)": ["induction/index.html"],
    "Greater-than (Hanna et al. 2023)": ["greater_than/index.html"],
    "Successor heads (Gould et al. 2023)": ["successor_heads/index.html"],
    "Sparse feature circuit (IOI)": [
        "feature_circuit.html",
        "feature_faithfulness.html",
        "feature_circuit.json",
    ],
}


def _all_sections() -> dict:
    from mechkit.demo import SECTIONS, registered_sections

    return dict([*SECTIONS, *registered_sections()])


def _check_section(title: str, out: Path, page: str) -> None:
    """What a section's output must say beyond its files."""
    if title == "Next-token predictions":
        assert "&#x27; Paris&#x27;" in page or "' Paris'" in page  # top prediction shown
        assert (out / "next_tokens.csv").read_text().count("\n") > 5
    elif title.startswith("Attribution patching"):
        circuit = mk.CircuitGraph.load(out / "ioi_circuit.json")
        assert 0 < circuit.n_edges <= 150 and circuit.model_name == "smollm2-135m"
        assert (out / "ioi_circuit.svg").read_text().startswith("<svg")
    elif title == "Sparse feature circuit (IOI)":
        features = mk.CircuitGraph.load(out / "feature_circuit.json")
        rows = ["input", "r6", "m12", "r12", "r18", "r24", "logits"]
        assert features.layout.row_labels() == rows
        assert 0 < features.n_edges <= 60 and features.node_scores
    elif title.startswith("IOI circuit"):
        numbers = json.loads((out / "ioi" / "ioi.json").read_text())
        assert numbers["logit_diff"] > 1 and numbers["classes"]["name mover"]
    elif title.startswith("Induction heads"):
        # Olsson et al.'s claims on SmolLM2, at tests/circuits/test_induction.py's settings
        # (the quick demo's): this is the suite's one run of the reproduction on the real model
        numbers = json.loads((out / "induction" / "induction.json").read_text())
        heads = numbers["heads"]
        best = max(heads, key=lambda row: row["prefix_matching"])["label"]
        assert numbers["induction_heads"][0]["head"] == best
        layer = {row["label"]: row["layer"] for row in heads}
        first_induction_layer = min(row["layer"] for row in heads if row["induction_head"])
        assert layer[numbers["previous_token_heads"][0]["head"]] < first_induction_layer
        increase = numbers["ablation_increase"]
        assert increase["induction"]["zero"] > increase["control"]["zero"]


def test_every_demo_section_is_tested():
    sections = _all_sections()
    # the paper reproductions' sections come through their entry point (mechkit_circuits)
    assert "IOI circuit (Wang et al. 2022)" in sections, "run `pip install -e .` again"
    assert set(sections) == set(SECTION_FILES), "add the new section's files to SECTION_FILES"


# One test per section (xdist spreads them over the cores), each on the session's model.
@pytest.mark.parametrize("title", list(SECTION_FILES))
def test_demo_section_writes_its_report(title, smollm2, tmp_path, monkeypatch):
    def session_model(name):  # the session's model, not a second copy loaded from the cache
        assert name == "smollm2-135m"
        return smollm2

    monkeypatch.setattr(sys.modules[run_demo.__module__], "load_model", session_model)
    config, sums = smollm2.cfg.to_dict(), {n: p.sum() for n, p in smollm2.named_parameters()}
    section = (title, _all_sections()[title])
    index = run_demo(tmp_path / "reports", "smollm2-135m", quick=True, sections=[section])
    # the demo leaves the shared model as it found it: no hooks, settings or weights changed
    assert hook_count(smollm2) == 0 and smollm2.cfg.to_dict() == config
    assert all(torch.equal(p.sum(), sums[n]) for n, p in smollm2.named_parameters())
    out, page = tmp_path / "reports", index.read_text()
    assert index.name == "index.html" and "smollm2-135m" in page and f"<h2>{title}" in page
    for name in SECTION_FILES[title]:
        assert (out / name).is_file(), name
        if name.endswith(".html"):
            assert f'href="{name}"' in page, name
    for name in SECTION_FILES[title]:  # each report folder opens offline: plotly.js beside it
        if name.endswith(".html") and name != "features.html":
            assert (out / name).parent.joinpath("plotly.min.js").is_file(), name
    assert not list(out.rglob("*.tmp"))
    _check_section(title, out, page)


def test_demo_page_lists_every_section_and_says_when_reproductions_are_missing(
    tmp_path, monkeypatch, capsys
):
    import mechkit.demo as demo

    ran = []

    def section(name):
        def run(model, out, quick=False):
            ran.append((name, quick))
            return f"<p>{name} body</p>"

        return (name, run)

    monkeypatch.setattr(demo, "SECTIONS", (section("first"), section("second")))
    monkeypatch.setattr(demo, "registered_sections", lambda: ())
    page = run_demo(tmp_path, "attn-only-2l", quick=True).read_text()
    assert ran == [("first", True), ("second", True)]
    assert page.index("<h2>first</h2><p>first body</p>") < page.index("<h2>second</h2>")
    assert "Quick run" in page and "The paper reproductions are not installed" in page
    assert "pip install -e ." in capsys.readouterr().out


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
