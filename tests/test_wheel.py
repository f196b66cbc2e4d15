"""The wheel stands alone: ``python -m build`` makes an sdist and, from it, a wheel, which
installed into a fresh virtual environment outside the repository (no editable install, the
checkout not on the path) imports, loads the toy model and the shipped SAEs, runs the start of
the README's quickstart on the real model, ``mechkit sweep --help`` and a paper reproduction
through its entry point.

The new environment gets the already-installed dependencies from this interpreter's
site-packages through a plain path line in a ``.pth`` file: such a line only extends
``sys.path``, so the ``.pth`` files there (the editable install's finder among them) never run,
and the checked paths prove ``mechkit`` comes from the wheel. About 2 minutes on 2 busy cores.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

import mechkit as mk

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

# Run inside the new environment; prints one JSON line of what it found.
PROBE = r"""
import importlib.metadata, importlib.util, json, sys
from pathlib import Path

import torch
import mechkit as mk
import mechkit_circuits
from mechkit.demo import registered_sections
from mechkit.sae.io import shipped_saes

found = {
    "prefix": sys.prefix,
    "mechkit": mk.__file__,
    "mechkit_circuits": mechkit_circuits.__file__,
    "top_level_circuits": importlib.util.find_spec("circuits") is not None,
    "version": mk.__version__,
    "metadata_version": importlib.metadata.version("mechkit"),
    "sections": [title for title, _ in registered_sections()],
}
toy = mk.load_model("attn-only-2l")
found["toy_logits"] = list(toy(torch.tensor([[0, 5, 6, 7, 8, 5, 6, 7, 8]])).shape)  # BOS = 0
found["toy_best_induction_head"] = mk.detect_heads(toy, "induction").top(1)[0][0]
found["saes"] = {
    name: [str(folder), mk.load_sae(name).cfg.hook_name] for name, folder in shipped_saes().items()
}

namespace = {}
exec(compile(Path(sys.argv[1]).read_text(), "README.md quickstart", "exec"), namespace)
found["quickstart"] = [
    float(namespace["metric"](namespace["clean_logits"])),
    float(namespace["metric"](namespace["patched"])),
]
print("PROBE " + json.dumps(found))
"""


def _clean_env() -> dict[str, str]:
    """This process's environment without anything that points Python at the checkout."""
    drop = {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "PYTHONSAFEPATH"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "1")
    return env


def _run(cmd: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    done = subprocess.run(
        cmd, cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"{cmd} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    tmp = tmp_path_factory.mktemp("wheel")
    # The working tree as a fresh clone would have it (tracked and new, unignored files), so
    # the build never writes into the checkout.
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if listed.returncode != 0:
        pytest.skip("builds from a git checkout (git ls-files failed)")
    files = [f for f in listed.stdout.split("\0") if f and (ROOT / f).is_file()]
    src = tmp / "src"
    for name in files:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    # --no-isolation: build offline with this environment's setuptools (an isolated build
    # downloads setuptools). Given a folder, build makes the sdist, then the wheel *from the
    # sdist*: a file the sdist lacks is missing from the wheel too.
    dist = tmp / "dist"
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(src)], tmp)
    (wheel,) = dist.glob("mechkit-*.whl")
    (sdist,) = dist.glob("mechkit-*.tar.gz")

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp)
    python = venv / "bin" / "python"
    purelib = _run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp
    ).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(purelib) / "mechkit_test_dependencies.pth").write_text("\n".join(sorted(ours)) + "\n")
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps"]
    _run([*pip, "--no-index", "--quiet", str(wheel)], tmp)
    cwd = tmp / "cwd"
    cwd.mkdir()
    return SimpleNamespace(
        wheel=wheel, sdist=sdist, venv=venv, python=python, cwd=cwd, files=files, tmp=tmp
    )


def test_wheel_and_sdist_hold_the_package_and_its_data(installed):
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    expected = {f for f in installed.files if f.startswith("mechkit/")} | {
        "mechkit_circuits/" + f.removeprefix("circuits/")
        for f in installed.files
        if f.startswith("circuits/")
    }
    assert expected - names == set()  # every source and data file, SAEs and toy model included
    top = {name.split("/")[0] for name in names}
    version = mk.__version__
    assert top == {"mechkit", "mechkit_circuits", f"mechkit-{version}.dist-info"}
    assert installed.wheel.name == f"mechkit-{version}-py3-none-any.whl"
    entry_points = zipfile.ZipFile(installed.wheel).read(
        f"mechkit-{version}.dist-info/entry_points.txt"
    )
    assert b"[mechkit.reproductions]" in entry_points and b"[mechkit.demo_sections]" in entry_points
    with tarfile.open(installed.sdist) as sdist:
        in_sdist = {m.name.split("/", 1)[1] for m in sdist.getmembers() if "/" in m.name}
    assert {"CHANGELOG.md", "README.md", "tests/conftest.py", "examples/sweep_ioi.yaml"} <= in_sdist
    assert {f for f in installed.files if f.startswith(("tests/", "circuits/"))} <= in_sdist


def test_installed_wheel_runs_outside_the_repository(installed, tmp_path):
    readme = (ROOT / "README.md").read_text()
    quickstart = re.search(r"## Quickstart\s+```python\n(.*?)```", readme, re.S).group(1)
    # Its first paragraph: the real model loaded from the installed packages, a capture and a
    # patch. The rest (a patching sweep and EAP-IG, ~80 s on busy cores) runs from the
    # checkout in tests/test_readme_and_demo.py; here it would only time the same code again.
    quickstart = quickstart.split("\n\n# ")[0]
    assert "mk.intervene" in quickstart and "print(metric(clean_logits)" in quickstart
    (tmp_path / "quickstart.py").write_text(quickstart)
    (tmp_path / "probe.py").write_text(PROBE)
    mechkit = str(installed.venv / "bin" / "mechkit")
    probe = [str(installed.python), str(tmp_path / "probe.py"), str(tmp_path / "quickstart.py")]
    commands = {
        "probe": probe,
        "sweep": [mechkit, "sweep", "--help"],
        "reproduce": [
            mechkit, "reproduce", "induction", "--model", "attn-only-2l", "--out",
            str(tmp_path / "induction"), "--prompts", "4", "--icl-sequences", "1",
        ],
    }  # fmt: skip
    # independent, so they run side by side (each spends most of its time importing)
    running = {
        name: subprocess.Popen(
            cmd, cwd=installed.cwd, env=_clean_env(), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )
        for name, cmd in commands.items()
    }  # fmt: skip
    outputs = {}
    for name, process in running.items():
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, f"{name} failed:\n{stdout}\n{stderr}"
        outputs[name] = stdout

    line = next(x for x in outputs["probe"].splitlines() if x.startswith("PROBE "))
    found = json.loads(line.removeprefix("PROBE "))
    venv = str(installed.venv.resolve())
    assert Path(found["prefix"]).resolve() == installed.venv.resolve()
    assert found["mechkit"].startswith(venv) and found["mechkit_circuits"].startswith(venv)
    assert not found["top_level_circuits"]  # nothing installed under the clashing name
    assert found["version"] == found["metadata_version"] == mk.__version__
    assert found["sections"] == [
        "IOI circuit (Wang et al. 2022)",
        "Induction heads (Olsson et al. 2022)",
        "Greater-than (Hanna et al. 2023)",
        "Successor heads (Gould et al. 2023)",
        "Sparse feature circuit (IOI)",
    ]
    assert found["toy_logits"] == [1, 9, mk.load_model("attn-only-2l").cfg.d_vocab]
    assert found["toy_best_induction_head"].startswith("L1H")  # the toy's induction heads
    assert len(found["saes"]) == 5
    for name, (folder, hook) in found["saes"].items():
        layer = re.search(r"(res|mlp)(\d+)", name).group(2)
        assert folder.startswith(venv) and hook.startswith(f"blocks.{layer}."), name
    clean, patched = found["quickstart"]
    assert clean > 2 and abs(clean - patched) < 1e-4  # as tests/test_readme_and_demo.py checks

    assert "usage: mechkit sweep" in outputs["sweep"] and "YAML" in outputs["sweep"]
    report = json.loads((tmp_path / "induction" / "induction.json").read_text())
    assert report["induction_heads"]
    assert all(h["head"].startswith("L1H") for h in report["induction_heads"])
    assert (tmp_path / "induction" / "index.html").is_file()
