"""Exercise specs: one module per chapter, one `Exercise` per graded function.

An exercise spec says
- which reference function in `interplab.solutions` defines the exercise,
- how to build its cases (fixed edge cases, seeded random ones, and cases on the
  bundled model where the exercise is about a model),
- how to compare outputs (tolerances, or a custom comparison), and
- which known mistakes to recognise, each a small wrong implementation with the hint
  a learner should see when their output matches it.

Specs register themselves when their chapter module is imported; `get(name)` and
`all_exercises()` import every chapter module first. Chapter modules are found by name
(``chNN_slug.py`` in this package, see `interplab.paths`), so a new chapter needs no list.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import pkgutil
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import tinyworld
from ..models import load_model
from ..paths import MODULE_NAME


@dataclass
class Case:
    """One call of the exercise: positional and keyword arguments, and a label for reports.

    Two optional hooks turn a case into a behaviour or property check:

    - ``call(fn, *args, **kwargs)`` runs instead of ``fn(*args, **kwargs)`` for the learner's
      function, the reference and every known mistake alike. It is trusted code that wraps the
      call to observe behaviour the contract names (run under `torch.no_grad`, return the
      gradients a backward pass leaves on the parameters, call twice with one seed, ...). What it
      returns must be plain: tensors, numbers, strings, bools, None, or containers of those.
    - ``judge(expected, got)`` replaces the exercise's value comparison on this case: None when the
      contract holds, otherwise a message in the contract's words saying which property failed on
      which input. ``expected`` is the reference's output on the same case (through ``call``), so a
      judge can accept any answer the contract allows (another random split, a probe with other
      weights but the same loss).

    Label such cases so the label alone says what is tested ("behaviour: works under no_grad").
    """

    label: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    call: Callable[..., Any] | None = None
    judge: Callable[[Any, Any], str | None] | None = None

    def invoke(self, fn: Callable) -> Callable:
        """The function to call with this case's arguments: ``fn`` itself, or ``fn`` seen through ``call``."""
        if self.call is None:
            return fn
        call = self.call
        return functools.wraps(fn)(lambda *args, **kwargs: call(fn, *args, **kwargs))


def under_no_grad(fn: Callable, *args, **kwargs):
    """A `Case.call` that runs the function with gradients turned off, as a caller in `torch.no_grad()` would."""
    with torch.no_grad():
        return fn(*args, **kwargs)


@dataclass
class Mistake:
    """A known wrong implementation and the hint shown when a learner's output matches it."""

    name: str
    fn: Callable
    hint: str

    @classmethod
    def edit(cls, name: str, reference: Callable, old: str, new: str, hint: str, count: int = 1) -> Mistake:
        """A known mistake declared as a small change of the reference: its source with ``old`` replaced by ``new``.

        The edited function runs in (a copy of) the reference module's globals, so it sees the
        same imports and helpers. ``old`` must occur exactly ``count`` times in the reference's
        source: a reference that changes under the spec fails loudly at registration instead of
        silently testing a mistake that no longer differs from it.

            Mistake.edit("no ReLU", sol.sae_encode, "torch.relu(", "(", "Apply ReLU ...")
        """
        source = textwrap.dedent(inspect.getsource(reference))
        found = source.count(old)
        if found != count:
            raise ValueError(
                f"known mistake {name!r} of {reference.__name__}: expected {old!r} {count} time(s) in the "
                f"reference's source, found it {found} time(s); update the mistake to match the reference"
            )
        namespace = dict(inspect.getmodule(reference).__dict__)
        exec(compile(source.replace(old, new), f"<mistake {name!r} of {reference.__name__}>", "exec"), namespace)
        return cls(name, namespace[reference.__name__], hint)


@dataclass
class Exercise:
    """The spec of one graded function."""

    name: str
    chapter: str
    reference: Callable
    make_cases: Callable[[], list[Case]]
    mistakes: list[Mistake] = field(default_factory=list)
    rtol: float | None = None
    atol: float | None = None
    compare: Callable[[Any, Any], str | None] | None = None
    time_limit: float = 30.0
    output_names: tuple[str, ...] | None = None  # the docstring's names of a tuple output's items, for messages
    _cases: list[Case] | None = field(default=None, repr=False)
    _expected: list[Any] | None = field(default=None, repr=False)
    _mistake_outputs: dict[str, list[Any]] = field(default_factory=dict, repr=False)

    def cases(self) -> list[Case]:
        if self._cases is None:
            self._cases = list(self.make_cases())
            if not self._cases:
                raise RuntimeError(f"exercise {self.name!r} has no cases")
        return self._cases


REGISTRY: dict[str, Exercise] = {}


def register(
    name: str,
    chapter: str,
    reference: Callable,
    cases: Callable[[], list[Case]],
    mistakes: list[Mistake] | None = None,
    **options,
) -> Exercise:
    """Register an exercise (called at import time by the chapter modules)."""
    if name in REGISTRY:
        raise ValueError(f"exercise {name!r} is registered twice")
    if reference.__name__ != name:
        raise ValueError(f"exercise {name!r}: the reference is called {reference.__name__!r}; names must match")
    ex = Exercise(
        name=name, chapter=chapter, reference=reference, make_cases=cases, mistakes=list(mistakes or []), **options
    )
    REGISTRY[name] = ex
    return ex


def chapter_modules() -> list[str]:
    """The chapter spec modules of this package (``chNN_slug``), in course order."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if MODULE_NAME.fullmatch(m.name))


@functools.cache
def load_all() -> None:
    """Import every chapter module so that all exercises are registered."""
    for mod in chapter_modules():
        importlib.import_module(f"{__name__}.{mod}")


def all_exercises() -> list[Exercise]:
    load_all()
    return list(REGISTRY.values())


def get(name: str) -> Exercise:
    """The exercise called ``name``; a KeyError suggests close names when there is none."""
    load_all()
    if name not in REGISTRY:
        close = difflib.get_close_matches(name, list(REGISTRY), n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise KeyError(
            f"No exercise called {name!r}.{hint} check() finds the exercise by the function's name: keep the "
            f"name from the notebook, or pass it explicitly: check(my_function, name='...'). "
            f"All exercises: interplab.grading.exercise_names()."
        )
    return REGISTRY[name]


def gen(seed: int) -> torch.Generator:
    """A seeded CPU random generator for building cases (one per case builder, so cases never depend on order)."""
    return torch.Generator().manual_seed(seed)


def model_tokens(n: int = 6, seed: int = 0, split: str = "test"):
    """Token ids [n, pos] of ``n`` TinyWorld documents (padded, with <bos>), for cases on the bundled model."""
    ids, _ = tinyworld.batch_tokens(tinyworld.generate(n, seed=seed, split=split))
    return ids


@functools.cache
def shared_model():
    """The bundled TinyWorld model on CPU, loaded once for all exercise cases."""
    return load_model("tinyworld", device="cpu")
