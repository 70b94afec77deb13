"""Every exercise check discriminates: the reference passes; blank work and every known mistake fail.

Also: each notebook stub has exactly the reference's signature and docstring and is
still a stub, and notebooks and the registry list the same exercises.
"""

import ast
import inspect
import textwrap
from pathlib import Path

import pytest

from interplab.exercises import all_exercises, get
from interplab.grading import run
from interplab.grading.notebooks import find_definitions, function_node, read_notebook, signature_text

EXERCISES = [ex.name for ex in all_exercises()]
MISTAKES = [(ex.name, m.name) for ex in all_exercises() for m in ex.mistakes]


def _notebook_definitions(repo):
    defs = {}
    for path in sorted((repo / "chapters").glob("*.ipynb")):
        nb = read_notebook(path)
        checked = set()
        for cell in nb["cells"]:
            src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
            if cell["cell_type"] == "code" and "check(" in src:
                tree = ast.parse(src)
                for node in ast.walk(tree):
                    if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "check" and node.args:
                        checked.add(getattr(node.args[0], "id", None))
        for name, d in find_definitions(nb, checked).items():
            defs[name] = (path.name, d)
    return defs


def test_there_are_exercises():
    assert len(EXERCISES) >= 5


@pytest.mark.parametrize("name", EXERCISES)
def test_reference_passes(name):
    report = run(name, get(name).reference)
    assert report.passed, report.summary()
    assert report.n_total >= 3 and report.n_passed == report.n_total


@pytest.mark.parametrize("name", EXERCISES)
def test_blank_work_fails(name):
    def stub(*args, **kwargs):
        raise NotImplementedError

    report = run(name, stub)
    assert not report.passed and report.n_passed == 0 and report.kind == "not_implemented"


@pytest.mark.parametrize("name", EXERCISES)
def test_returning_nothing_fails(name):
    report = run(name, lambda *args, **kwargs: None)
    assert not report.passed and report.n_passed == 0


@pytest.mark.parametrize("name,mistake", MISTAKES)
def test_known_mistake_fails_with_its_own_hint(name, mistake):
    ex = get(name)
    m = next(m for m in ex.mistakes if m.name == mistake)
    report = run(name, m.fn)
    assert not report.passed, f"the known mistake {mistake!r} passes the checks of {name!r}"
    assert report.hint == m.hint, f"expected the hint of {mistake!r}, got {report.hint!r}"


@pytest.mark.parametrize("name", EXERCISES)
def test_notebook_stub_matches_the_reference(repo, name):
    defs = _notebook_definitions(repo)
    assert name in defs, f"exercise {name!r} is registered but no chapter notebook checks it"
    notebook, d = defs[name]
    stub = function_node(d.source, name)
    ref_src = textwrap.dedent(inspect.getsource(get(name).reference))
    ref = function_node(ref_src, name)
    assert signature_text(stub) == signature_text(ref), f"{notebook}: signature of {name} differs from the reference"
    assert ast.get_docstring(stub) == ast.get_docstring(ref), f"{notebook}: docstring of {name} differs"
    body = [n for n in stub.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
    assert len(body) == 1 and isinstance(body[0], ast.Raise) and "NotImplementedError" in ast.unparse(body[0]), \
        f"{notebook}: the shipped {name} must be a stub that raises NotImplementedError"


def test_every_checked_function_in_a_notebook_is_registered(repo):
    unknown = set(_notebook_definitions(repo)) - set(EXERCISES)
    assert not unknown, f"notebooks check functions that are not registered exercises: {unknown}"


def test_a_mistake_declared_as_an_edit_of_the_reference():
    """Mistake.edit builds the wrong function from the reference's source; a stale edit fails loudly."""
    import torch

    from interplab.exercises import Mistake
    from interplab.solutions import ch00_orientation as sol

    m = Mistake.edit("zeroes the wrong axis", sol.ablate_head, "out[:, :, head, :]", "out[:, head, :, :]", "hint")
    z = torch.ones(1, 3, 3, 2)
    assert m.fn.__name__ == "ablate_head" and m.hint == "hint"
    assert torch.equal(sol.ablate_head(z, 1)[0, :, 1], torch.zeros(3, 2))  # the reference: head 1 zeroed
    assert torch.equal(m.fn(z, 1)[0, 1], torch.zeros(3, 2))  # the edit: position 1 zeroed instead
    assert not torch.equal(m.fn(z, 1), sol.ablate_head(z, 1))
    with pytest.raises(ValueError, match="found it 0 time"):
        Mistake.edit("gone", sol.ablate_head, "this text is not in the reference", "x", "hint")


def test_a_new_chapter_module_is_discovered_without_a_registry_edit(tmp_path, monkeypatch):
    """Drop a throwaway chNN_slug spec module into the package: load_all finds it by its name."""
    import importlib
    import sys

    import interplab.exercises as E

    import interplab.bench as B

    path = Path(E.__file__).parent / "ch99_throwaway.py"
    bench_path = Path(B.__file__).parent / "ch99_throwaway.py"
    bench_path.write_text("QUICK = {}\nFULL = {}\n\ndef run():\n    return {}\n\ndef rows(result):\n    return []\n")
    path.write_text(
        "from ..paths import chapter_of\n"
        "from . import Case, register\n\n"
        "def throwaway_square(x):\n    return x * x\n\n"
        "register('throwaway_square', chapter_of(__name__), throwaway_square, lambda: [Case('2', (2,))])\n"
    )
    try:
        E.load_all.cache_clear()
        assert "ch99_throwaway" in E.chapter_modules()
        E.load_all()
        assert E.get("throwaway_square").chapter == "99_throwaway"
        assert run("throwaway_square", lambda x: x * x).passed
        assert "throwaway" in B.section_names()  # its benchmark section is found the same way
    finally:
        path.unlink()
        bench_path.unlink()
        E.REGISTRY.pop("throwaway_square", None)
        sys.modules.pop("interplab.exercises.ch99_throwaway", None)
        E.load_all.cache_clear()
        importlib.invalidate_caches()
