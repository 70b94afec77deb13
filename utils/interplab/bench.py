"""`interplab bench`: the course's speed and quality figures, measured side by side in one run.

    interplab bench --quick            # a few minutes on 2 CPU cores
    interplab bench                    # the full report
    interplab bench --only notebooks   # one section

Every section measures the reference implementation and, where there is one, a peer
library on the same data in the same process, and reports ratios. Results go to the
terminal, to BENCHMARKS.md and to benchmarks.json (in the current folder unless --out
says otherwise). No figure here is asserted by a test: machines are noisy, and a
benchmark that prints is more honest than a timed test that flakes.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable

# section name -> (module, function); chapter modules are optional until their chapter lands.
SECTIONS: dict[str, tuple[str, str]] = {
    "probes": ("interplab.bench_probes", "bench_probes"),
    "lens": ("interplab.bench_lens", "bench_lens"),
    "sae": ("interplab.bench_sae", "bench_sae"),
    "transcoders": ("interplab.bench_transcoders", "bench_transcoders"),
    "patching": ("interplab.bench_patching", "bench_patching"),
    "notebooks": ("interplab.bench", "bench_notebooks"),
}


def _run_notebook_subprocess(path: Path, inject: bool) -> dict:
    """Execute one notebook in a fresh process; return seconds and the kernel's peak memory."""
    import subprocess

    code = (
        "import sys, time, resource, nbformat\n"
        "from nbclient import NotebookClient\n"
        "from interplab.grading.notebooks import inject_solutions, read_notebook\n"
        f"path = {str(path)!r}\n"
        f"nb = nbformat.from_dict(inject_solutions(read_notebook(path))) if {inject!r} else nbformat.read(path, as_version=4)\n"
        "t = time.perf_counter()\n"
        "NotebookClient(nb, timeout=900, kernel_name='python3').execute()\n"
        "secs = time.perf_counter() - t\n"
        "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
        "print(f'{secs} {peak}')\n"
    )
    env = {**os.environ, "INTERPLAB_STRICT": "1" if inject else "0", "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:300]}
    secs, peak = proc.stdout.strip().splitlines()[-1].split()
    peak_mb = float(peak) / 1024 if sys.platform != "darwin" else float(peak) / 1e6
    return {"seconds": round(float(secs), 1), "peak_mb": round(peak_mb)}


def bench_notebooks(quick: bool = False) -> dict:
    """Each chapter's execution time and the kernel's peak memory, as shipped (and, in full mode, with solutions)."""
    from .cli import chapters_dir

    folder = chapters_dir()
    if folder is None:
        return {"error": "no chapters/ folder (run from a clone of the course)"}
    out = {}
    for path in sorted(folder.glob("*.ipynb")):
        row = {"as_shipped": _run_notebook_subprocess(path, inject=False)}
        if not quick:
            row["solutions_injected"] = _run_notebook_subprocess(path, inject=True)
        out[path.stem] = row
        print(f"  {path.stem}: {row}", flush=True)
    return out


def _section(name: str) -> Callable[..., dict] | None:
    module, fn = SECTIONS[name]
    try:
        return getattr(importlib.import_module(module), fn)
    except (ImportError, AttributeError):
        return None


def run(sections: list[str], quick: bool) -> dict:
    import torch

    report = {
        "machine": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "device": "cuda" if torch.cuda.is_available() else "cpu"},
        "mode": "quick" if quick else "full",
        "sections": {},
    }
    for name in sections:
        fn = _section(name)
        if fn is None:
            report["sections"][name] = {"skipped": "not available yet (its chapter has not landed)"}
            continue
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            import inspect

            accepts_quick = "quick" in inspect.signature(fn).parameters
            result = fn(quick=quick) if accepts_quick else fn()
            if not isinstance(result, dict):
                result = {"result": result}
        except Exception as e:  # a broken section must not lose the others
            result = {"error": f"{type(e).__name__}: {e}"}
        result["_section_seconds"] = round(time.perf_counter() - t0, 1)
        report["sections"][name] = result
    return report


def to_markdown(report: dict) -> str:
    lines = ["# interplab benchmarks", "",
             "Regenerate with `interplab bench` (or `interplab bench --quick`). Ratios are the headline: absolute",
             "times depend on the machine.", "",
             f"Machine: {report['machine']}", f"Mode: {report['mode']}", ""]
    for name, result in report["sections"].items():
        lines.append(f"## {name}")
        lines.append("")
        lines.append("```json")
        lines.append(json.dumps(result, indent=2))
        lines.append("```")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="interplab bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller runs; a few minutes on 2 CPU cores")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections ({', '.join(SECTIONS)})")
    p.add_argument("--out", default=".", help="folder for BENCHMARKS.md and benchmarks.json")
    a = p.parse_args(argv)
    sections = [s.strip() for s in a.only.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        p.error(f"unknown sections {unknown}; choose from {list(SECTIONS)}")
    report = run(sections, a.quick)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmarks.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "BENCHMARKS.md").write_text(to_markdown(report))
    print(to_markdown(report))
    print(f"wrote {out / 'BENCHMARKS.md'} and {out / 'benchmarks.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
