"""The grading subprocess: define a notebook's functions, check each exercise, report as it goes.

Reads a job (JSON) on stdin: {"notebook", "exercises", "time_limit", "results"}; appends
one JSON line per event to the results file: {"started": name} before an exercise,
then its row. Run by `interplab.grading.gradebook`; not meant to be run by hand.
"""

from __future__ import annotations

import json
import linecache
import sys
import traceback

PRELUDE = """
import math
import numpy as np
import torch
import einops
from torch import Tensor
from jaxtyping import Float, Int, Bool
import interplab
from interplab import tinyworld
"""


def main() -> None:
    job = json.loads(sys.stdin.read())
    results = open(job["results"], "a", buffering=1)

    def emit(rec: dict) -> None:
        results.write(json.dumps(rec) + "\n")
        results.flush()

    from interplab.exercises import get
    from interplab.grading.core import run
    from interplab.grading.notebooks import find_definitions, read_notebook

    names: list[str] = job["exercises"]
    nb = read_notebook(job["notebook"])
    all_defs = find_definitions(nb)
    ns: dict = {"__name__": "__submission__"}
    exec(PRELUDE, ns)
    imports = "\n".join(d.imports for d in all_defs.values())
    for line in dict.fromkeys(imports.splitlines()):
        try:
            exec(line, ns)
        except BaseException:
            pass
    # Helpers the learner wrote (not exercises) come first, so that exercises can call them.
    exercise_names = set(names)
    for d in all_defs.values():
        if d.name not in exercise_names and d.source:
            try:
                exec(d.source, ns)
            except BaseException:
                pass
    # Every exercise starts as its reference, as in the notebook after a failed check.
    for n in names:
        ns[n] = get(n).reference
    for n in names:
        emit({"started": n})
        ex = get(n)
        ex.time_limit = float(job["time_limit"])
        d = all_defs.get(n)
        row = {"exercise": n, "n_total": len(ex.cases())}
        if d is None:
            row.update(status="missing", message=f"no function called `{n}` is defined in the notebook "
                                                  f"(was its cell deleted, or the function renamed?)")
        elif d.error:
            row.update(status="syntax_error", message=d.error)
        else:
            try:
                filename = f"<notebook cell {d.cell + 1}>"
                linecache.cache[filename] = (len(d.source), None, d.source.splitlines(True), filename)
                exec(compile(d.source, filename, "exec"), ns)
                fn = ns[n]
            except BaseException as e:  # noqa: BLE001 - anything a definition can throw
                row.update(status="error", message=f"defining `{n}` failed: {type(e).__name__}: {e}")
                ns[n] = ex.reference
                emit(row)
                continue
            report = run(ex, fn)
            status = {"passed": "passed", "not_implemented": "not_implemented", "timeout": "timeout",
                      "error": "error"}.get(report.kind, "failed")
            msg = report.summary() if not report.passed else ""
            row.update(status=status, n_passed=report.n_passed, n_total=report.n_total,
                       score=round(report.n_passed / report.n_total, 4), message=msg)
            ns[n] = fn if report.passed else ex.reference
        emit(row)
    results.close()


if __name__ == "__main__":
    try:
        main()
    except SystemExit:
        raise
    except BaseException:
        traceback.print_exc()
        sys.exit(3)
