"""The package's import structure: no cycles among its modules, and its own modules imported at module level.

Both are read from the source (ast), not by importing, so a cycle that Python happens to
tolerate today still fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS = {"interplab": REPO / "utils" / "interplab", "interplab.solutions": REPO / "solutions"}


def _modules() -> dict[str, Path]:
    found = {}
    for prefix, root in ROOTS.items():
        for path in root.rglob("*.py"):
            rel = path.relative_to(root).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            found[".".join([prefix, *parts])] = path
    return found


MODULES = _modules()


def _package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rsplit(".", 1)[0]


def _resolve(node: ast.ImportFrom, name: str, path: Path) -> list[str]:
    """The interplab modules an import-from statement names (module itself, or its submodules if imported)."""
    if node.level:
        base = _package_of(name, path).split(".")
        base = base[: len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    out = []
    for alias in node.names:
        sub = f"{target}.{alias.name}"
        out.append(sub if sub in MODULES else target)
    return [t for t in out if t in MODULES]


def _imports(name: str, path: Path, top_level_only: bool):
    """(line, imported interplab module) pairs of a module's imports (module level only, or function level only)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nested = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            nested.update(id(n) for n in ast.walk(fn) if n is not fn)
    for node in ast.walk(tree):
        if (id(node) in nested) == top_level_only:
            continue
        if isinstance(node, ast.ImportFrom):
            for target in _resolve(node, name, path):
                yield node.lineno, target
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in MODULES:
                    yield node.lineno, alias.name


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        deps = {t for _, t in _imports(name, path, top_level_only=True) if t != name}
        # importing a submodule runs its packages' __init__ first
        graph[name] = {d for d in deps if not name.startswith(d + ".")}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_checker_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_is_read():
    graph = _graph()
    assert len(graph) > 20 and "interplab.weights" in graph["interplab.artifacts"]


def test_no_import_cycles_among_the_package_modules():
    cycles = _cycles(_graph())
    assert not cycles, f"import cycles among interplab's modules: {cycles}"


def test_own_modules_are_imported_at_module_level():
    """A function-level import of an interplab module needs a comment saying why (same or previous line)."""
    bad = []
    for name, path in MODULES.items():
        lines = path.read_text(encoding="utf-8").splitlines()
        for lineno, target in _imports(name, path, top_level_only=False):
            here, before = lines[lineno - 1], lines[lineno - 2] if lineno > 1 else ""
            if "#" not in here and not before.strip().startswith("#"):
                bad.append(f"{path.relative_to(REPO)}:{lineno} imports {target} inside a function")
    assert not bad, "\n".join(sorted(set(bad)))
