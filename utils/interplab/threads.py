"""How many threads torch uses: at most the physical cores this process may run on, fewer on a busy machine.

torch's default is one thread per logical CPU, whatever else runs. On a shared machine
(a classroom server, Colab's two vCPUs, a grader running several workers) that
oversubscribes the cores: threads wait for each other at every matrix product and a
chapter can take many times longer than with one thread. `configure` picks:

1. ``n`` if given (e.g. ``configure(1)`` in each grading worker);
2. else ``INTERPLAB_THREADS``, or ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` if set;
3. else a count the user already chose with ``torch.set_num_threads`` before importing
   interplab (a value other than torch's default);
4. else the physical cores among the CPUs this process may use (``os.sched_getaffinity``),
   minus the cores other processes keep busy (the 1-minute load average, or what /proc/stat shows
   right now if more), at least 1.

Importing interplab calls ``configure(quiet=True)`` (unless INTERPLAB_THREADS=off) and the
first `load_model` says the result in one line. Call ``configure(n)`` yourself to change it
(it says so unless ``quiet=True``); a grading worker calls ``configure(1, quiet=True)``.
"""

from __future__ import annotations

import os
import sys
import time

ENV = "INTERPLAB_THREADS"
_state: dict = {}


def available_cpus() -> int:
    """The logical CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        return os.cpu_count() or 1


def physical_cores() -> int:
    """Physical cores among the CPUs this process may use (hyperthread siblings counted once)."""
    cpus = available_cpus()
    try:
        allowed = os.sched_getaffinity(0)
        cores, cpu = set(), None
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "processor":
                    cpu, phys, core = int(value), None, None
                elif key == "physical id":
                    phys = value
                elif key == "core id" and cpu in allowed:
                    core = value
                    cores.add((phys, core))
        return max(1, min(cpus, len(cores))) if cores else cpus
    except (AttributeError, OSError, ValueError):
        return cpus


def _cpu_times() -> tuple[float, float] | None:
    """(busy, total) jiffies of all CPUs from /proc/stat; None where there is no /proc."""
    try:
        with open("/proc/stat") as f:
            fields = [float(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_now(window: float = 0.1) -> float:
    """How many cores other processes keep busy right now: /proc/stat sampled over ``window`` seconds.

    The load average lags by a minute, so a job that has just started (another notebook, a
    classmate's grader) would be missed; this sees it at once. This process sleeps meanwhile.
    """
    first = _cpu_times()
    if first is None:
        return 0.0
    time.sleep(window)
    second = _cpu_times()
    if second is None or second[1] <= first[1]:
        return 0.0
    return (second[0] - first[0]) / (second[1] - first[1]) * (os.cpu_count() or 1)


def busy_cores() -> int:
    """Cores kept busy by other processes: the larger of the 1-minute load average (rounded down) and the
    cores busy right now (rounded), so neither a load that has just started nor a steady one is missed."""
    try:
        steady = int(os.getloadavg()[0])
    except (AttributeError, OSError):
        steady = 0
    return max(steady, round(busy_now()))


def _from_environment() -> tuple[int, str] | None:
    for var in (ENV, "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        value = os.environ.get(var, "").strip()
        if value and value.lower() != "off":
            try:
                n = int(value)
            except ValueError:
                raise ValueError(
                    f"{var}={value!r} is not a number of threads; set it to a positive integer (or unset it)"
                ) from None
            if n < 1:
                raise ValueError(f"{var}={value!r}: the number of threads must be at least 1")
            return n, var
    return None


def choose(n: int | None = None) -> tuple[int, str]:
    """The thread count `configure` would set, and why."""
    import torch

    if n is not None:
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"the number of threads must be a positive integer, not {n!r}")
        return n, "asked for"
    env = _from_environment()
    if env is not None:
        return env[0], f"from {env[1]}"
    current = _state.get("torch_default", torch.get_num_threads())
    if current not in (available_cpus(), os.cpu_count(), physical_cores()):
        return current, "set with torch.set_num_threads"
    cores = physical_cores()
    free = max(1, min(cores, available_cpus() - busy_cores()))
    why = f"{cores} physical core{'s' * (cores != 1)}"
    if free < cores:
        why += f", load {os.getloadavg()[0]:.1f}"
    return free, why


def configure(n: int | None = None, quiet: bool = False) -> int:
    """Set torch's intra-op thread count (see the module's docstring for the choice) and say so in one line.

    Args:
        n: the thread count; None chooses from the environment, the machine and its load.
        quiet: do not print the line (it is printed at most once per process otherwise).

    Returns:
        The number of threads torch now uses.
    """
    import torch

    _state.setdefault("torch_default", torch.get_num_threads())
    count, why = choose(n)
    torch.set_num_threads(count)
    _state["threads"], _state["why"] = count, why
    if not quiet:
        announce(force=n is not None)
    return count


def announce(force: bool = False) -> None:
    """Print the thread setting once per process (to stderr), e.g. on the first model load."""
    if not _state or (_state.get("announced") and not force):
        return
    _state["announced"] = True
    n = _state["threads"]
    print(
        f"interplab: torch uses {n} thread{'s' * (n != 1)} ({_state['why']}; "
        f"interplab.threads.configure(n) changes it)",
        file=sys.stderr,
    )


def settings() -> dict:
    """The thread settings, for reports: torch's count, why, and the environment variables that matter."""
    import torch

    return {
        "torch_threads": torch.get_num_threads(),
        "chosen_because": _state.get("why"),
        "available_cpus": available_cpus(),
        "physical_cores": physical_cores(),
        **{var: os.environ.get(var) for var in (ENV, "OMP_NUM_THREADS", "MKL_NUM_THREADS")},
    }
