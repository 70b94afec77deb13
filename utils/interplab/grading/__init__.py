"""Grading: `check` for notebooks, `run` for tools and tests, and the gradebook.

>>> from interplab.grading import run, exercise_names
>>> report = run("per_token_loss", my_function)            # doctest: +SKIP
>>> report.passed, report.n_passed, report.n_total, report.hint   # doctest: +SKIP
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from ..exercises import all_exercises, get
from .core import CaseResult, ExerciseFailed, Report, check, run

__all__ = [
    "CaseResult",
    "ExerciseFailed",
    "Report",
    "check",
    "exercise_names",
    "reference",
    "run",
    "show_solution",
    "solution_source",
    "stats",
]


def exercise_names(chapter: str | None = None) -> list[str]:
    """Every registered exercise (of one chapter, e.g. "00_orientation", if given), in course order."""
    return [ex.name for ex in all_exercises() if chapter is None or ex.chapter == chapter]


def reference(name: str) -> Callable:
    """The reference implementation of exercise ``name``."""
    return get(name).reference


def solution_source(name: str) -> str:
    return inspect.getsource(get(name).reference)


def show_solution(name: str | Callable) -> None:
    """Print the reference solution of an exercise (by name or by your function)."""
    key = name if isinstance(name, str) else name.__name__
    ex = get(key)
    print(f"# reference solution: {ex.reference.__module__}.{ex.name}\n")
    print(solution_source(key))


def stats() -> dict[str, int]:
    """How many exercises, cases and known mistakes the course has."""
    exs = all_exercises()
    return {
        "exercises": len(exs),
        "cases": sum(len(ex.cases()) for ex in exs),
        "known_mistakes": sum(len(ex.mistakes) for ex in exs),
        "chapters": len({ex.chapter for ex in exs}),
    }
