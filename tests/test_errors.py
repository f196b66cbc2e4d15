"""The error contract: every error mechkit raises is a MechkitError that also inherits a builtin,
typos of choice arguments read "Did you mean ...?", and no error leaves a hook on the model."""

from __future__ import annotations

import ast
import builtins
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest
import torch

import mechkit as mk
from mechkit.corpus import corpus_documents
from mechkit.sae import SAEConfig, SparseDictionary
from mechkit.sae.activations import stdlib_documents
from tests.conftest import hook_count

PACKAGE = Path(mk.__file__).parent
BUILTIN_EXCEPTIONS = {
    name
    for name, value in vars(builtins).items()
    if isinstance(value, type) and issubclass(value, BaseException)
}

# Plain builtin raises that stay, keyed by (file, exception, enclosing function), each with why.
ALLOWED_BUILTIN_RAISES = {
    # abstract methods: subclasses must override them; no user input reaches these lines
    ("interventions.py", "NotImplementedError", "new_value"),
    ("metrics.py", "NotImplementedError", "per_prompt"),
    ("graph/layout.py", "NotImplementedError", "n_rows"),
    ("sae/base.py", "NotImplementedError", "activate"),
    ("sae/base.py", "NotImplementedError", "training_step"),
    # an invariant of mechkit's own cache writer (a bug if it fires), not a user's input
    ("models/weight_cache.py", "RuntimeError", "write_folder_atomically"),
    # raised inside mechkit.reading.reading(), which turns them into a FileFormatError naming the
    # file (tested in tests/test_reading.py and the loaders' damaged-file tests)
    ("reading.py", "TypeError", "read_json"),
    ("reading.py", "ValueError", "read_checkpoint"),
    ("lens/tuned_lens.py", "ValueError", "load"),
    # a file of another kind: turned into a FileFormatError naming the file in the same function
    ("probing/das.py", "KeyError", "load"),
    ("probing/erasure.py", "KeyError", "load"),
    ("probing/probes.py", "KeyError", "load"),
    # the user's own Ctrl-C, raised again once the hook scope has restored the model
    ("hook_scope.py", "KeyboardInterrupt", "keep_hooks"),
    # a module's __getattr__ must raise AttributeError for unknown names (PEP 562): hasattr,
    # getattr with a default and tab completion rely on it
    ("__init__.py", "AttributeError", "__getattr__"),
    # a module __getattr__ (PEP 562, here for the deprecated mk.graph.METHODS) must raise
    # AttributeError for every other name, or hasattr() and imports break
    ("graph/__init__.py", "AttributeError", "__getattr__"),
}


def _raises(path: Path):
    """``(exception name, enclosing function, line)`` of every ``raise Name(...)``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []

    def visit(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = function
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = child.name
            if isinstance(child, ast.Raise) and child.exc is not None:
                exc = child.exc.func if isinstance(child.exc, ast.Call) else child.exc
                if isinstance(exc, ast.Name):
                    found.append((exc.id, name, child.lineno))
            visit(child, name)

    visit(tree, "<module>")
    return found


def _all_raises():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        for exc, function, line in _raises(path):
            yield rel, exc, function, line


def test_no_raise_of_the_bare_mechkit_error():
    bare = [f"{rel}:{line}" for rel, exc, _, line in _all_raises() if exc == "MechkitError"]
    assert bare == [], f"raise the fitting MechkitError subclass instead, at {bare}"


def test_no_raise_of_a_plain_builtin_exception_outside_the_allow_list():
    plain = {
        (rel, exc, function): line
        for rel, exc, function, line in _all_raises()
        if exc in BUILTIN_EXCEPTIONS and exc != "StopIteration"
    }
    unexpected = {key: line for key, line in plain.items() if key not in ALLOWED_BUILTIN_RAISES}
    assert unexpected == {}, "raise a MechkitError subclass that inherits the builtin"
    stale = ALLOWED_BUILTIN_RAISES - set(plain)
    assert stale == set(), "allow-list entries that no longer match a raise"


def test_the_scan_finds_what_it_looks_for(tmp_path):
    """The AST scan itself: it sees raises in methods, nested functions and bare names."""
    path = tmp_path / "sample.py"
    path.write_text(
        "class A:\n"
        "    def f(self):\n"
        "        def g():\n"
        "            raise MechkitError('x')\n"
        "        raise ValueError\n"
        "raise KeyError('k') from None\n",
        encoding="utf-8",
    )
    assert sorted(_raises(path)) == [
        ("KeyError", "<module>", 6),
        ("MechkitError", "g", 4),
        ("ValueError", "f", 5),
    ]


SCRIPTS = (".toy_models.", ".recipes.")  # training scripts, not imported by the package


def _error_classes():
    """Every exception class defined in a mechkit module (and every one mechkit exports)."""
    classes = {v for v in vars(mk).values() if isinstance(v, type) and issubclass(v, Exception)}
    for info in pkgutil.walk_packages([str(PACKAGE)], "mechkit."):
        if info.name.endswith("__main__") or any(p in info.name for p in SCRIPTS):
            continue
        module = importlib.import_module(info.name)
        for _, value in inspect.getmembers(module, inspect.isclass):
            if issubclass(value, BaseException) and value.__module__.startswith("mechkit"):
                classes.add(value)
    return sorted(classes, key=lambda c: c.__qualname__)


def test_every_error_class_is_a_mechkit_error_and_a_builtin_other_than_exception():
    classes = _error_classes()
    assert {"InvalidArgumentError", "SweepConfigError", "SAEFileError"} <= {
        c.__name__ for c in classes
    }
    for cls in classes:
        assert issubclass(cls, mk.MechkitError), cls
        if cls is mk.MechkitError:
            continue
        builtin = [
            b for b in cls.__mro__ if b.__module__ == "builtins" and b not in (Exception, object)
        ]
        assert builtin and builtin[0] is not BaseException, f"{cls} inherits no builtin error"
    for name in mk.__all__:
        value = getattr(mk, name)
        if isinstance(value, type) and issubclass(value, BaseException):
            assert value in classes


# --------------------------------------------------------------- typos of choice arguments


@pytest.fixture(scope="module")
def setup(toy):
    generator = torch.Generator().manual_seed(0)
    segment = torch.randint(1, 500, (3, 6), generator=generator)
    clean = torch.cat([torch.zeros(3, 1, dtype=torch.long), segment, segment], dim=1)
    corrupt = clean.clone()
    corrupt[:, 7:] = torch.randint(1, 500, (3, 6), generator=generator)
    pairs = mk.PromptPairs.from_tokens(clean, corrupt, [7, 7, 7], [11, 11, 11])
    cfg = SAEConfig(architecture="relu", d_in=128, d_sae=32, hook_name="blocks.0.hook_resid_post")
    sae = SparseDictionary.from_config(cfg, seed=0)
    graph = mk.edge_attribution(toy, pairs, method="eap", progress=False)
    vector = mk.SteeringVector(torch.ones(128), layer=1)
    return {"pairs": pairs, "sae": sae, "graph": graph, "vector": vector, "tokens": clean}


def _steer(model, s, **kw):
    with mk.steer(model, s["vector"], **kw):
        model(s["tokens"])


CHOICE_TYPOS = {
    "activation_patch ablation": lambda m, s: mk.activation_patch(m, s["pairs"], ablation="maen"),
    "activation_patch direction": lambda m, s: mk.activation_patch(
        m, s["pairs"], direction="noise"
    ),
    "activation_patch positions": lambda m, s: mk.activation_patch(m, s["pairs"], positions="eech"),
    "attribution_patch ablation": lambda m, s: mk.attribution_patch(m, s["pairs"], ablation="maen"),
    "attribution_patch direction": lambda m, s: mk.attribution_patch(
        m, s["pairs"], direction="noise"
    ),
    "path_patch senders": lambda m, s: mk.path_patch(m, s["pairs"], senders="head"),
    "path_patch direction": lambda m, s: mk.path_patch(m, s["pairs"], direction="noisng"),
    "edge_attribution method": lambda m, s: mk.edge_attribution(m, s["pairs"], method="eap_ig"),
    "edge_attribution ablation": lambda m, s: mk.edge_attribution(m, s["pairs"], ablation="maen"),
    "evaluate_circuit ablation": lambda m, s: mk.evaluate_circuit(
        m, s["graph"].top_edges(3), s["pairs"], ablation="maen"
    ),
    "faithfulness_curve selection": lambda m, s: mk.faithfulness_curve(
        m, s["graph"], s["pairs"], sizes=[2], selection="greedyy"
    ),
    "feature_circuit method": lambda m, s: mk.feature_circuit(
        m, s["sae"], s["pairs"], method="igg"
    ),
    "feature_circuit ablation": lambda m, s: mk.feature_circuit(
        m, s["sae"], s["pairs"], ablation="maen"
    ),
    "evaluate_feature_circuit ablation": lambda m, s: mk.evaluate_feature_circuit(
        m, s["sae"], ["blocks_0_hook_resid_post.err"], s["pairs"], ablation="maen"
    ),
    "attribute_latents direction": lambda m, s: mk.attribute_latents(
        m, s["sae"], s["pairs"], direction="noise"
    ),
    "patch_latents direction": lambda m, s: mk.patch_latents(
        m, s["sae"], s["pairs"], None, None, direction="noise"
    ),
    "patch_latents positions": lambda m, s: mk.patch_latents(
        m, s["sae"], s["pairs"], None, None, positions="eachh"
    ),
    "evaluate_sae exclude": lambda m, s: mk.evaluate_sae(m, s["sae"], s["tokens"], exclude="frist"),
    "collect_features exclude": lambda m, s: mk.sae.collect_features(
        m, s["sae"], s["tokens"], [0], exclude="frist"
    ),
    "Steering positions": lambda m, s: mk.steering.Steering(s["vector"], positions="prompts"),
    "steer positions": lambda m, s: _steer(m, s, positions="promt"),
    "steering_sweep positions": lambda m, s: mk.steering_sweep(
        m,
        {1: s["vector"]},
        layers=[1],
        coefficients=[1.0],
        effect=lambda *a: 0.0,
        cost_tokens=s["tokens"],
        positions="generatd",
        progress=False,
    ),
    "detect_heads kind": lambda m, s: mk.detect_heads(m, "inducton"),
    "answer_positions run": lambda m, s: s["pairs"].answer_positions("clen"),
    "corpus split": lambda m, s: corpus_documents("tset"),
    "stdlib split": lambda m, s: stdlib_documents("tset"),
    "ActivationStore cache_dtype": lambda m, s: mk.sae.ActivationStore(
        m, "blocks.0.hook_resid_post", s["tokens"], cache_dtype="flaot16"
    ),
    "SAEConfig normalize_activations": lambda m, s: SAEConfig(
        architecture="relu", d_in=8, d_sae=8, hook_name="h", normalize_activations="nonee"
    ),
    "TrainConfig b_dec_init": lambda m, s: mk.sae.TrainConfig(b_dec_init="meen"),
    "save_sae weights_dtype": lambda m, s: mk.sae.save_sae(
        s["sae"], "unused", weights_dtype="flaot16"
    ),
    "resolve_dtype": lambda m, s: mk.load_model("attn-only-2l", dtype="flaot32"),
}


@pytest.mark.parametrize("case", list(CHOICE_TYPOS))
def test_a_typo_of_a_choice_is_a_value_error_with_a_suggestion_and_leaves_no_hook(
    toy, setup, case, monkeypatch
):
    def no_forward(*args, **kwargs):
        raise AssertionError("the model ran before the choice was checked")

    monkeypatch.setattr(toy, "forward", no_forward)  # the check comes before any work
    with pytest.raises(ValueError, match="Did you mean") as info:
        CHOICE_TYPOS[case](toy, setup)
    assert isinstance(info.value, mk.MechkitError)
    assert hook_count(toy) == 0


BAD_VALUES = {
    "activation_patch memory_budget": lambda m, s: mk.activation_patch(
        m, s["pairs"], memory_budget="lots", progress=False
    ),
    "path_patch memory_budget": lambda m, s: mk.path_patch(m, s["pairs"], memory_budget="2XB"),
    "patch_latents memory_budget": lambda m, s: mk.patch_latents(
        m, s["sae"], s["pairs"], None, None, memory_budget=-1
    ),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_a_bad_memory_budget_is_a_value_error_before_any_run(toy, setup, case, monkeypatch):
    from mechkit.patching import engine

    def no_run(*args, **kwargs):
        raise AssertionError("the reference run started before memory_budget was checked")

    monkeypatch.setattr(engine, "run_base", no_run)
    with pytest.raises(ValueError, match="memory budget") as info:
        BAD_VALUES[case](toy, setup)
    assert isinstance(info.value, mk.MechkitError)
    assert hook_count(toy) == 0


def test_metric_that_is_not_callable_is_a_type_error(toy, setup):
    pairs = setup["pairs"]
    with pytest.raises(TypeError, match="Expected a metric") as info:
        mk.activation_patch(toy, pairs.clean_tokens, pairs.corrupt_tokens, 3.0, progress=False)
    assert isinstance(info.value, mk.InvalidTypeError)
    assert hook_count(toy) == 0


def test_lookups_of_missing_keys_stay_key_errors(toy, setup):
    with mk.capture(toy, mk.Site("resid_pre", layer=0)) as captured:
        toy(setup["tokens"])
    with pytest.raises(KeyError, match="captured sites") as info:
        captured["blocks.1.hook_resid_pre"]
    assert isinstance(info.value, mk.SiteNotFoundError)
    with pytest.raises(KeyError, match="Did you mean") as info:  # a site name is a lookup
        mk.Site("resid_pree", layer=0)
    assert isinstance(info.value, mk.SiteNotFoundError)
    with pytest.raises(KeyError, match="Did you mean") as info:
        setup["graph"].layout.sender_index("a0.h9x")
    assert isinstance(info.value, mk.SiteNotFoundError)
    assert hook_count(toy) == 0
