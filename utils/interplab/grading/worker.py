"""The grading worker: run a submission's cells as a kernel would, then call its exercise functions.

Started by `interplab.grading.gradebook` (inside the sandbox), never by hand. It reads one
job (JSON) from stdin and sends frames (`protocol`) on the file descriptor named by
``--fd``: "ready", "cells" (what each executed cell raised), then for each exercise
"exercise", one "case" per case with the function's plain output (`plain`) and "end".
After "end" it waits for the grader's verdict on stdin, so that a failed exercise is
replaced by the reference for the exercises after it, as `check` does in a notebook.

Nothing the worker says is a verdict: the grader builds its own cases, computes the
expected outputs and compares. A worker that lies can only lie about its own outputs.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import types

import torch  # noqa: F401 - imported before the submission can shadow anything

import interplab
from interplab import grading
from interplab.exercises import get, shared_model
from interplab.grading import core
from interplab.grading.plain import to_bytes
from interplab.grading.protocol import write_frame


def _drop_privileges(uid: int, gid: int) -> None:
    """Run as ``uid`` from here on, unable to regain privileges (used when the grader runs as root)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
    except (OSError, AttributeError):
        pass
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)


def _tripwire(ref, flag: list) -> None:
    """Make calls of the reference function set ``flag`` (a dynamic 'used the reference' check)."""
    import inspect

    orig = types.FunctionType(ref.__code__, ref.__globals__, ref.__name__, ref.__defaults__, ref.__closure__)
    orig.__kwdefaults__ = ref.__kwdefaults__
    if ref.__closure__:
        return  # a closure's code cannot be swapped; the grader's own check still applies
    try:
        ref.__signature__ = inspect.signature(orig)
    except (TypeError, ValueError):
        pass
    key = f"__interplab_tripwire_{ref.__name__}"

    def trip(args, kwargs):
        flag[0] = True
        return orig(*args, **kwargs)

    ref.__globals__[key] = trip
    ns: dict = {}
    text = f"def _w(*args, **kwargs):\n    return {key}(args, kwargs)\n"
    exec(text, ref.__globals__, ns)  # noqa: S102 - fixed text, no input
    ref.__code__ = ns["_w"].__code__


def main() -> None:
    fd = int(sys.argv[sys.argv.index("--fd") + 1])
    job = json.loads(sys.stdin.readline())
    os.set_inheritable(fd, False)

    def send(record: dict, blob: bytes = b"") -> None:
        write_frame(fd, record, blob)

    def check(fn, name=None, strict=None):  # in the grader, a notebook's check() only passes the function on
        return fn

    interplab.check = grading.check = core.check = check

    names: list[str] = job["exercises"]
    exercises = {n: get(n) for n in names}
    for ex in exercises.values():
        ex.time_limit = float(job["case_cpu"])
        ex.cases()
    shared_model()
    flags = {n: [False] for n in names}
    for n, ex in exercises.items():
        _tripwire(ex.reference, flags[n])

    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    cfg = Config()
    cfg.HistoryManager.enabled = False
    shell = InteractiveShell.instance(config=cfg)
    shell.user_ns["__name__"] = "__main__"
    if job.get("drop_uid") is not None:
        _drop_privileges(job["drop_uid"], job["drop_gid"])
    send({"event": "ready", "nonce": job["nonce"]})
    ns = shell.user_ns
    fns: dict = {}
    for line in sys.stdin:
        req = json.loads(line)
        op, nonce = req.get("op"), req.get("nonce")
        if op == "cells":
            errors = []
            for cell in req["cells"]:
                send({"event": "cell", "number": cell["number"], "nonce": nonce})
                try:
                    with core.time_limit(float(job["cell_cpu"])):
                        result = shell.run_cell(cell["source"], store_history=False)
                    err = result.error_before_exec or result.error_in_exec
                except BaseException as e:  # noqa: BLE001 - the limit firing outside the cell, SystemExit, ...
                    err = e
                if err is not None:
                    what = (
                        f"used more than {float(job['cell_cpu']):g} s of CPU time and was stopped"
                        if isinstance(err, core.ExerciseTimeout)
                        else f"raised {type(err).__name__}: {err}"
                    )
                    errors.append({"cell": cell["number"], "error": what.splitlines()[0][:300]})
            send({"event": "cells", "errors": errors, "nonce": nonce})
        elif op == "exercise":
            n = req["name"]
            for failed in req.get("fallback", []):  # as check() leaves a notebook after a failed exercise
                ns[failed] = exercises[failed].reference
            ex, fn = exercises[n], ns.get(n)
            fns[n] = fn
            if n not in ns:
                send({"event": "exercise", "name": n, "state": "missing", "nonce": nonce})
            elif not callable(fn):
                send(
                    {
                        "event": "exercise",
                        "name": n,
                        "state": "not_callable",
                        "nonce": nonce,
                        "message": f"`{n}` is a {type(fn).__name__}, not a function",
                    }
                )
            else:
                send(
                    {
                        "event": "exercise",
                        "name": n,
                        "state": "ok",
                        "nonce": nonce,
                        "is_reference": fn is ex.reference or getattr(fn, "__code__", None) is ex.reference.__code__,
                    }
                )
        elif op == "case":
            n, i = req["name"], int(req["i"])
            ex = exercises[n]
            flags[n][0] = False
            obs = core.observe(ex, fns[n], i)
            record = {
                "event": "case",
                "name": n,
                "i": i,
                "status": obs.status,
                "message": obs.message[:4000],
                "mutated": obs.mutated,
                "side_effects": obs.side_effects[:5],
                "printed": obs.printed[:1000],
                "seconds": obs.seconds,
                "reference_called": flags[n][0],
                "nonce": nonce,
            }
            blob = b""
            if obs.status == "ok":
                try:
                    record["value"], blob = to_bytes(obs.value)
                except Exception as e:  # noqa: BLE001
                    record.update(
                        status="wrong_type",
                        message=f"your function returned a value that cannot be "
                        f"sent to the grader ({type(e).__name__})",
                    )
            send(record, blob)
        else:
            break


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)
