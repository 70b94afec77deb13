"""`interplab bench`: the course's speed and quality figures, measured side by side in one run.

    interplab bench --quick            # within 5 minutes on 2 CPU cores
    interplab bench                    # the full report (within 20 minutes on 2 CPU cores)
    interplab bench --only saes,lenses # some sections (each chapter's slug)
    interplab bench --busy             # the same with the other core kept busy (BENCHMARKS_BUSY.md)

Every section measures the reference implementation and, where there is one, a peer
library on the same data in the same process, and reports the ratio:

    probes       torch probes (fit_probe, L-BFGS) vs scikit-learn LogisticRegression, 1 thread each: time, accuracy
    lenses       tuned-lens training time; per-layer KL to the model's output, tuned lens vs logit lens
    saes         interplab's TopK SAE trainer vs SAELens's SAETrainer: tokens/s, explained variance,
                 L0, loss recovered
    transcoders  the replacement model (every MLP replaced by its shipped transcoder): loss recovered
    patching     the reference sweeps vs TransformerLens's `patching` module (time, max difference);
                 attribution patching vs the full head x position sweep (time ratio, correlation)
    notebooks    each chapter's execution time and the kernel's peak memory

The table goes to the terminal and to BENCHMARKS.md, the raw figures to benchmarks.json
(in the current folder unless --out says otherwise). The ratio column is always
interplab / peer; each row's note says which direction is better. No figure here is
asserted by a test: machines are noisy, and a benchmark that prints is more honest than
a timed test that flakes.

Quick mode trains shorter (probes: 400 documents instead of 600; tuned lens: 2 threads and
250 evaluation documents instead of 1 and 500; SAE: 100 steps on activations of 1,500
documents instead of 600 on 12,000; transcoders: 40 evaluation documents instead of 100; patching: best of 1
run instead of 3) and executes every chapter as shipped, as full mode does (each takes well
under a minute on 2 idle cores). If a quick run is limited to some chapters (QUICK_CHAPTERS),
the other chapters' rows are carried over from the last full run's benchmarks.json in the
output folder, marked so.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import pkgutil
import platform
import re
import sys
import time
from pathlib import Path

from .. import threads
from ..paths import chapters_dir
from .table import COLUMNS, row

# Sections are found by name: every module `interplab/bench/chNN_<slug>.py` is the section `<slug>` of
# chapter NN_<slug>, with `run(**kwargs) -> dict`, `rows(result) -> list[dict]` and the keyword arguments
# of run() in quick and full mode (QUICK, FULL). "notebooks" (every chapter's execution) is built in.
NOTEBOOKS = "notebooks"


def section_modules() -> dict[str, str]:
    """{section name: module name}, in course order, found by naming convention."""
    found = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        m = re.fullmatch(r"ch\d\d_(\w+)", info.name)
        if m:
            found[m.group(1)] = f"{__name__}.{info.name}"
    return found


def section_names() -> list[str]:
    return [*section_modules(), NOTEBOOKS]


QUICK_CHAPTERS = ("00_orientation",)


# =====================================================================================
# Notebooks
# =====================================================================================


def _run_notebook_subprocess(path: Path, inject: bool) -> dict:
    """Execute one notebook in a fresh process; return seconds and the kernel's peak memory."""
    import subprocess
    import tempfile

    code = (
        "import sys, time, resource, nbformat\n"
        "from nbclient import NotebookClient\n"
        "from interplab.grading.notebooks import inject_solutions, read_notebook\n"
        f"path = {str(path)!r}\n"
        f"nb = nbformat.from_dict(inject_solutions(read_notebook(path))) if {inject!r} else nbformat.read(path, as_version=4)\n"
        "t = time.perf_counter()\n"
        "NotebookClient(nb, timeout=900, kernel_name='python3', resources={'metadata': {'path': sys.argv[1]}}).execute()\n"
        "secs = time.perf_counter() - t\n"
        "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
        "print(f'{secs} {peak}')\n"
    )
    env = {**os.environ, "INTERPLAB_STRICT": "1" if inject else "0", "MPLBACKEND": "Agg"}
    with tempfile.TemporaryDirectory() as tmp:  # files a chapter writes land here, not in the clone
        proc = subprocess.run([sys.executable, "-c", code, tmp], capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:300]}
    secs, peak = proc.stdout.strip().splitlines()[-1].split()
    peak_mb = float(peak) / 1024 if sys.platform != "darwin" else float(peak) / 1e6
    return {"seconds": round(float(secs), 1), "peak_mb": round(peak_mb)}


def bench_notebooks(quick: bool = False, chapters: list[str] | None = None, inject: bool = False) -> dict:
    """Each chapter's execution time and the kernel's peak memory (RSS), as shipped.

    As shipped, every exercise stub fails its check and the chapter continues with the
    reference solution: the same computation a learner's finished notebook runs, plus the
    checks. With ``inject=True`` the reference solutions are also pasted in and run strictly.

    Args:
        quick: only the chapters in QUICK_CHAPTERS.
        chapters: notebook stems to run (default: all, or QUICK_CHAPTERS when quick).
        inject: also run each chapter with the solutions injected.
    """
    folder = chapters_dir()
    if folder is None:
        return {"error": "no chapters/ folder (run from a clone of the course)"}
    paths = sorted(folder.glob("*.ipynb"))
    wanted = chapters or (list(QUICK_CHAPTERS) if quick else None)
    out: dict = {"all_chapters": [p.stem for p in paths]}
    for path in paths:
        if wanted is not None and path.stem not in wanted:
            continue
        row = {"as_shipped": _run_notebook_subprocess(path, inject=False)}
        if inject:
            row["solutions_injected"] = _run_notebook_subprocess(path, inject=True)
        out[path.stem] = row
        print(f"  {path.stem}: {row}", flush=True)
    return out


# =====================================================================================
# Running the sections
# =====================================================================================


def _section(name: str):
    """The section's module (None for the built-in notebooks section or a module that fails to import)."""
    if name == NOTEBOOKS:
        return None
    try:
        return importlib.import_module(section_modules()[name])
    except ImportError:
        return None


def machine() -> dict:
    import torch

    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "threads": threads.settings(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "processor": platform.processor() or None,
    }
    try:
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):  # pragma: no cover - Windows
        pass
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
        info["processor"] = model or info["processor"]
    except OSError:
        pass
    return info


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (notebook kernels), user + system."""
    try:
        import resource

        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
    except ImportError:  # pragma: no cover - Windows
        return time.process_time()


def run(sections: list[str], quick: bool, overrides: dict[str, dict] | None = None) -> dict:
    """Run the sections one after the other in this process; a failing section records its error."""
    report = {
        "machine": machine(),
        "mode": "quick" if quick else "full",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "sections": {},
    }
    t_all, c_all = time.perf_counter(), _cpu_seconds()
    for name in sections:
        module = _section(name)
        fn = bench_notebooks if name == NOTEBOOKS else getattr(module, "run", None)
        if fn is None:
            report["sections"][name] = {"skipped": "not available (its module failed to import)"}
            continue
        print(f"== {name}", flush=True)
        kwargs = {} if name == NOTEBOOKS else dict(getattr(module, "QUICK" if quick else "FULL", {}))
        kwargs.update((overrides or {}).get(name, {}))
        params = inspect.signature(fn).parameters
        kwargs = {k: v for k, v in kwargs.items() if k in params}
        if "quiet" in params:
            kwargs.setdefault("quiet", True)
        if "verbose" in params:
            kwargs.setdefault("verbose", False)
        t0, c0 = time.perf_counter(), _cpu_seconds()
        try:
            result = fn(**kwargs)
            if not isinstance(result, dict):
                result = {"result": result}
        except Exception as e:  # a broken section must not lose the others
            result = {"error": f"{type(e).__name__}: {e}"}
        result["_section_seconds"] = round(time.perf_counter() - t0, 1)
        result["_section_cpu_seconds"] = round(_cpu_seconds() - c0, 1)
        result["_arguments"] = {k: v for k, v in kwargs.items() if k not in ("quiet", "verbose")}
        report["sections"][name] = result
        print(f"   {name}: {result['_section_seconds']} s", flush=True)
    report["total_seconds"] = round(time.perf_counter() - t_all, 1)
    report["total_cpu_seconds"] = round(_cpu_seconds() - c_all, 1)
    return report


BUSY_LIMIT_S = 3600  # the busy loop ends by itself after this long, even if the benchmark is killed


def start_busy_loop(limit_s: float = BUSY_LIMIT_S):
    """A subprocess spinning on the last CPU this process may use (bounded by `limit_s`); stop it with .kill()."""
    import subprocess

    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    code = f"import time\nend = time.time() + {float(limit_s)}\nwhile time.time() < end:\n    pass\n"
    proc = subprocess.Popen([sys.executable, "-c", code])
    if len(cpus) > 1:
        try:
            os.sched_setaffinity(proc.pid, {cpus[-1]})
        except OSError:
            pass
    return proc


def add_idle_peers(report: dict, idle: dict | None) -> None:
    """A busy run's chapter times get the idle run's as their peer (ratio = time under load / idle)."""
    old = (idle or {}).get("sections", {}).get(NOTEBOOKS, {})
    if not old or (idle or {}).get("busy"):
        return
    for stem, m in report["sections"].get(NOTEBOOKS, {}).items():
        if isinstance(m, dict) and isinstance(old.get(stem), dict):
            m["idle"] = {k: v for k, v in old[stem].items() if k in ("as_shipped", "solutions_injected")}
            m["idle_date"] = idle.get("idle_date") or f"on {idle.get('date')}"


def carry_over_notebooks(report: dict, previous: dict | None) -> None:
    """Add the chapters a quick run did not execute from a previous full report, marked as carried over."""
    nb = report["sections"].get("notebooks")
    if not nb or "error" in nb or not previous:
        return
    old = previous.get("sections", {}).get("notebooks", {})
    for stem in nb.get("all_chapters", []):
        row = old.get(stem)
        if stem in nb or not isinstance(row, dict):
            continue
        if "carried_over_from" in row:  # a previous quick run's carried-over row keeps its date
            nb[stem] = dict(row)
        elif previous.get("mode") == "full":
            nb[stem] = {**row, "carried_over_from": previous.get("date", "a previous full run")}


# =====================================================================================
# The table
# =====================================================================================


def rows_notebooks(r: dict) -> list[dict]:
    s, out = "notebooks", []
    for stem in r.get("all_chapters", []):
        chapter = r.get(stem)
        if chapter is None:
            out.append(row(s, f"{stem}: execution time (s)", None, None, "not run", with_ratio=False))
            continue
        for kind in ("as_shipped", "solutions_injected"):
            m = chapter.get(kind)
            if m is None:
                continue
            what = "as shipped" if kind == "as_shipped" else "solutions injected"
            note = (
                f"carried over from the full run of {chapter['carried_over_from']}"
                if "carried_over_from" in chapter
                else "measured in this run"
            )
            if "error" in m:
                out.append(row(s, f"{stem} ({what})", None, None, f"ERROR: {m['error']}", with_ratio=False))
                continue
            idle = chapter.get("idle", {}).get(kind, {}).get("seconds")
            if idle is not None:
                out.append(
                    row(
                        s,
                        f"{stem} ({what}): execution time with the other core busy (s)",
                        m["seconds"],
                        idle,
                        f"peer: the same chapter run idle {chapter.get('idle_date')}; lower is better",
                    )
                )
                continue
            out.append(row(s, f"{stem} ({what}): execution time (s)", m["seconds"], None, note))
            out.append(row(s, f"{stem} ({what}): kernel peak memory (MB)", m["peak_mb"], None, note))
    return out


def table_rows(report: dict) -> list[dict]:
    """One dict per measurement (section, measurement, interplab, peer, ratio = interplab / peer, note)."""
    rows = []
    for name, result in report["sections"].items():
        if "error" in result or "skipped" in result:
            rows.append(
                row(
                    name,
                    "(section failed)" if "error" in result else "(skipped)",
                    None,
                    None,
                    result.get("error") or result.get("skipped"),
                    with_ratio=False,
                )
            )
            continue
        try:
            rows.extend(rows_notebooks(result) if name == NOTEBOOKS else _section(name).rows(result))
        except (KeyError, TypeError, ValueError, ZeroDivisionError, AttributeError) as e:
            rows.append(row(name, "(unreadable result)", None, None, f"{type(e).__name__}: {e}", with_ratio=False))
    return rows


def _fmt(x) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        if x == 0:
            return "0"
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        if abs(x) < 1e-3:
            return f"{x:.2e}"
        return f"{x:.4g}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * 3 + ["---"]) + "|"]
    for r in rows:
        cells = [
            r["section"],
            r["measurement"],
            _fmt(r["interplab"]),
            _fmt(r["peer"]),
            _fmt(r["ratio"]),
            r["note"].replace("|", "/"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def to_markdown(report: dict) -> str:
    m = report["machine"]
    mode = report["mode"]
    lines = [
        "# interplab benchmarks",
        "",
        "Generated by `interplab bench` (this file is overwritten on every run; `interplab bench --quick`",
        "for the short version). The ratio column is interplab / peer, measured in the same process on the",
        "same data: the ratios are the headline, absolute times depend on the machine and its load.",
        "",
        f"- mode: **{mode}**, {report['date']}, {report.get('total_seconds', '?')} s wall in all "
        f"({report.get('total_cpu_seconds', '?')} s of CPU time, notebook kernels included)",
        f"- machine: {m.get('processor') or '?'}, {m['cpus']} CPUs, torch {m['torch']} with "
        f"{m['torch_threads']} threads on {m['device']}, Python {m['python']}, {m['platform']}",
    ]
    if "load_average_at_start" in m:
        lines.append(
            f"- load average at start: {m['load_average_at_start']} (other work on the machine slows "
            f"every timing below)"
        )
    if "threads" in m:
        t = m["threads"]
        lines.append(
            f"- threads: torch {t['torch_threads']} ({t.get('chosen_because') or 'torch default'}); "
            f"{t['available_cpus']} CPUs available, {t['physical_cores']} physical cores; "
            f"OMP_NUM_THREADS={t.get('OMP_NUM_THREADS')}, MKL_NUM_THREADS={t.get('MKL_NUM_THREADS')}, "
            f"INTERPLAB_THREADS={t.get('INTERPLAB_THREADS')}"
        )
    if report.get("busy"):
        lines.append(
            "- **busy**: a busy loop kept one core busy for the whole run (`interplab bench --busy`); "
            "each chapter first ran with the machine idle, in this same run, as its peer"
        )
    if mode == "quick":
        lines.append(
            "- quick mode: shorter SAE training, fewer documents and one timing repeat (see "
            "`interplab bench --help`); every chapter is executed as shipped"
        )
    lines += [
        "",
        markdown_table(table_rows(report)),
        "",
        "Raw figures (per-depth accuracies, every setting): benchmarks.json.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="interplab bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="shorter runs: within 5 minutes on 2 CPU cores")
    p.add_argument(
        "--only", default=",".join(section_names()), help=f"comma-separated sections ({', '.join(section_names())})"
    )
    p.add_argument("--out", default=".", help="folder for BENCHMARKS.md and benchmarks.json (default: here)")
    p.add_argument(
        "--inject",
        action="store_true",
        help="also execute every chapter with the reference solutions injected (about doubles the time)",
    )
    p.add_argument(
        "--busy",
        action="store_true",
        help="keep the other core busy (a bounded busy loop in a subprocess) for the whole run; writes "
        "BENCHMARKS_BUSY.md / benchmarks_busy.json; each chapter runs idle first in the same run, as its peer",
    )
    a = p.parse_args(argv)
    sections = [s.strip() for s in a.only.split(",") if s.strip()]
    unknown = [s for s in sections if s not in section_names()]
    if unknown:
        p.error(f"unknown sections {unknown}; choose from {section_names()}")
    out = Path(a.out)
    previous = None
    if (out / "benchmarks.json").exists():
        try:
            previous = json.loads((out / "benchmarks.json").read_text())
        except json.JSONDecodeError:
            previous = None
    overrides = {"notebooks": {"inject": a.inject}} if a.inject else None
    idle = None
    if a.busy:  # the peer: the same sections, idle, in this run (the machine and the code are the same)
        print("== idle pass (the peer of the busy pass)")
        idle = run(sections, a.quick, overrides=overrides)
        idle["idle_date"] = "earlier in this run"
        print("== busy pass: one core kept busy")
    busy = start_busy_loop() if a.busy else None
    try:
        report = run(sections, a.quick, overrides=overrides)
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    if a.busy:
        report["busy"] = True
        add_idle_peers(report, idle)
    elif a.quick:
        carry_over_notebooks(report, previous)
    report["rows"] = table_rows(report)
    out.mkdir(parents=True, exist_ok=True)
    text = to_markdown(report)
    md, js = ("BENCHMARKS_BUSY.md", "benchmarks_busy.json") if a.busy else ("BENCHMARKS.md", "benchmarks.json")
    (out / js).write_text(json.dumps(report, indent=1) + "\n")
    (out / md).write_text(text)
    print()
    print(text)
    print(f"wrote {out / md} and {out / js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
