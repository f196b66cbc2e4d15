"""MkDocs hooks: the pages and figures of the site that come from code.

- ``reference/sweep-config.md``: the sweep config keys from :data:`CONFIG_KEYS`, the table that
  ``mechkit sweep --help`` prints, followed by that help itself (so the two cannot disagree).
- ``tutorials/``: the notebooks of ``tutorials/`` and their README. A notebook is shown with its
  outputs when ``docs/scripts/execute_tutorials.py`` (run by ``make docs``) has executed it into
  ``build/docs-notebooks/`` since it last changed; otherwise as committed (without outputs).
- ``{{ figure("NAME") }}`` in a page becomes the plotly figure ``docs/figures/NAME.json``
  (written by ``docs/scripts/make_figures.py``); plotly.js is copied from the installed plotly
  package into ``assets/``, so neither the build nor the pages fetch anything.
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import io
import json
import os
import re
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files
from mkdocs.utils import get_relative_url

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "docs" / "figures"
EXECUTED = ROOT / "build" / "docs-notebooks"  # written by docs/scripts/execute_tutorials.py
PLOTLY_JS = "assets/plotly.min.js"
_FIGURE = re.compile(r"\{\{\s*figure\(\s*\"([A-Za-z0-9_-]+)\"\s*\)\s*\}\}")


# ----------------------------------------------------------------------------- sweep config


def sweep_help() -> str:
    """The text ``mechkit sweep --help`` prints (at 100 columns)."""
    from mechkit.__main__ import main

    buffer = io.StringIO()
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        with contextlib.redirect_stdout(buffer), contextlib.suppress(SystemExit):
            main(["sweep", "--help"])
    finally:
        if previous is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = previous
    return buffer.getvalue()


def sweep_reference() -> str:
    """The Markdown of the sweep config reference page, from CONFIG_KEYS."""
    from mechkit.patching.sweep_config import CONFIG_KEYS

    rows = "\n".join(
        f'<tr><td id="key-{_anchor(key)}"><code>{html.escape(key)}</code></td>'
        f"<td>{html.escape(text)}</td></tr>"
        for key, text in CONFIG_KEYS
    )
    example = (ROOT / "examples" / "sweep_ioi.yaml").read_text(encoding="utf-8")
    return f"""# Sweep config reference

`mechkit sweep CONFIG.yaml` runs the activation-patching sweeps a YAML file describes (see
[Patching sweeps](../techniques/sweeps.md)). This page is generated from
`mechkit.patching.sweep_config.CONFIG_KEYS`, the same table `mechkit sweep --help` prints; every
key is checked before any model loads, and an error names the file and the key's path
(`sweep.yaml: sweeps[1].positions: ...`).

## Keys

<table>
<thead><tr><th>key</th><th>what it accepts</th></tr></thead>
<tbody>
{rows}
</tbody>
</table>

## Example

`examples/sweep_ioi.yaml`:

```yaml
{example.rstrip()}
```

## `mechkit sweep --help`

```text
{sweep_help().rstrip()}
```
"""


def _anchor(key: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", key.lower()).strip("-")


# -------------------------------------------------------------------------------- tutorials


def source_digest(path: Path) -> str:
    """What an executed copy records of the notebook it was made from."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def executed_copy(source: Path) -> Path | None:
    """The executed copy of a tutorial notebook, if it was made from the notebook as it is."""
    copy = EXECUTED / "tutorials" / source.name
    if not copy.is_file():
        return None
    try:
        meta = json.loads(copy.read_text(encoding="utf-8"))["metadata"].get("mechkit", {})
    except (ValueError, KeyError):
        return None
    return copy if meta.get("source_sha256") == source_digest(source) else None


def tutorials_index() -> str:
    text = (ROOT / "tutorials" / "README.md").read_text(encoding="utf-8")
    text = re.sub(r"`([a-z_]+)\.ipynb`", r"[`\1.ipynb`](\1.ipynb)", text)
    return text + (
        "\nThe pages here show each notebook with its outputs when `make docs` has executed it "
        "(`docs/scripts/execute_tutorials.py`, cached until the notebook changes); a build "
        "without that step (such as the test suite's) shows the notebooks as committed, "
        "without outputs.\n"
    )


# ---------------------------------------------------------------------------------- figures


def figure_html(name: str, figure: dict[str, Any]) -> str:
    """A div and the script that draws ``figure`` (plotly JSON) in it once the page loads."""
    data = json.dumps(figure, separators=(",", ":")).replace("</", "<\\/")
    div = f"mk-figure-{name}"
    return (
        f'<div class="mk-plotly" id="{div}"></div>\n'
        f"<script>window.addEventListener('load',function(){{var f={data};"
        f"Plotly.newPlot('{div}',f.data,f.layout,{{responsive:true,displaylogo:false}});}});"
        "</script>"
    )


# ------------------------------------------------------------------------------------ hooks


@event_priority(100)  # before mkdocs-jupyter looks for notebooks
def on_files(files: Files, config: Any) -> Files:
    files.append(File.generated(config, "reference/sweep-config.md", content=sweep_reference()))
    files.append(File.generated(config, "tutorials/index.md", content=tutorials_index()))
    for source in sorted((ROOT / "tutorials").glob("*.ipynb")):
        copy = executed_copy(source)
        src_dir = EXECUTED if copy is not None else ROOT
        files.append(
            File(
                f"tutorials/{source.name}",
                src_dir=str(src_dir),
                dest_dir=config["site_dir"],
                use_directory_urls=config["use_directory_urls"],
            )
        )
    import plotly

    plotly_js = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    files.append(File.generated(config, PLOTLY_JS, abs_src_path=str(plotly_js)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    def replace(match: re.Match[str]) -> str:
        path = FIGURES / f"{match.group(1)}.json"
        if not path.is_file():
            raise PluginError(
                f"{page.file.src_uri}: no figure {path.name} in docs/figures. Hint: python "
                f"docs/scripts/make_figures.py {match.group(1)}"
            )
        return "\n" + figure_html(match.group(1), json.loads(path.read_text("utf-8"))) + "\n"

    return _FIGURE.sub(replace, markdown)


def on_page_content(content: str, page: Any, config: Any, files: Files) -> str:
    if 'class="mk-plotly"' not in content:
        return content
    url = get_relative_url(PLOTLY_JS, page.url)
    return f'<script src="{url}"></script>\n' + content
