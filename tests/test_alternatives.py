"""Every check accepts right work written differently: the alternatives in tests/alternatives pass.

Every chapter has an alternatives module, every exercise at least two alternatives, and each must
pass its exercise's checks. (That every known mistake and a stub fail is in
tests/test_exercises.py.)
"""

from __future__ import annotations

import importlib.util
from collections import defaultdict
from pathlib import Path

import pytest

from interplab.exercises import all_exercises
from interplab.grading import run
from interplab.paths import MODULE_NAME

HERE = Path(__file__).parent / "alternatives"
MIN_ALTERNATIVES = 2


def _chapter_module_of(stem: str) -> str | None:
    """The chapter module (``chNN_slug``) an alternatives file belongs to: its name or a prefix of it."""
    for ex in all_exercises():
        mod = ex.reference.__module__.rsplit(".", 1)[-1]
        if stem == mod or stem.startswith(mod + "_"):
            return mod
    return None


def _load():
    found: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for path in sorted(HERE.glob("ch*.py")):
        chapter = _chapter_module_of(path.stem)
        if chapter is None:
            raise AssertionError(f"{path.name}: no chapter module of the course matches its name")
        spec = importlib.util.spec_from_file_location(f"alternatives_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for name, fns in module.ALTERNATIVES.items():
            found[chapter][name].extend(fns)
    return found


ALTERNATIVES = _load()
BY_CHAPTER = defaultdict(list)
for _ex in all_exercises():
    BY_CHAPTER[_ex.reference.__module__.rsplit(".", 1)[-1]].append(_ex.name)
PAIRS = [
    pytest.param(name, i, id=f"{name}-{i}-{getattr(fn, '__name__', 'fn')}")
    for chapter in sorted(ALTERNATIVES)
    for name, fns in sorted(ALTERNATIVES[chapter].items())
    for i, fn in enumerate(fns)
]


def test_alternative_modules_are_named_after_chapters():
    assert all(MODULE_NAME.fullmatch(c) for c in ALTERNATIVES)
    for chapter, names in ALTERNATIVES.items():
        unknown = set(names) - set(BY_CHAPTER[chapter])
        assert not unknown, f"alternatives for exercises that {chapter} does not register: {sorted(unknown)}"


def test_every_chapter_has_alternatives():
    missing = sorted(set(BY_CHAPTER) - set(ALTERNATIVES))
    assert not missing, f"chapters with no tests/alternatives/<chapter module>.py: {missing}"


@pytest.mark.parametrize("chapter", sorted(BY_CHAPTER))
def test_every_exercise_of_the_chapter_has_alternatives(chapter):
    short = {n: len(ALTERNATIVES[chapter].get(n, [])) for n in BY_CHAPTER[chapter]}
    short = {n: k for n, k in short.items() if k < MIN_ALTERNATIVES}
    assert not short, f"exercises with fewer than {MIN_ALTERNATIVES} alternative implementations: {short}"


@pytest.mark.parametrize("name,i", PAIRS)
def test_alternative_passes(name, i):
    chapter = next(c for c in ALTERNATIVES if name in ALTERNATIVES[c])
    fn = ALTERNATIVES[chapter][name][i]
    report = run(name, fn)
    assert report.passed, report.summary()
