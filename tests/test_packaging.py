"""What the wheel is made of, checked from the checkout without building it (tests/test_wheel.py
builds and installs it): one version, every package listed, the reproductions installed under a
name of their own and reached by the library only through entry points."""

from __future__ import annotations

import ast
import importlib
import re
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

import mechkit as mk
from mechkit.__main__ import main

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]


def _imported_modules(path: Path) -> set[str]:
    """Absolute module names imported anywhere in ``path`` (also inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_version_has_one_source_that_the_changelog_names():
    assert "version" not in PYPROJECT["project"]  # no second copy to drift
    assert "version" in PYPROJECT["project"]["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "mechkit.version.__version__"
    }
    assert re.fullmatch(r"\d+\.\d+\.\d+", mk.__version__)
    releases = re.findall(r"^## (\S+)", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert releases[0] == "Unreleased"
    assert releases[1] == mk.__version__  # the newest release is the version the code says


def test_every_package_folder_is_listed():
    """The package list is explicit (circuits/ installs under another name), so a new
    subpackage must be added to it: every folder of Python files under mechkit/ is listed."""
    folders = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "mechkit").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    data = {"mechkit.sae.trained", "mechkit.toy_models"}  # data, plus the toy's trainer
    assert folders | data == set(SETUPTOOLS["packages"]) - {"mechkit_circuits"}
    assert SETUPTOOLS["package-dir"] == {"mechkit_circuits": "circuits"}


def test_library_never_imports_the_reproductions():
    reproductions = {"circuits", "mechkit_circuits"}
    offenders = {
        str(path.relative_to(ROOT)): sorted(
            m for m in _imported_modules(path) if m.split(".")[0] in reproductions
        )
        for path in (ROOT / "mechkit").rglob("*.py")
    }
    assert {path: mods for path, mods in offenders.items() if mods} == {}


def test_reproductions_import_each_other_relatively():
    """Absolute imports of ``circuits`` would break when installed as ``mechkit_circuits``."""
    offenders = {
        path.name: sorted(m for m in _imported_modules(path) if m.split(".")[0] == "circuits")
        for path in (ROOT / "circuits").glob("*.py")
    }
    assert {name: mods for name, mods in offenders.items() if mods} == {}


def test_entry_points_name_what_the_reproductions_define():
    points = PYPROJECT["project"]["entry-points"]
    modules = {p.stem for p in (ROOT / "circuits").glob("*.py")} - {"__init__", "demo"}
    assert set(points["mechkit.reproductions"]) == modules  # every paper, by its module's name
    for group in ("mechkit.reproductions", "mechkit.demo_sections"):
        for value in points[group].values():
            module, attr = value.split(":")
            assert module.startswith("mechkit_circuits.")
            obj = getattr(importlib.import_module(module.replace("mechkit_", "", 1)), attr)
            assert callable(obj) or all(isinstance(t, str) and callable(f) for t, f in obj)
    from circuits.demo import SECTIONS

    titles = [title for title, _ in SECTIONS]
    assert titles[0] == "IOI circuit (Wang et al. 2022)" and len(titles) == 5


def _register(monkeypatch, points: dict[str, str]) -> None:
    group = "mechkit.reproductions"
    found = {n: EntryPoint(name=n, value=v, group=group) for n, v in points.items()}
    monkeypatch.setattr("mechkit.__main__._reproductions", lambda: found)


def test_reproduce_runs_the_registered_main_with_the_rest_of_the_line(monkeypatch):
    calls = []
    monkeypatch.setattr("circuits.greater_than.main", lambda argv: calls.append(argv) or 3)
    _register(monkeypatch, {"greater_than": "circuits.greater_than:main"})
    assert main(["reproduce", "greater_than", "--prompts", "2", "--help"]) == 3
    assert calls == [["--prompts", "2", "--help"]]


def test_reproduce_names_a_typo_and_a_missing_registration(monkeypatch, capsys):
    _register(monkeypatch, {"ioi": "circuits.ioi:main", "induction": "circuits.induction:main"})
    assert main(["reproduce", "iio"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mechkit: error: Expected the reproduction to be one of")
    assert "Did you mean 'ioi'?" in err
    _register(monkeypatch, {})
    assert main(["reproduce", "ioi"]) == 2
    assert "none is registered" in capsys.readouterr().err


def _sections_registered(monkeypatch, points: dict[str, str]) -> None:
    group = "mechkit.demo_sections"
    found = [EntryPoint(name=n, value=v, group=group) for n, v in points.items()]
    monkeypatch.setattr("mechkit.demo.entry_points", lambda group: found)


def test_demo_adds_the_registered_sections_and_skips_a_broken_registration(monkeypatch, capsys):
    from circuits.demo import SECTIONS
    from mechkit.demo import registered_sections

    _sections_registered(
        monkeypatch, {"reproductions": "circuits.demo:SECTIONS", "stale": "no_such_pkg.demo:X"}
    )
    assert registered_sections() == SECTIONS
    err = capsys.readouterr().err
    assert "skipped the sections registered as 'no_such_pkg.demo:X'" in err and "pip install" in err


def test_demo_without_reproductions_says_how_to_install_them(monkeypatch, tmp_path):
    import mechkit.demo as demo

    _sections_registered(monkeypatch, {})
    monkeypatch.setattr(demo, "SECTIONS", demo.SECTIONS[:1])  # the model card only
    page = demo.run_demo(tmp_path, "attn-only-2l").read_text()
    assert "<h2>Model</h2>" in page
    assert "The paper reproductions are not installed" in page and "pip install -e ." in page


OLD_TOP_LEVEL = [
    "AttributionComparison",
    "corpus_tokens",
    "Attribution",
    "ResidualDecomposition",
    "CircuitEvaluation",
    "Edge",
    "FaithfulnessCurve",
    "GraphLayout",
    "HeadScores",
    "Captured",
    "LensComparison",
    "LogitLens",
    "TunedLens",
    "TunedLensConfig",
    "compare_lenses",
    "decode_residual",
    "cross_entropy",
    "kl_divergence",
    "logit_diff",
    "normalize",
    "prob_diff",
    "BUILTIN_MODELS",
    "ModelInfo",
    "Processing",
    "PATCHABLE",
    "PatchResult",
    "ActivationStore",
    "FeatureCircuitEvaluation",
    "FeatureReport",
    "SAEConfig",
    "SAEEvaluation",
    "SparseDictionary",
    "SpliceHandle",
    "TrainConfig",
    "collect_features",
    "feature_connections",
    "sae_corpus_tokens",
    "save_sae",
    "COMPONENTS",
    "validate_sites",
    "ABScore",
    "Generations",
    "LogitDifference",
    "Steering",
    "SteeringSweep",
    "TokenProbability",
    "WordShare",
    "ablate_direction",
    "actadd_vector",
    "activations_at",
    "mean_difference_vector",
    "pca_vector",
    "probe_vector",
    "sae_latent_vector",
]


def test_every_old_top_level_name_still_works_with_a_warning_naming_its_home():
    import importlib

    for name in OLD_TOP_LEVEL:
        with pytest.warns(DeprecationWarning, match=rf"mk\.{name} is now mk\.\w+\.{name}"):
            value = getattr(mk, name)
        home = mk._MOVED[name]
        assert value is getattr(importlib.import_module(home), name)
    assert set(OLD_TOP_LEVEL) == set(mk._MOVED)
    with pytest.raises(AttributeError):
        mk.no_such_name  # noqa: B018


def test_top_level_names_are_importable_and_subpackages_are_namespaces():
    for name in mk.__all__:
        assert hasattr(mk, name), name
    assert mk.sae.train_sae is mk.train_sae
    assert mk.graph.CircuitGraph is mk.CircuitGraph
    assert callable(mk.core.resolve_contrast)
