"""The `interplab` command.

interplab lab        open the course (JupyterLab on chapters/)
interplab doctor     versions, device, bundled files, hub reachability
interplab evaluate   the bundled model's capability figures
interplab grade      grade submitted notebooks into a gradebook
interplab check      check your own chapter notebook
interplab exercises  list every exercise, its cases and known mistakes
interplab bench      speed and quality figures, side by side with peer libraries
interplab rebuild    rebuild (or --check) every artifact trained on the bundled model
interplab sync-stubs rewrite the notebooks' exercise stubs from the answer key (--check: only compare)
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import platform
import subprocess
import sys
from pathlib import Path

from .paths import chapters_dir


def cmd_lab(args: argparse.Namespace) -> int:
    folder = Path(args.dir) if args.dir else chapters_dir()
    if folder is None or not folder.is_dir():
        print(
            "interplab lab: cannot find the chapters/ folder. Run it inside a clone of the course "
            "(git clone ... && cd interplab), or pass --dir PATH_TO_CHAPTERS.",
            file=sys.stderr,
        )
        return 2
    cmd = [sys.executable, "-m", "jupyterlab", f"--ServerApp.root_dir={folder}", *args.jupyter_args]
    if args.print_command:
        print(" ".join(cmd))
        return 0
    try:
        import jupyterlab  # noqa: F401
    except ImportError:
        print(
            "interplab lab: JupyterLab is not installed. Install it with: pip install 'interplab[lab]' "
            "(or pip install jupyterlab).",
            file=sys.stderr,
        )
        return 2
    return subprocess.call(cmd)


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


def doctor_report(check_hub: bool = True) -> tuple[list[tuple[str, str]], bool]:
    """Rows of (item, status) and whether everything needed offline is fine."""
    import torch

    from .models import best_device, hub_reachable  # lazy: the command starts without loading torch or the model
    from .weights import (  # lazy: the command starts without loading torch or the model
        CorruptedFileError,
        bundled_folders,
        verify,
    )

    ok = True
    rows = [("python", platform.python_version()), ("platform", platform.platform())]
    for dist in [
        "interplab",
        "torch",
        "transformer_lens",
        "sae_lens",
        "transformers",
        "tokenizers",
        "safetensors",
        "circuitsvis",
        "numpy",
        "matplotlib",
        "jupyterlab",
        "nbval",
    ]:
        rows.append((dist, _version(dist)))
    rows.append(
        ("device", best_device() + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else ""))
    )
    rows.append(("torch threads", str(torch.get_num_threads())))
    folders = bundled_folders()
    if not folders:
        rows.append(("bundled files", "NONE FOUND (the package data is missing; reinstall interplab)"))
        ok = False
    for folder in folders:
        try:
            files = verify(folder)
            rows.append((f"bundled {folder.name}", f"{len(files)} files verified (sha256)"))
        except CorruptedFileError as e:
            rows.append((f"bundled {folder.name}", f"FAILED: {e}"))
            ok = False
    if check_hub:
        reachable = hub_reachable()
        rows.append(
            (
                "model hub",
                "reachable: pretrained models such as gpt2-small can be loaded"
                if reachable
                else "not reachable: the course runs offline on 'tinyworld'",
            )
        )
    chapters = chapters_dir()
    rows.append(("chapters", str(chapters) if chapters else "not found (not running from a clone)"))
    return rows, ok


def cmd_doctor(args: argparse.Namespace) -> int:
    rows, ok = doctor_report(check_hub=not args.no_hub)
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print("all good" if ok else "PROBLEMS FOUND (see above)")
    return 0 if ok else 1


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .tinyworld.evaluate import main  # lazy: the command starts without loading torch or the model

    main(["--model", args.model, "-n", str(args.n)])
    return 0


def cmd_grade(args: argparse.Namespace) -> int:
    # lazy, as every command here: `interplab --help` should not import torch
    from .grading.gradebook import (  # lazy: the command starts without loading torch or the model
        NoNotebooks,
        format_rows,
        grade,
    )
    from .grading.sandbox import SandboxUnavailable  # (same reason)

    try:
        rows = grade(args.submissions, out=args.out, time_limit=args.time_limit, sandbox=args.sandbox)
    except (NoNotebooks, SandboxUnavailable) as e:
        print(f"interplab grade: {e}", file=sys.stderr)
        return 2
    print(format_rows(rows))
    if args.out:
        print(f"wrote {Path(args.out).with_suffix('.csv')} and {Path(args.out).with_suffix('.json')}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    # lazy, as every command here: `interplab --help` should not import torch
    from .grading.gradebook import grade_notebook  # lazy: the command starts without loading torch or the model
    from .grading.sandbox import SandboxUnavailable  # (same reason)

    if not Path(args.notebook).is_file():
        print(
            f"interplab check: {args.notebook} is not a notebook file. Pass the path of your chapter notebook, "
            f"e.g. interplab check chapters/00_orientation.ipynb",
            file=sys.stderr,
        )
        return 2
    try:
        rows = grade_notebook(args.notebook, time_limit=args.time_limit, sandbox=args.sandbox)
    except SandboxUnavailable as e:
        print(f"interplab check: {e}", file=sys.stderr)
        return 2
    for r in rows:
        if r.exercise == "TOTAL":
            print(f"\n{r.message}")
            continue
        mark = "\u2705" if r.status == "passed" else "\u274c"
        print(
            f"{mark} {r.exercise}: {r.status.replace('_', ' ')}"
            + (f" ({r.n_passed}/{r.n_total} checks)" if r.n_total else "")
        )
        if r.message and r.status != "passed":
            print("\n".join("    " + ln for ln in r.message.splitlines()))
    total = rows[-1]
    return 0 if total.status == "passed" else 1


def cmd_exercises(args: argparse.Namespace) -> int:
    from .exercises import all_exercises  # lazy: the command starts without loading torch or the model
    from .grading import stats  # lazy: the command starts without loading torch or the model

    for ex in all_exercises():
        print(f"{ex.chapter:<22} {ex.name:<28} {len(ex.cases()):>3} cases {len(ex.mistakes):>3} known mistakes")
    s = stats()
    print(
        f"\n{s['exercises']} exercises in {s['chapters']} chapters: {s['cases']} cases, "
        f"{s['known_mistakes']} known mistakes"
    )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import main  # lazy: the command starts without loading torch or the model

    return main(args.bench_args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="interplab", description="interplab: a mechanistic interpretability course.")
    sub = p.add_subparsers(dest="command", required=True)

    lab = sub.add_parser("lab", help="open the course in JupyterLab")
    lab.add_argument("--dir", help="the chapters folder (default: the clone's chapters/)")
    lab.add_argument("--print-command", action="store_true", help="print the JupyterLab command instead of running it")
    lab.set_defaults(jupyter_args=[])  # any other option (--no-browser, --port 8890, ...) goes to JupyterLab
    lab.set_defaults(func=cmd_lab)

    doc = sub.add_parser("doctor", help="check the installation")
    doc.add_argument("--no-hub", action="store_true", help="skip the model hub check")
    doc.set_defaults(func=cmd_doctor)

    gr = sub.add_parser("grade", help="grade submitted notebooks into a gradebook (CSV and JSON)")
    gr.add_argument("submissions", nargs="+", help="notebooks, or folders of notebooks")
    gr.add_argument("--out", default="grades.csv", help="CSV path; the JSON goes beside it (default grades.csv)")
    gr.add_argument(
        "--time-limit",
        type=float,
        default=30.0,
        help="CPU seconds per case (default 30); a sleeping function is stopped by a wall-clock backstop",
    )
    gr.add_argument(
        "--sandbox",
        choices=["auto", "bwrap", "none"],
        default="auto",
        help="auto (default): bubblewrap where it works, else limits only, with a note of what is not "
        "protected; bwrap: require bubblewrap; none: no sandbox (trusted work only)",
    )
    gr.set_defaults(func=cmd_grade)

    ck = sub.add_parser("check", help="check the exercises of your own chapter notebook")
    ck.add_argument("notebook")
    ck.add_argument("--time-limit", type=float, default=30.0, help="CPU seconds per case (default 30)")
    ck.add_argument(
        "--sandbox",
        choices=["auto", "bwrap", "none"],
        default="auto",
        help="where your notebook runs (see interplab grade --help)",
    )
    ck.set_defaults(func=cmd_check)

    ls = sub.add_parser("exercises", help="list every exercise with its cases and known mistakes")
    ls.set_defaults(func=cmd_exercises)

    bn = sub.add_parser("bench", help="speed and quality figures against peer libraries (see --help)", add_help=False)
    bn.add_argument("bench_args", nargs=argparse.REMAINDER)
    bn.set_defaults(func=cmd_bench)

    rb = sub.add_parser(
        "rebuild", help="rebuild (or --check) the artifacts trained on the bundled model", add_help=False
    )
    rb.add_argument("rebuild_args", nargs=argparse.REMAINDER)

    ss = sub.add_parser("sync-stubs", help="rewrite the notebooks' exercise stubs from the answer key", add_help=False)
    ss.add_argument("stubs_args", nargs=argparse.REMAINDER)

    ev = sub.add_parser("evaluate", help="capability figures of a TinyWorld model")
    ev.add_argument("--model", default="tinyworld")
    ev.add_argument("-n", type=int, default=1000)
    ev.set_defaults(func=cmd_evaluate)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # bench has its own parser; REMAINDER would not take its leading options
        from .bench import main as bench_main  # lazy: the command starts without loading torch or the model

        return int(bench_main(argv[1:]) or 0)
    if argv[:1] == ["rebuild"]:  # so do rebuild and sync-stubs
        from .artifacts import main as rebuild_main  # lazy: the command starts without loading torch or the model

        return int(rebuild_main(argv[1:]) or 0)
    if argv[:1] == ["sync-stubs"]:
        from .stubs import main as stubs_main  # lazy: the command starts without loading torch or the model

        return int(stubs_main(argv[1:]) or 0)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if args.command != "lab":
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.jupyter_args = extra  # e.g. interplab lab --no-browser --port 8890
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
