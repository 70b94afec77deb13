"""Where things are: the course checkout, its chapters, and the chapter naming convention.

A chapter has one id, ``NN_slug`` (``04_saes``): its notebook is ``chapters/NN_slug.ipynb``, its
answer key ``interplab.solutions.chNN_slug``, its exercise specs ``interplab.exercises.chNN_slug``,
its benchmark section ``interplab.bench.chNN_slug`` and its tests ``tests/test_chNN_slug.py``.
Nothing lists the chapters by hand: they are found by these names.
"""

from __future__ import annotations

import re
from pathlib import Path

CHAPTER_ID = re.compile(r"(\d\d)_([a-z0-9]+(?:_[a-z0-9]+)*)")
MODULE_NAME = re.compile(r"ch(\d\d_[a-z0-9_]+)")


def repo_root() -> Path | None:
    """The course checkout this package runs from (None for a non-editable install)."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "chapters").is_dir() and (parent / "pyproject.toml").is_file():
            return parent
    return None


def chapters_dir() -> Path | None:
    """The chapters/ folder of the checkout, or of the current folder; None if there is none."""
    root = repo_root()
    if root is not None:
        return root / "chapters"
    cwd = Path.cwd() / "chapters"
    return cwd if cwd.is_dir() else None


def module_name(chapter: str) -> str:
    """The module name of a chapter id: ``04_saes`` -> ``ch04_saes``."""
    if not CHAPTER_ID.fullmatch(chapter):
        raise ValueError(
            f"{chapter!r} is not a chapter id: chapter ids look like '04_saes' (two digits, an "
            f"underscore, a lower-case slug)"
        )
    return f"ch{chapter}"


def chapter_of(module: str) -> str:
    """The chapter id of a chapter module (full dotted name or last part): ``...ch04_saes`` -> ``04_saes``."""
    last = module.rsplit(".", 1)[-1]
    m = MODULE_NAME.fullmatch(last)
    if not m:
        raise ValueError(f"{module!r} is not a chapter module: chapter modules are named chNN_slug, e.g. ch04_saes")
    return m.group(1)


def slug(chapter: str) -> str:
    """The chapter's name without its number: ``04_saes`` -> ``saes``."""
    return chapter.split("_", 1)[1]
