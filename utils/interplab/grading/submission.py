"""Reading a submitted notebook in the grader: safely, without running anything.

`read_submission` opens only regular files, reads at most `MAX_BYTES`, converts
nbformat 3 to 4 and skips malformed cells with a note instead of failing.
`plan` decides which cells the worker executes (see its docstring), where each
exercise is defined, and which exercises borrow the reference answer.
"""

from __future__ import annotations

import ast
import copy
import os
import re
import stat
import symtable
from dataclasses import dataclass, field
from pathlib import Path

from ..exercises import get

MAX_BYTES = 20_000_000  # a chapter notebook with outputs is well under this


class Unreadable(ValueError):
    """A submission that is not a readable notebook; the message says why."""


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def read_bytes(path: Path, limit: int = MAX_BYTES) -> bytes:
    """The file's bytes; refuses anything but a regular file of at most ``limit`` bytes, without blocking."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise Unreadable(f"cannot open {path.name}: {e.strerror}") from e
    if not stat.S_ISREG(st.st_mode):
        raise Unreadable(f"{path.name} is {_kind(st.st_mode)}, not a notebook file; it was not opened")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except OSError as e:
        raise Unreadable(f"cannot open {path.name}: {e.strerror}") from e
    try:
        st = os.fstat(fd)  # what was opened, not what the name pointed to a moment ago
        if not stat.S_ISREG(st.st_mode):
            raise Unreadable(f"{path.name} is {_kind(st.st_mode)}, not a notebook file; it was not read")
        if st.st_size > limit:
            raise Unreadable(
                f"{path.name} is {st.st_size / 1e6:.0f} MB; a notebook over {limit / 1e6:.0f} MB is "
                f"not graded (clear its outputs and submit it again)"
            )
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise Unreadable(f"{path.name} grew past {limit / 1e6:.0f} MB while being read")
        return b"".join(chunks)
    finally:
        os.close(fd)


def _text(src) -> str | None:
    if isinstance(src, str):
        return src
    if isinstance(src, list) and all(isinstance(s, str) for s in src):
        return "".join(src)
    return None


def normalise(nb, name: str = "the notebook") -> tuple[list[dict], list[str]]:
    """(cells as {"cell_type", "source"} with text sources, notes on what was skipped or converted)."""
    notes: list[str] = []
    if not isinstance(nb, dict):
        raise Unreadable(f"{name} is not a Jupyter notebook (its JSON is not an object)")
    raw = nb.get("cells")
    if raw is None and isinstance(nb.get("worksheets"), list):  # nbformat 3
        notes.append(f"converted from nbformat {nb.get('nbformat', 3)}")
        raw = []
        for ws in nb["worksheets"]:
            if isinstance(ws, dict) and isinstance(ws.get("cells"), list):
                for c in ws["cells"]:
                    if isinstance(c, dict) and c.get("cell_type") == "code" and "input" in c:
                        c = {**c, "source": c.get("input")}
                    elif isinstance(c, dict) and c.get("cell_type") == "heading":
                        c = {**c, "cell_type": "markdown"}
                    raw.append(c)
    if not isinstance(raw, list):
        raise Unreadable(f"{name} is not a Jupyter notebook (no list of cells)")
    cells = []
    for i, c in enumerate(raw):
        if not isinstance(c, dict) or not isinstance(c.get("cell_type"), str):
            notes.append(f"cell {i + 1} skipped: it is not a notebook cell")
            continue
        src = _text(c.get("source", ""))
        if src is None:
            notes.append(f"cell {i + 1} skipped: its source is not text")
            continue
        cells.append({"cell_type": c["cell_type"], "source": src, "number": i + 1})
    return cells, notes


def read_submission(path: Path) -> tuple[list[dict], list[str]]:
    """The notebook's cells (see `normalise`) and notes; raises Unreadable with a readable reason."""
    import json

    data = read_bytes(path)
    try:
        nb = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise Unreadable(f"{path.name} is not a text file ({e.reason} at byte {e.start})") from e
    except json.JSONDecodeError as e:
        raise Unreadable(f"{path.name} is not a valid notebook: its JSON is broken at line {e.lineno} ({e.msg})") from e
    except RecursionError as e:
        raise Unreadable(f"{path.name} is not a valid notebook: its JSON is nested too deeply") from e
    return normalise(nb, path.name)


# --- what each cell binds and reads --------------------------------------------------------

_CELL_MAGIC_PYTHON = {"time", "timeit", "capture", "prun", "debug"}
_LINE_MAGIC_PYTHON = re.compile(r"^(\s*)%(time|timeit|prun)\s+(?:-\S+\s+)*(.*)$")


def analysis_source(raw: str) -> str:
    """The Python a cell runs, for analysis: magics that run Python keep it, other magics and shell lines are dropped."""
    lines = raw.splitlines()
    if lines and lines[0].lstrip().startswith("%%"):
        magic = lines[0].lstrip()[2:].split()[0] if lines[0].strip() != "%%" else ""
        return "\n".join(lines[1:]) if magic in _CELL_MAGIC_PYTHON else ""
    out = []
    for line in lines:
        stripped = line.lstrip()
        m = _LINE_MAGIC_PYTHON.match(line)
        if m:
            out.append(m.group(1) + m.group(3))
        elif stripped.startswith(("%", "!")):
            out.append(line[: len(line) - len(stripped)] + "pass")
        elif re.match(r"^\s*[\w., ]+\s*=\s*[!%]", line):  # x = !ls, x = %env
            out.append(re.sub(r"=\s*[!%].*$", "= None", line))
        else:
            out.append(line)
    return "\n".join(out)


@dataclass
class Cell:
    number: int  # 1-based, as a learner counts cells
    raw: str
    source: str  # for analysis
    tree: ast.Module | None = None
    error: str | None = None
    binds: set[str] = field(default_factory=set)
    reads: set[str] = field(default_factory=set)
    star: bool = False


def _symbols(src: str) -> tuple[set[str], set[str]]:
    top = symtable.symtable(src, "<cell>", "exec")
    binds, reads = set(), set()
    for s in top.get_symbols():
        if s.is_assigned() or s.is_imported():
            binds.add(s.get_name())
        if s.is_referenced():
            reads.add(s.get_name())
    stack = list(top.get_children())
    while stack:
        t = stack.pop()
        stack += t.get_children()
        for s in t.get_symbols():
            if s.is_global() and s.is_referenced():
                reads.add(s.get_name())
            if s.is_declared_global() and s.is_assigned():
                binds.add(s.get_name())
            if t.get_type() == "class" and s.is_referenced() and not s.is_assigned():
                reads.add(s.get_name())
    return binds, reads


def parse_cell(number: int, raw: str) -> Cell:
    src = analysis_source(raw)
    cell = Cell(number, raw, src)
    try:
        cell.tree = ast.parse(src)
        cell.binds, cell.reads = _symbols(src)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        line = getattr(e, "lineno", None)
        cell.tree = None
        cell.error = (
            f"syntax error in cell {number}" + (f", line {line}" if line else "") + f": {getattr(e, 'msg', None) or e}"
        )
        return cell
    cell.star = any(isinstance(n, ast.ImportFrom) and any(a.name == "*" for a in n.names) for n in ast.walk(cell.tree))
    return cell


# --- borrowed answers --------------------------------------------------------------------

_REFERENCE_MODULES = ("interplab.solutions", "interplab.exercises", "interplab.grading")
_REFERENCE_ATTRS = {
    "solutions",
    "reference",
    "show_solution",
    "solution_source",
    "expected_outputs",
    "_expected",
    "REGISTRY",
    "exercises",
}
_REFERENCE_FUNCS = {
    "reference",
    "show_solution",
    "solution_source",
    "get",
    "REGISTRY",
    "all_exercises",
    "expected_outputs",
}


def _reference_names(cells: list[Cell], exercises: set[str]) -> tuple[set[str], set[str]]:
    """(names a notebook binds to reference functions or the registry, names bound to answer-key modules)."""
    funcs, modules = set(), set()
    for cell in cells:
        if cell.tree is None:
            continue
        for node in ast.walk(cell.tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(_REFERENCE_MODULES):
                for a in node.names:
                    if node.module == "interplab.solutions":
                        modules.add(a.asname or a.name)
                    elif node.module.startswith("interplab.solutions"):
                        if a.name in exercises:
                            funcs.add(a.asname or a.name)
                    elif a.name in _REFERENCE_FUNCS:
                        funcs.add(a.asname or a.name)
            elif isinstance(node, ast.ImportFrom) and node.module == "interplab":
                for a in node.names:
                    if a.name in ("solutions", "exercises", "grading"):
                        modules.add(a.asname or a.name)
                    elif a.name in ("show_solution", "reference"):
                        funcs.add(a.asname or a.name)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith(_REFERENCE_MODULES) and a.asname:
                        modules.add(a.asname)
    return funcs, modules


def borrowed(node: ast.AST, ref_names: tuple[set[str], set[str]], exercises: set[str]) -> str | None:
    """Why a definition's code calls the reference answer, or None."""
    funcs, modules = ref_names
    for n in ast.walk(node):
        if isinstance(n, ast.Name) and n.id in funcs:
            return f"it uses `{n.id}`, which the notebook imported from the answer key"
        if isinstance(n, ast.Name) and n.id == "show_solution":
            return "it calls show_solution"
        if isinstance(n, ast.Attribute) and n.attr in _REFERENCE_ATTRS:
            return f"it uses `.{n.attr}`"
        if isinstance(n, ast.Attribute) and n.attr in exercises:
            root = n.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and (root.id in modules or root.id == "interplab"):
                return f"it uses `{root.id}.{n.attr}` from the answer key"
        if isinstance(n, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in n.names] if isinstance(n, ast.Import) else [n.module or ""]
            if any(m.startswith(("interplab.solutions", "interplab.exercises")) for m in mods):
                return "it imports the answer key"
        if (
            isinstance(n, ast.Constant)
            and isinstance(n.value, str)
            and "solutions" in n.value
            and ("interplab" in n.value or "." in n.value)
        ):
            return f"it names the answer key ({n.value[:40]!r})"
    return None


def _is_passthrough_check(value: ast.AST, name: str) -> bool:
    """`name = check(name)` (or interplab.check(name, ...)): the notebook's own check, not a borrowed answer."""
    if not isinstance(value, ast.Call) or not value.args:
        return False
    f = value.func
    fname = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
    return fname == "check" and isinstance(value.args[0], ast.Name) and value.args[0].id == name


def _bindings_of(tree: ast.Module, name: str) -> list[ast.AST]:
    """Statements of a cell (outside functions and classes) that bind ``name``."""
    found = []

    def visit(stmts):
        for s in stmts:
            if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if s.name == name:
                    found.append(s)
                continue
            if isinstance(s, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = s.targets if isinstance(s, ast.Assign) else [s.target]
                binds = any(isinstance(t, ast.Name) and t.id == name for tg in targets for t in ast.walk(tg))
                if binds and not (s.value is not None and _is_passthrough_check(s.value, name)):
                    found.append(s)
            elif isinstance(s, (ast.Import, ast.ImportFrom)) and any(
                (a.asname or a.name.split(".")[0]) == name for a in s.names
            ):
                found.append(s)
            for attr in ("body", "orelse", "finalbody", "handlers"):
                inner = getattr(s, attr, None)
                if isinstance(inner, list):
                    visit(
                        [x for x in inner if isinstance(x, ast.stmt)]
                        + [y for x in inner if isinstance(x, ast.ExceptHandler) for y in x.body]
                    )
            if isinstance(s, ast.Match):
                for case in s.cases:
                    visit(case.body)

    visit(tree.body)
    return found


# --- the plan ----------------------------------------------------------------------------------


@dataclass
class Plan:
    cells: list[Cell]
    run: list[int]  # indices into cells, in notebook order
    missing: dict[str, str] = field(default_factory=dict)  # exercise -> why it is not there
    borrowed: dict[str, str] = field(default_factory=dict)  # exercise -> why it counts as borrowed
    defined_in: dict[str, int] = field(default_factory=dict)  # exercise -> cell number of its last binding


def _shape(node: ast.AST) -> str:
    """A function's code without its docstring, annotations and decorators, for spotting a pasted answer."""
    node = copy.deepcopy(node)
    body = node.body
    if (
        body
        and isinstance(body[0], ast.Expr)
        and isinstance(getattr(body[0], "value", None), ast.Constant)
        and isinstance(body[0].value.value, str)
    ):
        body = body[1:]
    for n in ast.walk(node):
        if isinstance(n, ast.arg):
            n.annotation = None
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n.returns = None
            n.decorator_list = []
    return ast.dump(ast.Module(body=body, type_ignores=[])) + ast.dump(node.args)


def reference_shapes(exercises: list[str]) -> dict[str, str]:
    """The code shape of each exercise's reference (what show_solution prints)."""
    import inspect
    import textwrap

    out = {}
    for n in exercises:
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(get(n).reference)))
            out[n] = _shape(tree.body[0])
        except (OSError, TypeError, SyntaxError, IndexError):
            pass
    return out


def plan(cells: list[dict], exercises: list[str], references: dict[str, str] | None = None) -> Plan:
    """Which code cells to execute, in order, so that every exercise is as the notebook leaves it.

    The worker runs the cells that bind an exercise's name and, transitively, every cell
    that binds a name those cells read (imports, constants, helpers, classes, decorators,
    the model...), wherever it is in the notebook; magics run as in Jupyter. Cells whose
    names no exercise needs (plots, sweeps, long evaluations) are not run: they cannot
    change what an exercise function computes except through global state it does not
    name, and running them would make grading a chapter as slow as running it.
    """
    parsed = [parse_cell(c["number"], c["source"]) for c in cells if c["cell_type"] == "code"]
    names = set(exercises)
    binders: dict[str, list[int]] = {}
    for i, c in enumerate(parsed):
        for n in c.binds:
            binders.setdefault(n, []).append(i)
    result = Plan(parsed, [])
    needed: set[int] = {i for i, c in enumerate(parsed) if c.star}
    for ex in exercises:
        where = binders.get(ex, [])
        broken = [
            c
            for c in parsed
            if c.error and re.search(rf"^\s*(async\s+)?def\s+{re.escape(ex)}\s*\(", c.raw, re.MULTILINE)
        ]
        if broken and (not where or broken[-1].number > parsed[where[-1]].number):
            result.missing[ex] = broken[-1].error
            continue
        if not where:
            result.missing[ex] = (
                f"no function called `{ex}` is defined in the notebook (was its cell deleted, or the function renamed?)"
            )
            continue
        needed.update(where)
        result.defined_in[ex] = parsed[where[-1]].number
    todo = list(needed)
    while todo:
        c = parsed[todo.pop()]
        for n in c.reads:
            for j in binders.get(n, []):
                if j not in needed:
                    needed.add(j)
                    todo.append(j)
    result.run = sorted(needed)
    # borrowed answers: the exercise's own binding, and notebook helpers it reads, transitively
    funcs, modules = _reference_names(parsed, names)
    for ex in result.defined_in:
        # another exercise bound to its reference (imported, or as check() leaves a failed one) is allowed
        ref_names = (funcs - (names - {ex}), modules)
        seen, stack, why = set(), [ex], None
        while stack and why is None:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            for j in binders.get(n, []):
                c = parsed[j]
                for node in _bindings_of(c.tree, n):
                    if isinstance(node, (ast.Import, ast.ImportFrom)) and n in ref_names[0]:
                        why = f"cell {c.number} imports `{n}` from the answer key"
                    else:
                        target = node.value if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)) else node
                        why = borrowed(target, ref_names, names)
                        if why:
                            why = f"cell {c.number}: {why}"
                        elif (
                            n == ex
                            and isinstance(node, ast.FunctionDef)
                            and references
                            and references.get(ex) == _shape(node)
                        ):
                            why = f"cell {c.number} holds the reference solution as show_solution prints it"
                    if why:
                        break
                    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign)):
                        try:
                            _, reads = _symbols(ast.unparse(node))
                        except (SyntaxError, ValueError, RecursionError):
                            reads = set()
                        stack += [r for r in reads if r not in names and r in binders]
                if why:
                    break
        if why:
            result.borrowed[ex] = why
    return result
