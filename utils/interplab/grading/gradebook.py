"""Grading submitted notebooks into a gradebook.

    interplab grade submissions/ --out grades.csv        # CSV and grades.json
    interplab check chapters/00_orientation.ipynb        # one learner's own notebook

Each submission is graded in a fresh subprocess (`interplab.grading.worker`) that
defines the notebook's functions - only the definitions, nothing else the notebook
runs - and checks each exercise with a per-case time limit. The worker writes one
result per exercise as it goes; if it dies (a crash, ``os._exit``, an endless loop
in C code), the exercise it was on is recorded as crashed or timed out and a new
worker grades the rest. The grader itself never stops on a bad submission.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..exercises import all_exercises
from .notebooks import find_definitions, read_notebook

STATUSES = ("passed", "failed", "not_implemented", "error", "timeout", "missing", "syntax_error", "crashed",
            "unreadable", "no_exercises")
FIELDS = ["submission", "exercise", "status", "n_passed", "n_total", "score", "message"]


@dataclass
class Row:
    submission: str
    exercise: str
    status: str
    n_passed: int = 0
    n_total: int = 0
    score: float = 0.0
    message: str = ""


def chapter_of(path: Path) -> str | None:
    """The chapter a notebook belongs to, from its name ("00_orientation.ipynb" or "00_anything")."""
    m = re.match(r"(\d\d)", path.name)
    if not m:
        return None
    for ex in all_exercises():
        if ex.chapter.startswith(m.group(1)):
            return ex.chapter
    return None


def expected_exercises(path: Path, nb: dict | None) -> list[str]:
    """The exercises a submission is graded on: its chapter's, else those it defines."""
    chapter = chapter_of(path)
    names = [ex.name for ex in all_exercises() if ex.chapter == chapter] if chapter else []
    if not names and nb is not None:
        registered = [ex.name for ex in all_exercises()]
        defined = find_definitions(nb, set(registered))
        names = [n for n in registered if n in defined]
    return names


STARTUP_SECONDS = 300.0  # importing torch and loading the model on a busy machine


def _exercise_budget(name: str, time_limit: float) -> float:
    """Seconds one exercise may take in the worker before it is declared stuck."""
    from ..exercises import get

    return 60 + 2 * time_limit * len(get(name).cases())


def grade_notebook(path: str | Path, time_limit: float = 30.0, label: str | None = None) -> list[Row]:
    """Grade one submitted notebook; one Row per exercise plus a TOTAL row. Never raises for the submission's faults."""
    path = Path(path)
    sub = label or path.name
    try:
        nb = read_notebook(path)
    except (OSError, ValueError) as e:
        names = expected_exercises(path, None)
        rows = [Row(sub, n, "unreadable", message=str(e)) for n in names] or [Row(sub, "*", "unreadable", message=str(e))]
        return rows + [_total(sub, rows)]
    names = expected_exercises(path, nb)
    if not names:
        rows = [Row(sub, "*", "no_exercises", message="no function of this notebook is a registered exercise; "
                    "is it a chapter notebook (NN_slug.ipynb)?")]
        return rows + [_total(sub, rows)]
    results: dict[str, Row] = {}
    pending = list(names)
    attempts = 0
    while pending and attempts < len(names) + 1:
        attempts += 1
        for row in _run_worker(path, sub, pending, time_limit):
            results[row.exercise] = row
        pending = [n for n in names if n not in results]
    for n in pending:
        results[n] = Row(sub, n, "crashed", message="the grader could not run this exercise (the worker kept dying)")
    rows = [results[n] for n in names]
    return rows + [_total(sub, rows)]


def _read_events(path: Path) -> list[dict]:
    events = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return events


def _run_worker(path: Path, sub: str, names: list[str], time_limit: float) -> list[Row]:
    """Run one worker over ``names``; stop it if one exercise runs past its budget."""
    with tempfile.TemporaryDirectory(prefix="interplab-grade-") as tmp:
        out = Path(tmp) / "results.jsonl"
        err_path = Path(tmp) / "stderr.txt"
        job = {"notebook": str(path.resolve()), "exercises": names, "time_limit": time_limit, "results": str(out)}
        env = {**os.environ, "INTERPLAB_STRICT": "0", "MPLBACKEND": "Agg"}
        with open(err_path, "w") as err:
            proc = subprocess.Popen([sys.executable, "-m", "interplab.grading.worker"], stdin=subprocess.PIPE,
                                    stdout=subprocess.DEVNULL, stderr=err, text=True, env=env, cwd=tmp)
            proc.stdin.write(json.dumps(job))
            proc.stdin.close()
            n_events, since, budget = 0, time.time(), STARTUP_SECONDS
            killed = False
            while proc.poll() is None:
                time.sleep(0.2)
                events = _read_events(out)
                if len(events) != n_events:
                    n_events, since = len(events), time.time()
                    last = events[-1]
                    budget = _exercise_budget(last["started"], time_limit) if "started" in last else STARTUP_SECONDS
                if time.time() - since > budget:
                    proc.kill()
                    proc.wait()
                    killed = True
            code = None if killed else proc.returncode
        stderr = err_path.read_text(errors="replace")[-2000:]
        rows, started = [], None
        for rec in _read_events(out):
            if "started" in rec:
                started = rec["started"]
            elif rec.get("exercise"):
                rows.append(Row(submission=sub, **{k: rec[k] for k in FIELDS if k in rec and k != "submission"}))
                started = None
        if started:
            if code is None:
                rows.append(Row(sub, started, "timeout",
                                message=f"grading stopped after {time.time() - since:.0f} s: the function never returned "
                                        f"(an endless loop the per-case time limit could not interrupt?)"))
            else:
                rows.append(Row(sub, started, "crashed",
                                message=f"the Python process running this exercise died (exit code {code}): "
                                        f"{_last_line(stderr) or 'no message'}"))
        elif not rows:
            why = "it was stopped after starting up for too long" if code is None else _last_line(stderr)
            rows += [Row(sub, n, "crashed", message=f"the grader's worker failed before grading: {why}") for n in names]
        return rows


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def _total(sub: str, rows: list[Row]) -> Row:
    graded = [r for r in rows if r.exercise != "*"]
    passed = sum(r.status == "passed" for r in graded)
    n = len(graded)
    return Row(sub, "TOTAL", "passed" if n and passed == n else "incomplete", passed, n,
               round(passed / n, 4) if n else 0.0, f"{passed}/{n} exercises passed")


def grade(paths: list[str | Path], out: str | Path | None = None, time_limit: float = 30.0,
          progress: bool = True) -> list[Row]:
    """Grade notebooks (files or folders of .ipynb); write CSV (and JSON beside it) if ``out`` is given."""
    files: list[Path] = []
    for p in map(Path, paths):
        files += sorted(p.glob("*.ipynb")) if p.is_dir() else [p]
    rows: list[Row] = []
    for f in files:
        if progress:
            print(f"grading {f} ...", file=sys.stderr, flush=True)
        label = str(f) if len({x.name for x in files}) < len(files) else f.name
        rows += grade_notebook(f, time_limit=time_limit, label=label)
        if out is not None:
            write(rows, out)  # keep what is done even if grading is interrupted later
    if out is not None:
        write(rows, out)
    return rows


def write(rows: list[Row], out: str | Path) -> tuple[Path, Path]:
    out = Path(out)
    csv_path = out if out.suffix == ".csv" else out.with_suffix(".csv")
    json_path = csv_path.with_suffix(".json")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow(asdict(r))
    json_path.write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")
    return csv_path, json_path


def format_rows(rows: list[Row]) -> str:
    lines = []
    for r in rows:
        mark = {"passed": "PASS"}.get(r.status, r.status.upper())
        score = f"{r.n_passed}/{r.n_total}" if r.n_total else ""
        msg = r.message.splitlines()[0][:100] if r.message else ""
        lines.append(f"{r.submission:<28} {r.exercise:<24} {mark:<15} {score:<7} {msg}")
    return "\n".join(lines)
