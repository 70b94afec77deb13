"""Grading submitted notebooks into a gradebook.

    interplab grade submissions/ --out grades.csv        # CSV and grades.json
    interplab check chapters/00_orientation.ipynb        # one learner's own notebook

The grader reads each notebook itself (regular files only, bounded size, nbformat 3
converted, malformed cells skipped with a note) and plans which cells to run
(`submission.plan`). A worker in a sandbox (`sandbox`) runs those cells as a kernel
would, then, case by case on request, calls each exercise function and sends back its
plain output (`plain`, `protocol`). The grader builds the cases and the expected
outputs itself and decides every verdict; a worker that dies, hangs, floods or lies
gets a "crashed" or "timeout" row, and a new worker grades the exercises that are left.
Budgets are CPU time; wall-clock limits only stop a process that sleeps.
Every failure is a row with a one-line reason: nothing a submission does stops the run.
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

from ..exercises import all_exercises, get
from . import sandbox
from . import sandbox as sb
from .core import Observation, expected_outputs, judge, make_report
from .plain import ProtocolError, decode
from .protocol import FrameReader
from .sandbox import cpu_seconds
from .submission import Unreadable, parse_cell, plan, read_submission, reference_shapes

STATUSES = (
    "passed",
    "failed",
    "wrong_type",
    "not_implemented",
    "error",
    "timeout",
    "missing",
    "syntax_error",
    "crashed",
    "used_reference",
    "unreadable",
    "no_exercises",
)
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
    """The chapter a notebook belongs to, from its name.

    The full id wins ("04_saes.ipynb", "04_saes_alice.ipynb"); then the slug, so that a notebook
    saved before the chapters were renumbered ("03_saes.ipynb", from a copy of the course where the
    SAE chapter was 03) is still graded as the SAE chapter; then the number alone ("04_anything").
    """
    stem = path.stem.lower()
    chapters = sorted({ex.chapter for ex in all_exercises()})
    for chapter in chapters:
        if stem == chapter or stem.startswith(chapter + "_") or stem.startswith(chapter + "-"):
            return chapter
    m = re.match(r"(\d\d)[_-](.*)", stem)
    if m:
        for chapter in chapters:
            s = chapter.split("_", 1)[1]
            if m.group(2) == s or m.group(2).startswith((s + "_", s + "-")):
                return chapter
    m = re.match(r"(\d\d)", stem)
    if not m:
        return None
    for chapter in chapters:
        if chapter.startswith(m.group(1)):
            return chapter
    return None


def expected_exercises(path: Path, cells: list[dict] | None) -> list[str]:
    """The exercises a submission is graded on: its chapter's, else the registered ones it defines."""
    chapter = chapter_of(path)
    names = [ex.name for ex in all_exercises() if ex.chapter == chapter] if chapter else []
    if not names and cells is not None:
        registered = [ex.name for ex in all_exercises()]
        bound = set()
        for c in cells:
            if c["cell_type"] == "code":
                cell = parse_cell(c["number"], c["source"])
                bound |= cell.binds
                bound |= set(re.findall(r"^\s*def\s+(\w+)\s*\(", c["source"], re.MULTILINE))
        names = [n for n in registered if n in bound]
    return names


def grade_notebook(
    path: str | Path,
    time_limit: float = 30.0,
    label: str | None = None,
    sandbox: str = "auto",
    limits: Limits | None = None,
) -> list[Row]:
    """Grade one submitted notebook; one Row per exercise plus a TOTAL row. Never raises for the submission's faults."""

    path = Path(path)
    sub = label or path.name
    limits = limits or Limits(case_cpu=time_limit)
    mode = sb.resolve(sandbox)
    sb.note_once(mode)
    try:
        cells, notes = read_submission(path)
    except Unreadable as e:
        names = expected_exercises(path, None)
        rows = [Row(sub, n, "unreadable", message=str(e)) for n in names] or [
            Row(sub, "*", "unreadable", message=str(e))
        ]
        return rows + [_total(sub, rows)]
    names = expected_exercises(path, cells)
    if not names:
        rows = [
            Row(
                sub,
                "*",
                "no_exercises",
                message="no function of this notebook is a registered exercise; "
                "is it a chapter notebook (NN_slug.ipynb)?",
            )
        ]
        return rows + [_total(sub, rows, notes)]

    p = plan(cells, names, reference_shapes(names))
    rows: dict[str, Row] = {}
    for n, why in p.missing.items():
        rows[n] = Row(
            sub, n, "syntax_error" if why.startswith("syntax error") else "missing", 0, len(get(n).cases()), message=why
        )
    todo = [n for n in names if n not in rows]
    if todo:
        graded, cell_notes = _grade_exercises(
            path, sub, [p.cells[i] for i in p.run], todo, limits, mode, p.borrowed, p.defined_in
        )
        rows.update(graded)
        notes += cell_notes
    ordered = [rows[n] for n in names]
    return ordered + [_total(sub, ordered, notes)]


STARTUP_SECONDS = 300.0  # importing torch and loading the model on a busy machine (wall clock)
TAIL = 4000  # characters of a worker's stdout/stderr kept


@dataclass
class Limits:
    """What one submission may use. CPU budgets decide; wall-clock limits are only a backstop for sleepers."""

    case_cpu: float = 30.0  # CPU seconds per case
    cell_cpu: float = 120.0  # CPU seconds per executed notebook cell
    wall: float | None = None  # wall-clock backstop per phase (default: 4x its CPU budget + 120 s)
    idle: float = 60.0  # a worker whose processes use no CPU for this long is sleeping or blocked: stopped
    memory: int = 6 << 30  # address space, bytes
    file_size: int = 64 << 20
    tmp_size: int = 256 << 20  # the private folder (bubblewrap mode)
    nproc: int = 64
    nofile: int = 512

    def exercise_cpu(self, n_cases: int) -> float:
        return self.case_cpu * (n_cases + 1) + 10

    def backstop(self, cpu: float) -> float:
        return self.wall if self.wall is not None else 4 * cpu + 120


class _Tail:
    """The last ``limit`` characters a stream produced, read on a thread (memory stays bounded)."""

    def __init__(self, stream, limit: int = TAIL):
        import collections
        import threading

        self.buf: collections.deque = collections.deque()
        self.size, self.limit = 0, limit
        self.thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self.thread.start()

    def _pump(self, stream) -> None:
        try:
            for chunk in iter(lambda: stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536), b""):
                self.buf.append(chunk)
                self.size += len(chunk)
                while self.size - len(self.buf[0]) >= self.limit and len(self.buf) > 1:
                    self.size -= len(self.buf.popleft())
        except (OSError, ValueError):
            pass

    def text(self) -> str:
        return b"".join(self.buf)[-self.limit :].decode(errors="replace")


class _Stopped(Exception):
    """The worker was stopped or broke the protocol; ``kind`` is timeout or crashed."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind, self.message = kind, message


class _Worker:
    """One sandboxed worker process, driven request by request (see `worker`)."""

    def __init__(self, mode: str, limits: Limits, private: Path, copy: Path, exercises: list[str]):
        import queue
        import secrets
        import threading

        self.limits = limits
        self.secrets = secrets
        read_fd, write_fd = os.pipe()
        argv = [sys.executable, "-m", "interplab.grading.worker", "--fd", str(write_fd)]
        cmd, workdir = sandbox.command(mode, argv, private, copy, limits.tmp_size)
        drop = mode == "bwrap" and os.geteuid() == 0
        job = {
            "exercises": exercises,
            "case_cpu": limits.case_cpu,
            "cell_cpu": limits.cell_cpu,
            "nonce": secrets.token_hex(16),
            "drop_uid": sandbox.NOBODY if drop else None,
            "drop_gid": sandbox.NOBODY if drop else None,
        }
        self.nonce = job["nonce"]
        total_cpu = STARTUP_SECONDS + limits.cell_cpu * 50 + limits.exercise_cpu(50) * max(1, len(exercises))
        self.known_children = sandbox.children_now()
        limit = sandbox.limiter(limits.memory, total_cpu, limits.file_size, limits.nproc, limits.nofile)
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=sandbox.environment(workdir),
            cwd=str(private),
            pass_fds=(write_fd,),
            preexec_fn=limit,
        )  # noqa: PLW1509 - it only calls setsid and setrlimit
        os.close(write_fd)
        self.out, self.err = _Tail(self.proc.stdout), _Tail(self.proc.stderr)
        self.frames: queue.Queue = queue.Queue(maxsize=1)  # at most two frames held in memory
        reader = FrameReader(read_fd)

        def pump() -> None:
            try:
                while True:
                    f = reader.read()
                    self.frames.put(("frame", f) if f else ("eof", None))
                    if not f:
                        break
            except Exception as e:  # noqa: BLE001 - ProtocolViolation or a read error
                self.frames.put(("violation", str(e)))
            finally:
                os.close(read_fd)

        threading.Thread(target=pump, daemon=True).start()
        self.proc.stdin.write((json.dumps(job) + "\n").encode())
        self.proc.stdin.flush()
        self.last_cell: int | None = None

    def request(self, op: dict) -> str:
        nonce = self.secrets.token_hex(16)
        try:
            self.proc.stdin.write((json.dumps({**op, "nonce": nonce}) + "\n").encode())
            self.proc.stdin.flush()
        except OSError:
            pass  # the worker is gone; the next read says so
        return nonce

    def receive(self, event: str, nonce: str, cpu_budget: float, what: str, on_progress=None) -> tuple[dict, bytes]:
        """The reply ``event`` to request ``nonce``; raises _Stopped past the budgets or on any other frame."""
        import queue

        start_cpu = cpu_seconds(self.proc.pid) or 0.0
        start_wall = time.monotonic()
        wall = self.limits.backstop(cpu_budget)
        last_cpu, last_busy = start_cpu, start_wall
        while True:
            try:
                kind, payload = self.frames.get(timeout=0.2)
            except queue.Empty:
                kind = payload = None
            if kind is None:
                used = cpu_seconds(self.proc.pid)
                now = time.monotonic()
                if used is not None and used - start_cpu > cpu_budget:
                    raise _Stopped(
                        "timeout",
                        f"{what} used more than {cpu_budget:.0f} s of CPU time and was stopped (an endless loop?)",
                    )
                if used is not None and used - last_cpu > 0.02:
                    last_cpu, last_busy = used, now
                elif used is not None and now - last_busy > self.limits.idle:
                    raise _Stopped(
                        "timeout",
                        f"{what} used no CPU time for {self.limits.idle:.0f} s and was stopped "
                        f"(it was sleeping or waiting for something?)",
                    )
                if time.monotonic() - start_wall > wall:
                    raise _Stopped(
                        "timeout",
                        f"{what} did not finish within {wall:.0f} s of wall-clock time and was "
                        f"stopped (it was sleeping or waiting for something?)",
                    )
                continue
            if kind == "eof":
                code = self.proc.wait(timeout=30) if self._exited() else None
                raise _Stopped(
                    "crashed",
                    f"the Python process running {what} died"
                    + (f" (exit code {code})" if code is not None else "")
                    + f": {_last_line(self.err.text()) or 'no message'}",
                )
            if kind == "violation":
                raise _Stopped(
                    "crashed",
                    f"the worker broke the grading protocol while running {what} ({payload}); "
                    f"nothing it sent was counted",
                )
            record, blob = payload
            if record.get("nonce") != nonce:
                raise _Stopped(
                    "crashed",
                    f"the worker sent a message that answers no request while running {what} "
                    f"(something wrote into the grader's channel); nothing it sent was counted",
                )
            if record.get("event") == "cell" and on_progress is not None:
                on_progress(record)
                continue
            if record.get("event") != event:
                raise _Stopped(
                    "crashed",
                    f"the worker sent {str(record.get('event'))[:40]!r} where {event!r} was "
                    f"due while running {what}; nothing it sent was counted",
                )
            return record, blob

    def _exited(self) -> bool:
        for _ in range(50):
            if self.proc.poll() is not None:
                return True
            time.sleep(0.02)
        return False

    def close(self) -> None:

        try:
            self.proc.stdin.close()  # the worker's cue to exit
        except OSError:
            pass
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass
        sandbox.kill_tree(self.proc.pid, self.known_children)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        for stream in (self.proc.stdout, self.proc.stderr):
            try:
                stream.close()
            except OSError:
                pass


def _case_observation(record: dict, blob: bytes):

    status = record.get("status")
    if status not in ("ok", "timeout", "not_implemented", "exit", "error", "wrong_type"):
        raise ProtocolError(f"unknown case status {str(status)[:40]!r}")

    def text(key: str, limit: int = 4000) -> str:
        v = record.get(key)
        return v[:limit] if isinstance(v, str) else ""

    mutated = record.get("mutated")
    side = record.get("side_effects") or []
    obs = Observation(
        status,
        None,
        text("message"),
        mutated[:200] if isinstance(mutated, str) else None,
        [x[:500] for x in side if isinstance(x, str)][:5] if isinstance(side, list) else [],
        text("printed", 1000),
        float(record["seconds"]) if isinstance(record.get("seconds"), (int, float)) else 0.0,
    )
    if status == "ok":
        obs.value = decode(record.get("value"), blob)
    return obs


def _grade_exercises(
    path: Path,
    sub: str,
    cells: list,
    names: list[str],
    limits: Limits,
    mode: str,
    borrowed: dict[str, str],
    defined_in: dict[str, int],
) -> tuple[dict[str, Row], list[str]]:
    """Run workers until every exercise of ``names`` has a row; returns the rows and notes on cells."""

    rows: dict[str, Row] = {}
    notes: list[str] = []
    skip: dict[int, str] = {}  # cells that hung or killed the worker: the next worker runs without them
    failed: list[str] = []
    expected_ready = False
    for _attempt in range(len(names) + len(cells) + 2):
        pending = [n for n in names if n not in rows]
        if not pending:
            break
        with tempfile.TemporaryDirectory(prefix="interplab-grade-") as tmp:
            private = Path(tmp) / "home"
            private.mkdir()
            copy = Path(tmp) / "submission.ipynb"
            copy.write_text(json.dumps({"cells": [{"cell_type": "code", "source": c.raw} for c in cells]}))
            if os.geteuid() == 0 and mode == "bwrap":
                os.chown(private, 65534, 65534)
            worker = _Worker(mode, limits, private, copy, names)
            current = None
            try:
                if not expected_ready:  # the grader's own expected outputs, while the worker starts up
                    for n in names:
                        expected_outputs(get(n))
                    expected_ready = True
                worker.receive("ready", worker.nonce, STARTUP_SECONDS, "the grader's start-up")
                run_cells = [c for c in cells if c.number not in skip]
                nonce = worker.request(
                    {"op": "cells", "cells": [{"number": c.number, "source": c.raw} for c in run_cells]}
                )
                worker.last_cell = None

                def progress(rec: dict, worker=worker) -> None:
                    worker.last_cell = rec.get("number") if isinstance(rec.get("number"), int) else None

                try:
                    reply, _ = worker.receive(
                        "cells",
                        nonce,
                        limits.cell_cpu * (len(run_cells) + 1) + 30,
                        "the notebook's cells",
                        on_progress=progress,
                    )
                except _Stopped as e:
                    if worker.last_cell is not None and worker.last_cell not in skip:
                        skip[worker.last_cell] = e.message.replace("the notebook's cells", "it")
                        notes.append(f"cell {worker.last_cell} was skipped: {skip[worker.last_cell]}")
                        continue
                    raise
                errors = reply.get("errors") if isinstance(reply.get("errors"), list) else []
                raised = {}
                for err in errors[:20]:
                    if isinstance(err, dict):
                        raised[err.get("cell")] = str(err.get("error"))[:200]
                        notes.append(f"cell {err.get('cell')} {raised[err.get('cell')]}")
                for n in pending:
                    current = n
                    ex = get(n)
                    ex.time_limit = limits.case_cpu  # what the worker was given, for the messages
                    nonce = worker.request({"op": "exercise", "name": n, "fallback": failed})
                    rec, _ = worker.receive("exercise", nonce, 60, f"`{n}`")
                    state = rec.get("state")
                    if state != "ok":
                        why = (
                            f"no function called `{n}` is defined once the notebook has run (was its cell deleted, "
                            f"or the function renamed?)"
                            if state == "missing"
                            else str(rec.get("message", "it is not a function"))[:300]
                        )
                        if defined_in.get(n) in raised:
                            why += f"; cell {defined_in[n]}, where it should be, {raised[defined_in[n]]}"
                        status = "missing" if state == "missing" else "error"
                        if defined_in.get(n) in skip:
                            status = "error"
                            why = f"cell {defined_in[n]}, which defines it, was skipped: {skip[defined_in[n]]}"
                        rows[n] = Row(sub, n, status, 0, len(ex.cases()), message=why)
                        failed.append(n)
                        continue
                    judged, uses_ref = [], bool(rec.get("is_reference"))
                    budget = limits.exercise_cpu(len(ex.cases()))
                    for i in range(len(ex.cases())):
                        nonce = worker.request({"op": "case", "name": n, "i": i})
                        rec, blob = worker.receive("case", nonce, budget, f"`{n}`")
                        if rec.get("name") != n or rec.get("i") != i:
                            raise _Stopped("crashed", f"the worker answered for another case while running `{n}`")
                        try:
                            obs = _case_observation(rec, blob)
                        except (ProtocolError, ValueError, TypeError) as e:
                            raise _Stopped(
                                "crashed",
                                f"the worker sent an output the grader could not read while "
                                f"running `{n}` ({e}); nothing it sent was counted",
                            ) from e
                        uses_ref = uses_ref or rec.get("reference_called") is True
                        judged.append(judge(ex, i, obs))  # the reference runs only when there is an answer to judge
                        if obs.status in ("timeout", "not_implemented"):
                            break
                    rows[n] = _row(
                        sub,
                        n,
                        make_report(ex, judged),
                        borrowed.get(n) or ("it returns the reference function's own result" if uses_ref else None),
                    )
                    if rows[n].status != "passed":
                        failed.append(n)
                    current = None
            except _Stopped as e:
                if current is not None:
                    rows[current] = Row(sub, current, e.kind, 0, len(get(current).cases()), message=e.message)
                    failed.append(current)
                elif not rows:  # never got to an exercise: start-up itself failed
                    for n in pending:
                        rows[n] = Row(
                            sub,
                            n,
                            "crashed" if e.kind == "crashed" else "timeout",
                            0,
                            len(get(n).cases()),
                            message=f"the grader's worker failed before grading: {e.message}",
                        )
            finally:
                worker.close()
    for n in names:
        rows.setdefault(
            n, Row(sub, n, "crashed", message="the grader could not run this exercise (the worker kept dying)")
        )
    return rows, notes


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def _row(sub: str, name: str, report, borrowed: str | None) -> Row:
    status = {
        "passed": "passed",
        "not_implemented": "not_implemented",
        "timeout": "timeout",
        "error": "error",
        "wrong_type": "wrong_type",
    }.get(report.kind, "failed")
    msg = report.summary() if not report.passed else ""
    score = round(report.n_passed / report.n_total, 4) if report.n_total else 0.0
    if borrowed:
        return Row(
            sub,
            name,
            "used_reference",
            0,
            report.n_total,
            0.0,
            f"not counted: the exercise uses the reference answer instead of its own code ({borrowed}); "
            f"its output matched on {report.n_passed}/{report.n_total} cases",
        )
    return Row(sub, name, status, report.n_passed, report.n_total, score, msg)


def _total(sub: str, rows: list[Row], notes: list[str] | None = None) -> Row:
    graded = [r for r in rows if r.exercise != "*"]
    passed = sum(r.status == "passed" for r in graded)
    n = len(graded)
    msg = f"{passed}/{n} exercises passed"
    if notes:
        msg += "; notes: " + "; ".join(notes[:10]) + (f" (+{len(notes) - 10} more)" if len(notes) > 10 else "")
    return Row(
        sub,
        "TOTAL",
        "passed" if n and passed == n else "incomplete",
        passed,
        n,
        round(passed / n, 4) if n else 0.0,
        msg,
    )


class NoNotebooks(ValueError):
    """grade() found nothing to grade."""


def find_notebooks(paths: list[str | Path]) -> list[Path]:
    """The .ipynb entries of ``paths`` (folders are listed, not descended into); raises NoNotebooks if none."""
    files: list[Path] = []
    problems = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("*.ipynb"))
            files += found
            if not found:
                problems.append(f"{p} holds no .ipynb files")
        elif p.exists() or p.is_symlink():
            files.append(p)
        else:
            problems.append(f"{p} does not exist")
    if not files:
        raise NoNotebooks(
            "nothing to grade: " + "; ".join(problems) + ". Pass the folder of submitted notebooks "
            "(each NN_slug.ipynb or NN_anything.ipynb, e.g. 00_alice.ipynb), or the notebooks "
            "themselves: interplab grade submissions/ --out grades.csv"
        )
    return files


def grade(
    paths: list[str | Path],
    out: str | Path | None = None,
    time_limit: float = 30.0,
    progress: bool = True,
    sandbox: str = "auto",
    limits: Limits | None = None,
) -> list[Row]:
    """Grade notebooks (files or folders of .ipynb); write CSV (and JSON beside it) if ``out`` is given.

    ``time_limit`` is CPU seconds per case; ``sandbox`` is "auto" (bubblewrap where it works),
    "bwrap" or "none". Raises NoNotebooks when there is nothing to grade, and nothing else
    for a submission's faults.
    """

    files = find_notebooks(paths)
    mode = sb.resolve(sandbox)
    sb.note_once(mode)
    limits = limits or Limits(case_cpu=time_limit)
    reaper = sb.set_subreaper(True)
    rows: list[Row] = []
    try:
        for f in files:
            if progress:
                print(f"grading {f} ...", file=sys.stderr, flush=True)
            label = str(f) if len({x.name for x in files}) < len(files) else f.name
            try:
                rows += grade_notebook(f, label=label, sandbox=mode, limits=limits)
            except Exception as e:  # noqa: BLE001 - a fault of the grader itself must not lose the class's rows
                rows += [
                    Row(
                        label,
                        "*",
                        "crashed",
                        message=f"the grader failed on this notebook: {type(e).__name__}: {str(e)[:300]}",
                    )
                ]
            if out is not None:
                write(rows, out)  # keep what is done even if grading is interrupted later
    finally:
        if reaper:
            sb.set_subreaper(False)
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
