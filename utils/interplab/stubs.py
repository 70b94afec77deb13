"""Notebook stubs, generated from the answer key so that the two cannot drift.

    interplab sync-stubs            # rewrite every exercise cell of every chapter from the answer key
    interplab sync-stubs --check    # say which cells differ; exit 1 if any (what the tests run)

An exercise cell holds exactly the stub: the reference's signature and docstring, a body
that raises `NotImplementedError`, and the line ``name = check(name)``. Every other cell
of a notebook is left alone.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import sys
import textwrap
from pathlib import Path

from .exercises import all_exercises
from .paths import chapters_dir

STUB_BODY = 'raise NotImplementedError("your code here")'


def stub_source(reference) -> str:
    """The notebook cell of an exercise: the reference's signature and docstring, a stub body, the check line."""
    source = textwrap.dedent(inspect.getsource(reference))
    tree = ast.parse(source)
    node = tree.body[0]
    if not isinstance(node, ast.FunctionDef):
        raise TypeError(f"the reference of {reference.__name__} is not a plain function")
    doc = node.body[0] if node.body and isinstance(node.body[0], ast.Expr) and \
        isinstance(node.body[0].value, ast.Constant) and isinstance(node.body[0].value.value, str) else None
    if doc is None:
        raise ValueError(f"the reference of {reference.__name__} has no docstring: the docstring is the exercise's "
                         f"contract, so write one")
    lines = source.splitlines()
    head = lines[node.lineno - 1 : doc.end_lineno]
    indent = " " * doc.col_offset
    name = reference.__name__
    return "\n".join([*head, f"{indent}{STUB_BODY}", "", "", f"{name} = check({name})"])


def _cell_text(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else str(src)


def _exercise_in_cell(text: str, names: set[str]) -> str | None:
    """The exercise a cell defines and checks, if any."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return None
    defined = [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names]
    checked = {n.args[0].id for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "check"
               and n.args and isinstance(n.args[0], ast.Name)}
    hits = [d for d in defined if d in checked]
    return hits[0] if hits else None


def sync_notebook(path: Path, write: bool = True) -> list[str]:
    """Rewrite the exercise cells of one notebook from the answer key; return the exercises whose cell changed."""
    refs = {ex.name: ex.reference for ex in all_exercises()}
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    changed = []
    for cell in raw["cells"]:
        if cell.get("cell_type") != "code":
            continue
        text = _cell_text(cell)
        name = _exercise_in_cell(text, set(refs))
        if name is None:
            continue
        want = stub_source(refs[name])
        if text != want:
            changed.append(name)
            cell["source"] = want.splitlines(keepends=True)
    if changed and write:
        Path(path).write_text(json.dumps(raw, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return changed


def sync(folder: Path | None = None, write: bool = True) -> dict[str, list[str]]:
    """Sync every chapter notebook; {notebook name: exercises whose cell changed (or would)}."""
    folder = folder or chapters_dir()
    if folder is None:
        raise FileNotFoundError("no chapters/ folder: run this inside a clone of the course")
    return {p.name: c for p in sorted(Path(folder).glob("*.ipynb")) if (c := sync_notebook(p, write))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="interplab sync-stubs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="only report cells that differ (exit 1 if any)")
    p.add_argument("--dir", type=Path, default=None, help="the chapters folder (default: the clone's chapters/)")
    a = p.parse_args(argv)
    result = sync(a.dir, write=not a.check)
    for name, exercises in result.items():
        print(f"{name}: {'differs' if a.check else 'rewrote'} {', '.join(exercises)}")
    if not result:
        print("every exercise stub matches the answer key")
    return 1 if (a.check and result) else 0


if __name__ == "__main__":
    sys.exit(main())
