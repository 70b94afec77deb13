"""Every exercise check discriminates: the reference passes; blank work and every known mistake fail.

Also: each notebook's exercise cell is exactly the stub `interplab sync-stubs` generates from the
answer key, and notebooks and the registry list the same exercises.
"""

import ast
from pathlib import Path

import pytest

from interplab.exercises import all_exercises, get
from interplab.grading import run
from interplab.grading.notebooks import find_definitions, read_notebook

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


def test_every_exercise_is_checked_in_a_notebook(repo):
    missing = set(EXERCISES) - set(_notebook_definitions(repo))
    assert not missing, f"exercises registered but checked in no chapter notebook: {missing}"


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

    import interplab.bench as B
    import interplab.exercises as E

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


def test_notebook_stubs_are_what_sync_stubs_writes(repo):
    """Every exercise cell is exactly the stub generated from the answer key (`interplab sync-stubs`)."""
    from interplab.stubs import sync

    drift = sync(repo / "chapters", write=False)
    assert not drift, f"exercise cells differ from the answer key: {drift}; run `interplab sync-stubs`"


def test_sync_stubs_rewrites_a_drifted_stub_and_nothing_else(repo, tmp_path):
    import json
    import shutil

    from interplab.stubs import stub_source, sync

    nb_path = tmp_path / "00_orientation.ipynb"
    shutil.copy(repo / "chapters" / "00_orientation.ipynb", nb_path)
    raw = json.loads(nb_path.read_text())
    before = [c["source"] for c in raw["cells"]]
    i = next(i for i, c in enumerate(raw["cells"]) if "def ablate_head(" in "".join(c["source"]))
    raw["cells"][i]["source"] = (
        'def ablate_head(z, head):\n    """old docstring"""\n    return z\n\n\nablate_head = check(ablate_head)\n'
    )
    nb_path.write_text(json.dumps(raw))
    assert sync(tmp_path, write=True) == {"00_orientation.ipynb": ["ablate_head"]}
    after = json.loads(nb_path.read_text())["cells"]
    assert "".join(after[i]["source"]) == stub_source(get("ablate_head").reference)
    assert [c["source"] for j, c in enumerate(after) if j != i] == [s for j, s in enumerate(before) if j != i]
    assert sync(tmp_path, write=False) == {}


def test_the_answer_key_holds_only_exercise_references():
    """Every public function in solutions/ is a registered exercise's reference, named after its chapter."""
    import importlib
    import pkgutil

    import interplab.solutions as answer_key
    from interplab.paths import chapter_of

    by_chapter = {}
    for ex in all_exercises():
        by_chapter.setdefault(ex.chapter, set()).add(ex.name)
    modules = [m.name for m in pkgutil.iter_modules(answer_key.__path__)]
    assert modules and sorted(chapter_of(m) for m in modules) == sorted(by_chapter)
    for name in modules:
        mod = importlib.import_module(f"interplab.solutions.{name}")
        public = {
            n
            for n, v in vars(mod).items()
            if not n.startswith("_") and callable(v) and getattr(v, "__module__", None) == mod.__name__
        }
        assert public == by_chapter[chapter_of(name)], f"{name}: {public ^ by_chapter[chapter_of(name)]}"


def test_only_specs_tests_and_the_grader_import_the_answer_key(repo):
    """Notebooks, benchmarks and library modules import the library, never the answer key."""
    import re

    pattern = re.compile(r"(from|import)\s+interplab\.solutions|from\s+\.+solutions\b")
    offenders = []
    for path in [*(repo / "utils" / "interplab").rglob("*.py"), *(repo / "chapters").glob("*.ipynb")]:
        rel = path.relative_to(repo).as_posix()
        if rel.startswith(("utils/interplab/exercises/", "utils/interplab/grading/")):
            continue
        if pattern.search(path.read_text(encoding="utf-8")):
            offenders.append(rel)
    assert not offenders, f"these import the answer key: {offenders}"


# --- contracts, not code -------------------------------------------------------------------


def returns_lines_that_are_code(fn) -> list[str]:
    """Lines of a docstring's Returns section that read as code of the function's arguments."""
    import inspect
    import re

    doc = inspect.getdoc(fn) or ""
    args = [a for a in inspect.signature(fn).parameters if a not in ("self",)]
    lines, inside = [], False
    for line in doc.splitlines():
        if re.match(r"^(Returns?|Yields?):\s*$", line.strip()) and not line.startswith(" "):
            inside = True
            continue
        if inside and line and not line.startswith(" "):
            inside = re.match(r"^(Returns?|Yields?):", line) is not None
        if inside and line.strip():
            lines.append(line.strip())
    patterns = [re.compile(rf"\b{re.escape(a)}(\[|\.[A-Za-z_]|\(|\s*@)") for a in args]
    patterns += [re.compile(p) for p in (r"\s@\s", r"\btorch\.", r"\bF\.", r"\.T\b", r"\bnn\.")]
    return [line for line in lines if any(p.search(line) for p in patterns)]


def test_the_returns_check_flags_code_and_passes_prose():
    def coded(logits, answer_ids):
        """Doc.

        Returns:
            logits[b, -1, answer_ids[b]] minus the wrong one, as `h @ A.T`.
        """

    def prose(logits, answer_ids):
        """Doc.

        Returns:
            For each prompt, how much more the model's last-position logit favours the answer than
            the wrong token (a float tensor, one value per prompt). Larger means more confident logits.
        """

    assert returns_lines_that_are_code(coded)
    assert not returns_lines_that_are_code(prose)


@pytest.mark.parametrize("name", EXERCISES)
def test_returns_section_is_a_contract_not_code(name):
    ex = get(name)
    code = returns_lines_that_are_code(ex.reference)
    assert not code, f"{name}: the Returns section gives the code instead of the contract: {code}"


# --- the checking machinery: behaviour cases, judges, hints, stubs ---------------------------


def _toy_exercise(cases, mistakes=(), reference=None, **options):
    from interplab.exercises import Exercise, Mistake

    def double(x):
        return x * 2

    ref = reference or double
    return Exercise(
        name=ref.__name__,
        chapter="toy",
        reference=ref,
        make_cases=lambda: cases,
        mistakes=[Mistake(n, f, h) for n, f, h in mistakes],
        **options,
    )


def test_a_stub_is_answered_without_running_the_reference():
    import torch

    from interplab.exercises import Case

    calls = []

    def slow_reference(x):
        calls.append(1)
        return x * 2

    ex = _toy_exercise([Case("a", (torch.ones(3),))], reference=slow_reference)

    def stub(x):
        raise NotImplementedError

    report = run(ex, stub)
    assert report.kind == "not_implemented" and not calls


def test_a_call_wrapper_checks_behaviour_and_a_judge_checks_a_property():
    import torch

    from interplab.exercises import Case, under_no_grad

    def grads(fn, x):
        x = x.clone().requires_grad_(True)
        fn(x).sum().backward()
        return x.grad

    def even(expected, got):
        return None if bool((got % 2 == 0).all()) else "every value must be even"

    cases = [
        Case("value", (torch.arange(4.0),)),
        Case("behaviour: works under no_grad", (torch.arange(3.0),), call=under_no_grad),
        Case("behaviour: gradients reach the input", (torch.ones(3),), call=grads),
        Case("property: even", (torch.tensor([1, 3]),), judge=even),
    ]
    ex = _toy_exercise(cases)
    assert run(ex, lambda x: x + x).passed
    detached = run(ex, lambda x: x.detach() * 2)
    assert not detached.passed and "gradients" in detached.failures[0]
    no_grad_fails = run(ex, lambda x: x * 2 if torch.is_grad_enabled() else None)
    assert not no_grad_fails.passed and "no_grad" in no_grad_fails.failures[0]
    odd = run(ex, lambda x: x * 2 + (x.dtype == torch.long))
    assert odd.failures == ["property: even: every value must be even"]


def test_a_hint_needs_the_mistake_to_explain_every_failing_case_where_it_differs():
    import torch

    from interplab.exercises import Case

    cases = [Case("zero", (torch.zeros(2),)), Case("ones", (torch.ones(2),)), Case("twos", (torch.full((2,), 2.0),))]
    plus_two = ("plus two", lambda x: x + 2, "you added instead of multiplying")
    ex = _toy_exercise(cases, mistakes=[plus_two])
    # x + 2 equals x * 2 on "twos"; on "zero" and "ones" it differs: the learner who wrote it gets the hint
    assert run(ex, lambda x: x + 2).hint == "you added instead of multiplying"
    # right on "zero" and "twos", wrong on "ones" in another way: x + 2 would give 3, this gives 5
    other = run(ex, lambda x: x * 2 + 3 * (x == 1))
    assert not other.passed and other.hint is None
    # a learner matching the mistake on one failing case but not another gets no hint either
    partly = run(ex, lambda x: x + 2 + (x == 0))
    assert not partly.passed and partly.hint is None


def test_failure_messages_name_tuple_items_and_flag_degenerate_outputs():
    import torch

    from interplab.exercises import Case

    def split(x):
        return x[:2], x[2:]

    ex = _toy_exercise([Case("a", (torch.arange(1.0, 6.0),))], reference=split, output_names=("head", "tail"))
    report = run(ex, lambda x: (x[:2], torch.zeros_like(x[2:])))
    assert "`tail`" in report.failures[0] and "every value you returned is 0" in report.failures[0]


def test_the_dtype_policy_accepts_float64_and_other_integer_dtypes_and_rejects_half():
    import torch

    from interplab.grading.compare import compare

    x = torch.randn(4, 5)
    assert compare(x, x.double()) is None
    assert compare(torch.arange(4), torch.arange(4, dtype=torch.int32)) is None
    assert "loses precision" in compare(x, x.half())
    assert "bool mask" in compare(torch.ones(3, dtype=torch.bool), torch.ones(3, dtype=torch.long))
    assert "floating-point" in compare(x, x.long())


def test_cached_outputs_keep_no_autograd_graph():
    """The expected and the known mistakes' outputs are cached for every case: with their autograd graphs
    (every activation of the forward pass) they grew a test process by gigabytes, and a learner's kernel."""
    import torch

    ex = get("head_ablation_effects")
    report = run("head_ablation_effects", ex.mistakes[0].fn)
    assert not report.passed

    def tensors(x):
        if isinstance(x, torch.Tensor):
            yield x
        elif isinstance(x, (list, tuple)):
            for v in x:
                yield from tensors(v)
        elif isinstance(x, dict):
            for v in x.values():
                yield from tensors(v)

    cached = list(tensors(ex._expected)) + list(tensors(list(ex._mistake_outputs.values())))
    assert cached and not any(t.grad_fn is not None or t.requires_grad for t in cached)
