"""Reading chapter notebooks: exercise definitions, solution injection, the set-up cell.

Exercise cells are ordinary code cells that define a function named after a
registered exercise and then call ``check`` on it. Nothing else marks them, so a
learner's renamed or deleted cell is noticed by name, and a notebook from an older
version of the course still grades.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_URL = "https://github.com/interplab/interplab"
"""Where Colab installs the course from. Forks and classes: change it here, then run
`python -m interplab.grading.notebooks --sync` to rewrite every chapter's first cell."""

SETUP_MARKER = "# interplab set-up cell"


def setup_cell_source(repo_url: str = REPO_URL) -> str:
    """The first code cell of every chapter: installs the course on Colab, harmless elsewhere."""
    return f'''{SETUP_MARKER}: on Colab this installs the course (a minute or two); elsewhere it does nothing.
import sys

IN_COLAB = "google.colab" in sys.modules
REPO_URL = "{repo_url}"  # forks and classes: see README, "Using your own fork"
if IN_COLAB:
    import subprocess
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"interplab @ git+{{REPO_URL}}"], check=True)'''


def read_notebook(path: str | Path) -> dict:
    """A notebook as a dict (nbformat 4 JSON); raises ValueError with a readable message if it is not one."""
    path = Path(path)
    try:
        nb = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path.name} is not a text file ({e})") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{path.name} is not a valid notebook: its JSON is broken at line {e.lineno} ({e.msg})") from e
    if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list):
        raise ValueError(f"{path.name} is not a Jupyter notebook (no list of cells)")
    for cell in nb["cells"]:  # nbformat allows a list of lines; nbclient wants one string
        if isinstance(cell, dict) and isinstance(cell.get("source"), list):
            cell["source"] = "".join(cell["source"])
    return nb


def cell_source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else str(src)


def code_cells(nb: dict) -> list[tuple[int, str]]:
    return [(i, cell_source(c)) for i, c in enumerate(nb["cells"]) if c.get("cell_type") == "code"]


def to_python(source: str) -> str:
    """Turn IPython syntax (%magics, !shell) into plain Python."""
    try:
        from IPython.core.inputtransformer2 import TransformerManager

        return TransformerManager().transform_cell(source)
    except Exception:
        return "\n".join(
            "pass  # " + line if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines()
        )


@dataclass
class Definition:
    """Where a notebook defines an exercise function, and the code to recreate it."""

    name: str
    cell: int
    source: str | None  # the function's own source (None if the cell does not parse)
    imports: str  # import statements of the cell and of earlier cells
    error: str | None = None  # a syntax error, if the cell does not parse


_DEF_RE = re.compile(r"^\s*def\s+(\w+)\s*\(", re.MULTILINE)


def find_definitions(nb: dict, names: set[str] | None = None) -> dict[str, Definition]:
    """The last definition of each function in the notebook (of ``names`` only, if given)."""
    found: dict[str, Definition] = {}
    imports: list[str] = []
    for index, raw in code_cells(nb):
        src = to_python(raw)
        try:
            tree = ast.parse(src)
        except SyntaxError as e:
            for name in _DEF_RE.findall(raw):
                if names is None or name in names:
                    found[name] = Definition(
                        name,
                        index,
                        None,
                        "\n".join(imports),
                        f"syntax error in cell {index + 1}, line {e.lineno}: {e.msg}",
                    )
            continue
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                imports.append(ast.get_source_segment(src, node) or ast.unparse(node))
            if isinstance(node, ast.FunctionDef) and (names is None or node.name in names):
                found[node.name] = Definition(
                    node.name, index, ast.get_source_segment(src, node) or ast.unparse(node), "\n".join(imports)
                )
    return found


def function_node(source: str, name: str) -> ast.FunctionDef:
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    raise LookupError(name)


def signature_text(node: ast.FunctionDef) -> str:
    """The signature of a function definition as source text (arguments, annotations, return type)."""
    ret = f" -> {ast.unparse(node.returns)}" if node.returns else ""
    return f"({ast.unparse(node.args)}){ret}"


def _private_helpers(ref) -> list[str]:
    """The _private module-level names of the reference's module (helpers `import *` leaves out)."""
    import sys

    module = sys.modules[ref.__module__]
    return sorted(n for n in vars(module) if n.startswith("_") and not n.startswith("__"))


def inject_solutions(nb: dict) -> dict:
    """A copy of the notebook with every exercise function replaced by its reference solution."""
    import copy
    import inspect
    import textwrap

    from ..exercises import all_exercises  # lazy: the registry imports every chapter's answer key

    refs = {ex.name: ex.reference for ex in all_exercises()}
    nb = copy.deepcopy(nb)
    for cell in nb["cells"]:
        if cell.get("cell_type") != "code":
            continue
        src = cell_source(cell)
        try:
            tree = ast.parse(to_python(src))
        except SyntaxError:
            continue
        defs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in refs]
        if not defs:
            continue
        lines = to_python(src).splitlines()
        for node in sorted(defs, key=lambda n: n.lineno, reverse=True):
            start = (node.decorator_list[0].lineno if node.decorator_list else node.lineno) - 1
            ref = refs[node.name]
            body = textwrap.dedent(inspect.getsource(ref)).rstrip().splitlines()
            header = [f"from {ref.__module__} import *  # injected reference solution"]
            helpers = _private_helpers(ref)
            if helpers:  # `import *` skips the answer key's _private helpers that references call
                header.append(f"from {ref.__module__} import {', '.join(helpers)}")
            lines[start : node.end_lineno] = header + body
        cell["source"] = "\n".join(lines)
    return nb


def strip_outputs(nb: dict) -> dict:
    for cell in nb["cells"]:
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
    return nb


def has_outputs(nb: dict) -> bool:
    return any(c.get("outputs") or c.get("execution_count") for c in nb["cells"] if c.get("cell_type") == "code")


def sync_setup_cells(chapters: Path, repo_url: str = REPO_URL) -> list[Path]:
    """Rewrite the set-up cell of every chapter notebook from `setup_cell_source`."""
    changed = []
    for path in sorted(chapters.glob("*.ipynb")):
        nb = read_notebook(path)
        for cell in nb["cells"]:
            if cell.get("cell_type") == "code" and cell_source(cell).startswith(SETUP_MARKER):
                new = setup_cell_source(repo_url)
                if cell_source(cell) != new:
                    cell["source"] = new.splitlines(keepends=True)
                    changed.append(path)
                break
        if changed and changed[-1] == path:  # an unchanged notebook is left byte for byte as it is
            write_notebook(nb, path)
    return changed


def write_notebook(nb: dict[str, Any], path: Path) -> None:
    Path(path).write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    import argparse

    from ..paths import chapters_dir  # only the command needs it

    p = argparse.ArgumentParser(description="maintain the chapter notebooks")
    p.add_argument("--sync", action="store_true", help="rewrite every chapter's set-up cell from REPO_URL")
    p.add_argument("--repo-url", default=REPO_URL)
    a = p.parse_args(argv)
    if a.sync:
        for path in sync_setup_cells(chapters_dir(), a.repo_url):
            print(f"updated {path}")


if __name__ == "__main__":
    main()
