"""Where a submission runs: a bubblewrap sandbox on Linux, else resource limits and a private folder.

With bubblewrap (`bwrap`, Debian/Ubuntu: ``sudo apt-get install -y bubblewrap``) each worker sees
- the system, the Python environment and the interplab package (with its bundled weights)
  read-only, and nothing else of the machine: no submissions folder, no gradebook, no HOME;
- a private, size-limited temporary folder holding only its own copy of the submission;
- no network (its own network namespace) and its own PID namespace, so that every process
  it starts dies with it.

In every mode the worker gets resource limits (address space, processes, file size, open
files, CPU time), runs in its own process group, and the whole group and every process
descended from it is killed when it ends. When the grader runs as root the worker gives up
root before it runs any of the submission's code (bubblewrap mode).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import interplab
import interplab.solutions

BWRAP_INSTALL = "sudo apt-get install -y bubblewrap"
NOBODY = 65534

_probe: dict[str, bool] = {}
_noted: set[str] = set()


class SandboxUnavailable(RuntimeError):
    pass


def bwrap_works() -> bool:
    """Whether bubblewrap is installed and can create the namespaces the sandbox needs (checked once)."""
    if "bwrap" not in _probe:
        exe = shutil.which("bwrap")
        ok = False
        if exe and sys.platform.startswith("linux"):
            try:
                r = subprocess.run(
                    [
                        exe,
                        *_user_ns(),
                        "--ro-bind",
                        "/",
                        "/",
                        "--unshare-net",
                        "--unshare-pid",
                        "--die-with-parent",
                        "--proc",
                        "/proc",
                        "--dev",
                        "/dev",
                        "true",
                    ],
                    capture_output=True,
                    timeout=30,
                    check=False,
                )
                ok = r.returncode == 0
            except (OSError, subprocess.TimeoutExpired):
                ok = False
        _probe["bwrap"] = ok
    return _probe["bwrap"]


def _user_ns() -> list[str]:
    return [] if os.geteuid() == 0 else ["--unshare-user"]


def resolve(mode: str) -> str:
    """ "bwrap" or "none" for a requested mode ("auto", "bwrap" or "none")."""
    if mode not in ("auto", "bwrap", "none"):
        raise ValueError(f"unknown sandbox {mode!r}: use auto, bwrap or none")
    if mode == "none":
        return "none"
    if bwrap_works():
        return "bwrap"
    if mode == "bwrap":
        raise SandboxUnavailable(
            "--sandbox bwrap was asked for, but bubblewrap is "
            + ("not installed" if not shutil.which("bwrap") else "installed and cannot create namespaces here")
            + f". Install it with `{BWRAP_INSTALL}` (Debian/Ubuntu; `dnf install bubblewrap` on Fedora), or grade "
            f"with --sandbox none, which does not isolate submissions from your files."
        )
    return "none"


def fallback_note() -> str:
    why = (
        "--sandbox none was chosen"
        if bwrap_works()
        else "bubblewrap is " + ("not installed" if not shutil.which("bwrap") else "not usable here")
    )
    return (
        f"note: grading WITHOUT a sandbox ({why}"
        + "). Each submission still runs in its own process with CPU-time, memory, process, file-size and "
        "open-file limits, in a private temporary folder, and every process it starts is killed when it ends; "
        "but its code runs with your user's rights: it can read and change your files (other submissions, the "
        "gradebook, your home folder, the installed package) and use the network. Grade only trusted work "
        f"this way, or install bubblewrap (`{BWRAP_INSTALL}`) and grade again."
        + (" The grader runs as root, so the submissions do too." if os.geteuid() == 0 else "")
    )


def note_once(mode: str, stream=None) -> None:
    """Print, once per process, what is not protected when grading without bubblewrap."""
    if mode == "none" and "none" not in _noted:
        _noted.add("none")
        print(fallback_note(), file=stream or sys.stderr, flush=True)


def readonly_paths() -> list[str]:
    """What a worker needs to read: the Python installation and environment, the package and its data."""
    paths = {
        sys.prefix,
        sys.base_prefix,
        sys.exec_prefix,
        sys.base_exec_prefix,
        str(Path(sys.executable).resolve().parent.parent),
    }
    for mod in (interplab, interplab.solutions):
        paths.update(str(Path(p).resolve()) for p in getattr(mod, "__path__", []))
    for p in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        if p and Path(p).is_dir():
            paths.add(str(Path(p).resolve()))
    for p in sys.path:  # site-packages folders and .pth targets of the environment
        if p and Path(p).is_dir() and any(p.startswith(q) for q in (sys.prefix, sys.base_prefix)):
            paths.add(str(Path(p).resolve()))
    out = sorted(paths)
    return [p for p in out if not any(p != q and p.startswith(q.rstrip("/") + "/") for q in out)]


SYSTEM_DIRS = ["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/etc"]
WORKDIR = "/home/student"


def command(mode: str, argv: list[str], private: Path, notebook_copy: Path, tmp_bytes: int) -> tuple[list[str], str]:
    """(the command that runs ``argv`` in the sandbox, the working folder the worker sees)."""
    if mode == "none":
        return argv, str(private)
    cmd = [
        shutil.which("bwrap") or "bwrap",
        *_user_ns(),
        "--unshare-pid",
        "--unshare-net",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--die-with-parent",
        "--new-session",
    ]
    for d in SYSTEM_DIRS:
        cmd += ["--ro-bind-try", d, d]
    # /proc, /dev and an empty /tmp first: the read-only binds below are laid over them, so an
    # environment or a checkout that lives under /tmp (as CI's clones may) stays visible.
    cmd += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--tmpfs", "/tmp"]
    ro = readonly_paths()
    parents = sorted({str(a) for p in ro for a in Path(p).parents if str(a) != "/"} | {"/home"}, key=len)
    for d in parents:  # folders bubblewrap would otherwise create readable by their owner only
        if not any(d == s or d.startswith(s + "/") for s in SYSTEM_DIRS):
            cmd += ["--perms", "0755", "--dir", d]
    for p in ro:
        cmd += ["--ro-bind", p, p]
    cmd += [
        "--perms",
        "0777",
        "--size",
        str(tmp_bytes),
        "--tmpfs",
        WORKDIR,
        "--ro-bind",
        str(notebook_copy),
        f"{WORKDIR}/{notebook_copy.name}",
        "--chdir",
        WORKDIR,
    ]
    if os.geteuid() == 0:
        cmd += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    return cmd + ["--", *argv], WORKDIR


def environment(workdir: str) -> dict[str, str]:
    """The worker's environment: nothing secret of the grader's (tokens, keys), only what Python needs."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": workdir,
        "TMPDIR": "/tmp",
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "MPLBACKEND": "Agg",
        "MPLCONFIGDIR": f"{workdir}/.matplotlib",
        "IPYTHONDIR": f"{workdir}/.ipython",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONNOUSERSITE": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "INTERPLAB_STRICT": "0",
        "XDG_CACHE_HOME": f"{workdir}/.cache",
    }
    for k in ("PYTHONPATH", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "INTERPLAB_BLOCK_NETWORK", "INTERPLAB_STANDIN"):
        if k in os.environ:
            env[k] = os.environ[k]
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _count_processes(uid: int) -> int:
    try:
        n = 0
        for p in os.listdir("/proc"):
            if p.isdigit():
                try:
                    if os.stat(f"/proc/{p}").st_uid == uid:
                        n += 1
                except OSError:
                    pass
        return n
    except OSError:
        return 0


def limiter(memory_bytes: int, cpu_seconds: float, file_bytes: int, nproc: int, nofile: int):
    """A preexec_fn: resource limits and a process group of its own for the worker."""
    import resource

    euid = os.geteuid()
    # Processes are counted per user: as root the worker becomes `nobody` (who owns few processes);
    # otherwise the limit sits above what the grader's user already runs.
    procs = nproc + (_count_processes(NOBODY) if euid == 0 else _count_processes(euid))

    def apply() -> None:
        os.setsid()
        limits = [
            ("RLIMIT_AS", memory_bytes),
            ("RLIMIT_FSIZE", file_bytes),
            ("RLIMIT_NOFILE", nofile),
            ("RLIMIT_NPROC", procs),
            ("RLIMIT_CORE", 0),
        ]
        for name, value in limits:
            if hasattr(resource, name):
                try:
                    resource.setrlimit(getattr(resource, name), (value, value))
                except (ValueError, OSError):
                    pass
        cpu = int(cpu_seconds) + 1
        try:
            resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 5))
        except (ValueError, OSError):
            pass

    return apply


# --- the process tree ------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode(errors="replace")
    except OSError:
        return None
    return data[data.rfind(")") + 2 :].split()  # fields from the state on; the name may hold spaces


def _all_stats() -> dict[int, list[str]]:
    out = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return out
    for p in names:
        if p.isdigit():
            s = _stat(int(p))
            if s:
                out[int(p)] = s
    return out


def tree(root: int, stats: dict[int, list[str]] | None = None) -> dict[int, list[str]]:
    """``root`` and every process descended from it (or in its process group or session)."""
    stats = _all_stats() if stats is None else stats
    children: dict[int, list[int]] = {}
    for pid, s in stats.items():
        children.setdefault(int(s[1]), []).append(pid)
    found, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in found or pid not in stats:
            continue
        found[pid] = stats[pid]
        todo += children.get(pid, [])
    for pid, s in stats.items():  # same process group or session: left behind by a child that exited
        if pid not in found and (int(s[2]) == root or int(s[3]) == root):
            found[pid] = s
    return found


def cpu_seconds(root: int) -> float | None:
    """CPU time used by the process tree (None where /proc is not available)."""
    if not os.path.isdir("/proc/self"):
        return None
    total = 0
    for s in tree(root).values():
        try:
            total += sum(int(x) for x in s[11:15])  # utime stime cutime cstime
        except (ValueError, IndexError):
            pass
    return total / _TICK


def kill_tree(root: int, known_children: set[int] | None = None) -> None:
    """SIGKILL the process group of ``root`` and every process descended from it, until none is left."""
    for _ in range(50):
        try:
            os.killpg(root, signal.SIGKILL)
        except OSError:
            pass
        pids = set(tree(root)) if os.path.isdir("/proc/self") else set()
        pids |= orphans(known_children or set())
        pids.discard(os.getpid())
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        reap(pids)
        if not pids:
            return
        time.sleep(0.02)


def reap(pids) -> None:
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except (ChildProcessError, OSError):
            pass


def orphans(known: set[int]) -> set[int]:
    """Our own child processes that we did not start ourselves: orphans of a worker, reparented to us."""
    me = os.getpid()
    return {pid for pid, s in _all_stats().items() if int(s[1]) == me and pid not in known}


def children_now() -> set[int]:
    me = os.getpid()
    return {pid for pid, s in _all_stats().items() if int(s[1]) == me}


def set_subreaper(on: bool) -> bool:
    """Make orphaned descendants of the grader's workers its own children, so they can be found and killed."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(36, 1 if on else 0, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False
