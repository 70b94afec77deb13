"""Running a learner's function against an exercise spec, safely.

`run(name, fn)` calls ``fn`` on every case of the exercise and compares each output
with the reference's. Each call gets its own copies of the inputs (so a learner's
in-place edit cannot leak into the reference or the next case), runs under a time
limit, and is checked for edits to its inputs, for weights it changed in a shared
model (restored at once) and for hooks it left behind (removed at once).
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..exercises import Exercise, get
from .compare import compare, describe, matches
from .plain import WrongType, to_plain

PACKAGE_DIR = str(Path(__file__).resolve().parents[1])
MAX_PRINTED = 2000  # characters of a learner's own printing kept per case


class ExerciseTimeout(Exception):
    pass


@dataclass
class CaseResult:
    label: str
    passed: bool
    message: str = ""
    hint: str | None = None
    seconds: float = 0.0
    got: Any = field(default=None, repr=False)  # the plain output of a wrong answer, for choosing a hint


@dataclass
class Report:
    """What `run` found. ``failures`` holds one message per failing case."""

    name: str
    passed: bool
    n_passed: int
    n_total: int
    failures: list[str] = field(default_factory=list)
    hint: str | None = None
    kind: str = "passed"  # passed | wrong | wrong_type | not_implemented | error | timeout | mutation | side_effect
    results: list[CaseResult] = field(default_factory=list)

    def summary(self) -> str:
        if self.passed:
            return f"{self.name}: {self.n_passed}/{self.n_total} checks passed"
        first = next(r for r in self.results if not r.passed)
        lines = [
            f"{self.name}: {self.n_passed}/{self.n_total} checks passed",
            f"First failing case: {first.label}",
            _indent(first.message),
        ]
        if self.hint:
            lines.append(f"Hint: {self.hint}")
        return "\n".join(lines)

    __str__ = summary

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "passed": self.passed,
            "n_passed": self.n_passed,
            "n_total": self.n_total,
            "kind": self.kind,
            "failures": self.failures,
            "hint": self.hint,
        }


def _indent(text: str, pad: str = "  ") -> str:
    return "\n".join(pad + line for line in text.splitlines())


# --- copies of inputs ---------------------------------------------------------------


def kept(x: Any) -> Any:
    """What a cache keeps of an output: tensors detached, containers rebuilt, anything else as it is.

    An output computed with gradients on carries its autograd graph, which holds every activation of
    the forward pass that made it: cached for every case of every known mistake, graphs grew a test
    process by gigabytes (and a learner's kernel with every check)."""
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, tuple) and hasattr(x, "_fields"):  # a named tuple
        return type(x)(*(kept(v) for v in x))
    if isinstance(x, (list, tuple)):
        return type(x)(kept(v) for v in x)
    if isinstance(x, dict):
        return {k: kept(v) for k, v in x.items()}
    return x


def fresh(x: Any) -> Any:
    """A copy of a case argument: tensors cloned, containers copied, modules shared."""
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, torch.nn.Module):
        return x
    if isinstance(x, (list, tuple)):
        return type(x)(fresh(v) for v in x)
    if isinstance(x, dict):
        return {k: fresh(v) for k, v in x.items()}
    try:
        return copy.deepcopy(x)
    except Exception:
        return x


def _changed_inputs(before: Any, after: Any, path: str = "") -> str | None:
    if isinstance(before, torch.Tensor):
        same = after.shape == before.shape and torch.equal(after, before) if isinstance(after, torch.Tensor) else False
        if not same and not (
            before.is_floating_point() and torch.isnan(before).any() and torch.allclose(before, after, equal_nan=True)
        ):
            return path or "an input tensor"
        return None
    if isinstance(before, (list, tuple)):
        if not isinstance(after, (list, tuple)) or len(before) != len(after):
            return path or "an input list"
        for i, (b, a) in enumerate(zip(before, after)):
            msg = _changed_inputs(b, a, f"{path}[{i}]")
            if msg:
                return msg
    if isinstance(before, dict):
        if not isinstance(after, dict) or set(before) != set(after):
            return path or "an input dict"
        for k in before:
            msg = _changed_inputs(before[k], after[k], f"{path}[{k!r}]")
            if msg:
                return msg
    return None


def _mutated_parameter(ex: Exercise, before: tuple, after: tuple) -> str | None:
    """The name of the first argument the call changed in place, if any."""
    import inspect

    try:
        names = list(inspect.signature(ex.reference).parameters)
    except (TypeError, ValueError):
        names = []
    (b_args, b_kwargs), (a_args, a_kwargs) = before, after
    for i, (b, a) in enumerate(zip(b_args, a_args)):
        where = _changed_inputs(b, a)
        if where:
            name = names[i] if i < len(names) else f"argument {i}"
            return name if where.startswith("an input") else name + where
    for k in b_kwargs:
        where = _changed_inputs(b_kwargs[k], a_kwargs.get(k))
        if where:
            return k if where.startswith("an input") else k + where
    return None


# --- guarding shared models ---------------------------------------------------------

_SNAPSHOTS: dict[int, dict[str, torch.Tensor]] = {}


def _models_in(args: Any) -> list[torch.nn.Module]:
    found = []
    if isinstance(args, torch.nn.Module):
        found.append(args)
    elif isinstance(args, (list, tuple)):
        for a in args:
            found += _models_in(a)
    elif isinstance(args, dict):
        for a in args.values():
            found += _models_in(a)
    return found


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    key = id(model)
    if key not in _SNAPSHOTS:
        _SNAPSHOTS[key] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return _SNAPSHOTS[key]


def _leftover_hooks(model: torch.nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in model.modules())


def _restore(model: torch.nn.Module) -> list[str]:
    """Undo a learner's side effects on a shared model; return what had to be undone."""
    problems = []
    if _leftover_hooks(model):
        problems.append(
            "left hooks attached to the model (use model.run_with_hooks or `with model.hooks(...)`, "
            "which remove them when the forward pass ends)"
        )
        if hasattr(model, "reset_hooks"):
            model.reset_hooks(including_permanent=True)
        for m in model.modules():
            m._forward_hooks.clear()
            m._forward_pre_hooks.clear()
            m._backward_hooks.clear()
    snap = _snapshot(model)
    state = model.state_dict()
    changed = [k for k, v in snap.items() if k in state and not torch.equal(state[k], v)]
    if changed:
        problems.append(
            f"changed the model's weights ({', '.join(changed[:3])}{'...' if len(changed) > 3 else ''}); "
            "they have been restored. Never edit parameters in place; work on copies or use hooks"
        )
        with torch.no_grad():
            for k in changed:
                state[k].copy_(snap[k])
    for p in model.parameters():
        p.grad = None
    model.eval()
    return problems


# --- time limit ----------------------------------------------------------------------


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise ExerciseTimeout after ``seconds`` of CPU time (Unix, main thread; elsewhere no limit).

    CPU time, not wall time: on a loaded machine a correct function gets the same budget
    as on an idle one. A function that sleeps is stopped by the grader's wall-clock backstop.
    """
    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable or not seconds:
        yield
        return

    def on_alarm(signum, frame):
        raise ExerciseTimeout()

    old = signal.signal(signal.SIGPROF, on_alarm)
    signal.setitimer(signal.ITIMER_PROF, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, old)


class _BoundedWriter(io.TextIOBase):
    """Swallows a learner's printing beyond a limit, so enormous output cannot flood anything."""

    def __init__(self, limit: int = MAX_PRINTED):
        self.parts: list[str] = []
        self.size = 0
        self.limit = limit

    def write(self, s: str) -> int:
        if self.size < self.limit:
            self.parts.append(s[: self.limit - self.size])
        self.size += len(s)
        return len(s)

    def text(self) -> str:
        out = "".join(self.parts)
        return out + (f"\n... ({self.size - self.limit} more characters not shown)" if self.size > self.limit else "")


def learner_traceback(exc: BaseException) -> str:
    """The exception with only the learner's own frames (not interplab's, not libraries')."""
    frames = traceback.extract_tb(exc.__traceback__)
    own = [
        f
        for f in frames
        if not f.filename.startswith(PACKAGE_DIR)
        and "site-packages" not in f.filename
        and "/lib/python" not in f.filename
    ]
    lines = []
    for f in own[-3:]:
        where = "your code" if f.filename.startswith("<") or "ipykernel" in f.filename else Path(f.filename).name
        lines.append(f"  {where}, line {f.lineno}, in {f.name}")
        if f.line:
            lines.append(f"    {f.line}")
    lines.append(f"{type(exc).__name__}: {exc}")
    return "\n".join(lines)


def call_safely(fn: Callable, args: tuple, kwargs: dict, seconds: float) -> tuple[str, Any, float, str]:
    """Call fn; return (status, result or exception, seconds, captured output).

    status is "ok", "timeout", "not_implemented", "exit" or "error".
    """
    out = _BoundedWriter()
    grad = torch.is_grad_enabled()
    t0 = time.process_time()
    torch.manual_seed(0)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out), time_limit(seconds):
            result = fn(*args, **kwargs)
        status = "ok"
    except ExerciseTimeout as e:
        status, result = "timeout", e
    except NotImplementedError as e:
        status, result = "not_implemented", e
    except (SystemExit, KeyboardInterrupt) as e:
        status, result = "exit", e
    except Exception as e:  # anything the learner's code raises
        status, result = "error", e
    finally:
        torch.set_grad_enabled(grad)
    return status, result, time.process_time() - t0, out.text()


# --- running an exercise -----------------------------------------------------------------


def expected_outputs(ex: Exercise) -> list[Any]:
    """The reference's output on every case (computed once)."""
    if ex._expected is None:
        outs = []
        for case in ex.cases():
            status, result, _, _ = call_safely(case.invoke(ex.reference), fresh(case.args), fresh(case.kwargs), 0)
            if status != "ok":
                raise RuntimeError(f"the reference for {ex.name!r} failed on case {case.label!r}: {result!r}")
            for m in _models_in((case.args, case.kwargs)):
                _restore(m)
            outs.append(kept(result))
        ex._expected = outs
    return ex._expected


def _compare(ex: Exercise, expected: Any, got: Any, case_index: int | None = None) -> str | None:
    """The verdict of case ``case_index``'s judge, or of the exercise's comparison: None when ``got`` is right."""
    case = ex.cases()[case_index] if case_index is not None else None
    if case is not None and case.judge is not None:
        return case.judge(expected, got)
    if ex.compare is not None:
        return ex.compare(expected, got)
    return compare(expected, got, ex.rtol, ex.atol, names=ex.output_names)


def _mistake_output(ex: Exercise, name: str, case_index: int) -> tuple[str, Any]:
    """(status, output) of known mistake ``name`` on case ``case_index`` (computed once, trusted code)."""
    outs = ex._mistake_outputs.setdefault(name, [None] * len(ex.cases()))
    if outs[case_index] is None:
        m = next(m for m in ex.mistakes if m.name == name)
        case = ex.cases()[case_index]
        status, out, _, _ = call_safely(case.invoke(m.fn), fresh(case.args), fresh(case.kwargs), ex.time_limit)
        for model in _models_in((case.args, case.kwargs)):
            _restore(model)
        outs[case_index] = (status, kept(out))
    return outs[case_index]


def _verdict(ex: Exercise, expected: Any, got: Any, case_index: int) -> str | None:
    try:
        return _compare(ex, expected, got, case_index)
    except Exception as e:  # noqa: BLE001 - a comparison meeting an output it did not expect
        return f"could not be compared ({type(e).__name__}: {e})"


def _same_output(ex: Exercise, case_index: int, a: Any, b: Any, verdict_a: str | None, verdict_b: str | None) -> bool:
    """Whether two outputs are the same answer: equal values, or (on a judged case) the same failed property."""
    if ex.cases()[case_index].judge is not None and verdict_a is not None and verdict_a == verdict_b:
        return True
    if ex.compare is not None:
        try:
            return ex.compare(a, b) is None
        except Exception:  # noqa: BLE001
            return False
    return matches(a, b, ex.rtol, ex.atol)


def choose_hint(ex: Exercise, failing: list[tuple[int, Any, str]]) -> str | None:
    """The hint of the known mistake the learner made, or None when no single mistake explains the failures.

    ``failing`` holds (case index, the learner's output, "wrong" or "mutation") of every case answered
    wrongly. A mistake's
    hint is chosen only when the learner's output matches that mistake on every failing case where
    the mistake's own output differs from the reference's (and there is at least one such case):
    matching one tiny case, where different mistakes coincide, is not enough.
    """
    if not failing:
        return None
    expected = expected_outputs(ex)
    for m in ex.mistakes:
        relevant = 0
        explained = True
        for i, got, kind in failing:
            status, out = _mistake_output(ex, m.name, i)
            if status != "ok":
                explained = False
                break
            if kind == "mutation":  # the value may be right: the mistake is in what the call did to its input
                relevant += 1
                if not _same_output(ex, i, out, got, None, None):
                    explained = False
                    break
                continue
            mistake_verdict = _verdict(ex, expected[i], out, i)
            if mistake_verdict is None:
                continue  # the mistake gives the right answer here: this case says nothing about it
            relevant += 1
            if not _same_output(ex, i, out, got, mistake_verdict, _verdict(ex, expected[i], got, i)):
                explained = False
                break
        if explained and relevant:
            return m.hint
    return None


@dataclass
class Observation:
    """What calling a function on one case produced, before any verdict.

    ``status`` is "ok", "timeout", "not_implemented", "exit", "error" or "wrong_type";
    ``value`` is the plain output (see `plain.to_plain`) when the status is "ok".
    In the grader this is all the worker sends back; the verdict is made elsewhere.
    """

    status: str
    value: Any = None
    message: str = ""  # the error, for a function that raised or returned a wrong type
    mutated: str | None = None  # the argument the call changed in place
    side_effects: list[str] = field(default_factory=list)
    printed: str = ""
    seconds: float = 0.0


def observe(ex: Exercise, fn: Callable, case_index: int) -> Observation:
    """Call ``fn`` on case ``case_index`` of ``ex`` with fresh inputs, under the exercise's CPU-time limit."""
    case = ex.cases()[case_index]
    pristine = (fresh(case.args), fresh(case.kwargs))
    args, kwargs = fresh(case.args), fresh(case.kwargs)
    models = _models_in((args, kwargs))
    for m in models:
        _snapshot(m)
        _restore(m)
    status, got, secs, printed = call_safely(case.invoke(fn), args, kwargs, ex.time_limit)
    side_effects = [p for m in models for p in _restore(m)]
    obs = Observation(status, None, "", None, side_effects, printed, secs)
    if status == "ok":
        try:
            obs.value = to_plain(got)
        except WrongType as e:
            obs.status, obs.message = "wrong_type", f"your function {e}"
        obs.mutated = _mutated_parameter(ex, pristine, (args, kwargs))
    elif status == "exit":
        obs.message = f"your function called {type(got).__name__} ({got!r}); functions must return a value, not exit"
    elif status == "error":
        obs.message = "your function raised an exception:\n" + learner_traceback(got)
    return obs


def judge(
    ex: Exercise, case_index: int, obs: Observation, expected: Any | None = None
) -> tuple[CaseResult, str | None]:
    """The verdict on one observation: compares a plain output with the reference's own output."""
    case = ex.cases()[case_index]
    msg, hint, kind = "", None, None
    if obs.status == "timeout":
        msg = (
            f"your function used more than {ex.time_limit:g} s of CPU time on this case and was stopped "
            f"(an endless loop?)"
        )
        kind = "timeout"
    elif obs.status == "not_implemented":
        msg = "NotImplementedError: the function body is still the stub"
        hint = "Replace `raise NotImplementedError` with your implementation."
        kind = "not_implemented"
    elif obs.status in ("exit", "error"):
        msg, kind = obs.message or "your function failed", "error"
    elif obs.status == "wrong_type":
        msg, kind = obs.message or "your function returned a value of the wrong type", "wrong_type"
    elif obs.status != "ok":
        msg, kind = f"unknown outcome {obs.status!r}", "error"
    elif obs.mutated:
        msg = (
            f"your function modified its input `{obs.mutated}` in place. Work on a copy (x = x.clone()) "
            f"or use out-of-place operations (x = x + 1, not x += 1)."
        )
        kind = "mutation"
    elif obs.side_effects:
        msg = "your function " + "; and ".join(obs.side_effects) + "."
        kind = "side_effect"
    else:
        exp = expected_outputs(ex)[case_index] if expected is None else expected
        try:
            diff = _compare(ex, exp, obs.value, case_index)
        except Exception as e:  # noqa: BLE001 - a custom comparison meeting an output it did not expect
            diff = f"your output could not be compared with the expected one ({type(e).__name__}: {e})"
        if diff:
            msg, kind = diff, "wrong"
    if obs.printed and msg:
        msg += "\n(your function printed:)\n" + _indent(obs.printed[:500])
    got = obs.value if kind in ("wrong", "mutation") else None
    return CaseResult(case.label, not msg, msg, hint, obs.seconds, got), kind


def make_report(ex: Exercise, judged: list[tuple[CaseResult, str | None]]) -> Report:
    """A Report from the verdicts on the cases run so far (cases not run are recorded as such)."""
    results: list[CaseResult] = []
    kind, hint = "passed", None
    for r, k in judged:
        results.append(r)
        if not r.passed and kind == "passed":
            kind, hint = k or "wrong", r.hint
    if kind in ("wrong", "mutation"):
        failing = [(i, r.got, k) for i, (r, k) in enumerate(judged) if k in ("wrong", "mutation")]
        hint = choose_hint(ex, failing)
    stopped = next((k for r, k in judged if k in ("timeout", "not_implemented")), None)
    for rest in ex.cases()[len(results) :]:
        why = {"timeout": "timed out", "not_implemented": "is not implemented"}.get(stopped, "stopped the run")
        results.append(CaseResult(rest.label, False, f"not run (an earlier case {why})"))
    n_passed = sum(r.passed for r in results)
    failures = [f"{r.label}: {r.message}" for r in results if not r.passed]
    if kind == "passed" and n_passed != len(results):
        kind = "error"
    return Report(ex.name, n_passed == len(results), n_passed, len(results), failures, hint, kind, results)


def _exercise_of(name: Any, fn: Any = None) -> Exercise:
    if isinstance(name, Exercise):
        return name
    if not isinstance(name, str) or not name:
        raise TypeError(
            f"run() needs the exercise's name as its first argument (a string such as 'per_token_loss'), "
            f"got {describe(name)}. Call it as run('per_token_loss', my_function); "
            f"interplab.grading.exercise_names() lists every exercise."
        )
    return get(name)


def run(name: str | Exercise, fn: Callable, *, stop_on_timeout: bool = True) -> Report:
    """Check ``fn`` against every case of exercise ``name``; never raises for the learner's faults."""
    ex = _exercise_of(name, fn)
    if not callable(fn):
        msg = f"check() needs a function, got {describe(fn)}"
        return Report(
            ex.name, False, 0, len(ex.cases()), [msg], kind="error", results=[CaseResult("(no call)", False, msg)]
        )
    judged = []
    for i in range(len(ex.cases())):
        obs = observe(ex, fn, i)
        # A stub or a loop answers at once: the reference runs only when there is an answer to judge.
        judged.append(judge(ex, i, obs))
        if obs.status in ("timeout", "not_implemented") and stop_on_timeout:
            break
    return make_report(ex, judged)


class ExerciseFailed(AssertionError):
    """Raised by check(..., strict=True) when a function fails its exercise."""


def _strict_default() -> bool:
    return os.environ.get("INTERPLAB_STRICT", "0") not in ("", "0")


def check(fn: Callable, name: str | None = None, strict: bool | None = None) -> Callable:
    """Check a learner's function, print a short report, and return the function to use from now on.

    Returns ``fn`` when it passes; otherwise the reference solution (with a note), so
    the rest of the chapter still runs. With ``strict=True`` (or INTERPLAB_STRICT=1) a
    failure raises ExerciseFailed instead.
    """
    if isinstance(fn, str):
        raise TypeError(
            f"check() takes your function itself, not its name: write check({fn}) "
            f"(or check(my_function, name={fn!r})), not check({fn!r})."
        )
    if not callable(fn):
        raise TypeError(
            f"check() needs the function you wrote, got {describe(fn)}. Define the exercise's function "
            f"in a cell, then call check(that_function), for example "
            f"per_token_loss = check(per_token_loss)."
        )
    if name is not None and not isinstance(name, str):
        raise TypeError(f"check(fn, name=...) takes the exercise's name as a string, got {describe(name)}.")
    ex_name = name or getattr(fn, "__name__", None)
    if not ex_name or ex_name == "<lambda>":
        raise TypeError(
            "check() could not tell which exercise this function is (it has no name of its own, "
            "e.g. a lambda); pass it explicitly: check(fn, name='per_token_loss')."
        )
    ex = get(ex_name)
    report = run(ex, fn)
    strict = _strict_default() if strict is None else strict
    if report.passed:
        print(f"\u2705 {report.summary()}")
        return fn
    print(f"\u274c {report.summary()}", file=sys.stdout)
    if strict:
        raise ExerciseFailed(report.summary())
    print(
        f"\u21aa The rest of this chapter uses the reference solution for `{ex.name}`. "
        f"Fix your function and run this cell again; show_solution('{ex.name}') prints the reference."
    )
    return ex.reference
