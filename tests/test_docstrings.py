"""Every public function and class has a docstring with a runnable example (issue 15).

"Public" means: a name in a mechkit module's ``__all__`` that the module itself defines (a name
re-exported from elsewhere is checked where it is defined). The examples themselves run as
doctests (``--doctest-modules`` on ``mechkit/``); this test makes sure there is one to run.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import mechkit


def _modules() -> list[str]:
    names = [mechkit.__name__]
    for info in pkgutil.walk_packages(mechkit.__path__, prefix="mechkit."):
        if info.name.split(".")[-1] != "__main__":
            names.append(info.name)
    return names


def _public_definitions() -> list[tuple[str, str, object]]:
    found = []
    for module_name in _modules():
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name)
            if not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue  # constants, type aliases, namespaces
            if getattr(obj, "__module__", None) != module_name:
                continue  # re-exported: checked in its own module
            found.append((module_name, name, obj))
    return found


def test_public_definitions_are_found():
    found = {(module, name) for module, name, _ in _public_definitions()}
    # a check that the walk reaches functions, classes and errors in subpackages
    assert ("mechkit.errors", "MechkitError") in found
    assert ("mechkit.core.progress", "progress_bar") in found
    assert len(found) > 100


def test_every_public_function_and_class_has_an_example():
    offenders = [
        f"{module}.{name}"
        for module, name, obj in _public_definitions()
        if ">>>" not in (obj.__doc__ or "")
    ]
    assert not offenders, (
        f"{len(offenders)} public functions/classes have no docstring example (>>>):\n"
        + "\n".join(offenders)
    )
