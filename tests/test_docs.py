"""The documentation site builds in strict mode, offline, with every page it promises.

``mkdocs build --strict`` fails on a broken link, a broken cross-reference, a docstring griffe
cannot parse or a missing figure. The sweep config reference is generated from the table that
``mechkit sweep --help`` prints; the tests check that the table, the help, the page and the
config dataclasses name the same keys.
"""

from __future__ import annotations

import dataclasses
import html
import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mechkit.patching.sweep_config import CONFIG_KEYS, PromptSource, SweepConfig, SweepEntry

ROOT = Path(__file__).resolve().parents[1]
TECHNIQUES = [
    "lens",
    "decomposition",
    "activation-patching",
    "path-patching",
    "attribution-patching",
    "edge-attribution",
    "heads",
    "sae",
    "steering",
    "sweeps",
]
PAGES = [
    "index.html",
    "getting-started/index.html",
    "concepts/index.html",
    "circuits/index.html",
    "models/index.html",
    "limits/index.html",
    "performance/index.html",
    "reference/sweep-config/index.html",
    "tutorials/index.html",
    "api/index.html",
    *(f"techniques/{name}/index.html" for name in TECHNIQUES),
    *(f"tutorials/{p.stem}/index.html" for p in sorted((ROOT / "tutorials").glob("*.ipynb"))),
    *(
        f"api/{p.stem}/index.html"
        for p in sorted((ROOT / "docs" / "api").glob("*.md"))
        if p.stem != "index"
    ),
]


def _text(path: Path) -> str:
    """A page's text without its tags (code is split into highlighted spans)."""
    return html.unescape(re.sub(r"<[^>]+>", "", path.read_text(encoding="utf-8")))


def _load_hooks():
    spec = importlib.util.spec_from_file_location("mechkit_docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_MKDOCS_2_WARNING": "1"}
    start = time.perf_counter()
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-5000:]
    print(f"mkdocs build --strict: {time.perf_counter() - start:.1f} s")
    return out


@pytest.mark.slow  # builds the whole site (half a minute or more)
def test_docs_site(site):
    """One test for every check of the built site: under ``pytest -n`` the tests of a module
    go to whichever worker is free, so four tests built the site twice (30 s each)."""
    _check_every_page(site)
    _check_api_reference_is_generated_from_docstrings(site)
    _check_pages_fetch_nothing(site)
    _check_sweep_reference_page_matches_help(site)


def _check_every_page(site):
    missing = [page for page in PAGES if not (site / page).is_file()]
    assert not missing
    for name in TECHNIQUES:  # each technique page: a formula block, a paper, an example, a figure
        page = (site / "techniques" / name / "index.html").read_text(encoding="utf-8")
        assert 'class="mk-plotly"' in page and "Plotly.newPlot" in page, name
        assert "plotly.min.js" in page, name
        text = _text(site / "techniques" / name / "index.html")
        assert "import mechkit as mk" in text or "mechkit sweep" in text, name
    assert (site / "assets" / "plotly.min.js").stat().st_size > 1_000_000


def _check_api_reference_is_generated_from_docstrings(site):
    patching = (site / "api" / "patching" / "index.html").read_text(encoding="utf-8")
    # the docstring of activation_patch, rendered with its Args section
    assert 'id="mechkit.patching.activation_patch"' in patching
    assert "Denoising" in patching or "denoising" in patching
    errors = (site / "api" / "errors" / "index.html").read_text(encoding="utf-8")
    assert "InvalidArgumentError" in errors and "OutputFolderError" in errors
    # "Example:" sections render as code (docs/griffe_examples.py), not as Markdown links
    misc = (site / "api" / "misc" / "index.html").read_text(encoding="utf-8")
    assert ">>> preds.tokens[0][0]" in _text(site / "api" / "misc" / "index.html")
    assert '<span class="gp">&gt;&gt;&gt; </span>' in misc  # a highlighted doctest prompt


def _check_pages_fetch_nothing(site):
    remote = re.compile(r"<(?:script|link|img|iframe)\b[^>]*(?:src|href)=\"(?:https?:)?//", re.I)
    offenders = [
        str(path.relative_to(site))
        for path in site.rglob("*.html")
        if remote.search(path.read_text(encoding="utf-8"))
    ]
    assert not offenders
    css = "".join(p.read_text(encoding="utf-8") for p in site.rglob("*.css"))
    assert "fonts.googleapis" not in css


def _check_sweep_reference_page_matches_help(site):
    page = (site / "reference" / "sweep-config" / "index.html").read_text(encoding="utf-8")
    help_text = _load_hooks().sweep_help()
    assert help_text.startswith("usage: mechkit sweep")
    for key, text in CONFIG_KEYS:
        assert f"<code>{html.escape(key)}</code>" in page, key
        assert html.escape(text) in page, key
        assert re.search(rf"^  {re.escape(key)}\s", help_text, re.M), key
    assert html.escape(help_text.strip().splitlines()[-1]) in page  # the help itself is shown


def test_sweep_config_keys_name_every_field():
    """CONFIG_KEYS (the source of the help and the page) and the dataclasses agree."""
    fields = {f.name for f in dataclasses.fields(SweepConfig)}
    fields |= {f"prompts.{f.name}" for f in dataclasses.fields(PromptSource)}
    fields |= {f"sweeps[].{f.name}" for f in dataclasses.fields(SweepEntry)}
    assert {key for key, _ in CONFIG_KEYS} == fields


def test_readme_quickstart_is_the_docs_quickstart():
    """The README's quickstart (run by test_readme_and_demo) and the site's are one text."""

    def quickstart(path: Path) -> str:
        text = path.read_text(encoding="utf-8")
        return re.search(r"## Quickstart\s+```python\n(.*?)```", text, re.S).group(1)

    assert quickstart(ROOT / "README.md") == quickstart(ROOT / "docs" / "getting-started.md")


def test_readme_links_point_at_files():
    """The README links into docs/ and tutorials/; every relative link names a file."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    relative = [link for link in links if "://" not in link]
    assert [link for link in relative if not (ROOT / link).is_file()] == []
