"""torch's thread count: chosen from an explicit value, the environment, the machine and its load; said once."""

from __future__ import annotations

import pytest
import torch

from interplab import threads


@pytest.fixture
def restore():
    before = torch.get_num_threads()
    state = dict(threads._state)
    yield
    torch.set_num_threads(before)
    threads._state.clear()
    threads._state.update(state)


@pytest.fixture
def no_env(monkeypatch):
    for var in (threads.ENV, "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setitem(threads._state, "torch_default", threads.available_cpus())  # torch's own default


def test_an_explicit_count_wins_and_bad_ones_are_refused(restore):
    assert threads.configure(1, quiet=True) == 1 == torch.get_num_threads()
    for bad in (0, -2, 1.5, "2"):
        with pytest.raises(ValueError, match="positive integer"):
            threads.choose(bad)


def test_the_environment_is_respected(restore, no_env, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads.choose() == (1, "from OMP_NUM_THREADS")
    monkeypatch.setenv(threads.ENV, "2")
    assert threads.choose() == (2, f"from {threads.ENV}")
    monkeypatch.setenv(threads.ENV, "many")
    with pytest.raises(ValueError, match="INTERPLAB_THREADS='many'"):
        threads.choose()


def test_at_most_the_physical_cores_and_fewer_on_a_busy_machine(restore, no_env, monkeypatch):
    monkeypatch.setattr(threads, "busy_cores", lambda: 0)
    n, why = threads.choose()
    assert n == min(threads.physical_cores(), threads.available_cpus()) and "physical core" in why
    monkeypatch.setattr(threads, "busy_cores", lambda: 64)
    assert threads.choose()[0] == 1  # every core busy: one thread, never zero


def test_a_count_set_before_import_is_kept(restore, no_env, monkeypatch):
    monkeypatch.setitem(threads._state, "torch_default", 1000)
    assert threads.choose() == (1000, "set with torch.set_num_threads")


def test_it_says_so_once(restore, no_env, capsys):
    threads._state.pop("announced", None)
    threads.configure(quiet=True)
    assert capsys.readouterr().err == ""
    threads.announce()
    threads.announce()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("interplab: torch uses")
    threads.configure(1)  # an explicit call says what it did
    assert "1 thread (asked for" in capsys.readouterr().err
    assert threads.settings()["torch_threads"] == 1


def test_a_load_that_has_just_started_is_seen_at_once(monkeypatch):
    """The 1-minute load average lags; /proc/stat sampled over a short window does not."""
    samples = iter([(100.0, 1000.0), (100.0 + 95.0, 1000.0 + 100.0)])  # 95% of all CPUs busy in the window
    monkeypatch.setattr(threads, "_cpu_times", lambda: next(samples))
    monkeypatch.setattr(threads.time, "sleep", lambda s: None)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    assert threads.busy_now() == pytest.approx(1.9)
    samples = iter([(100.0, 1000.0), (150.0, 1100.0)])  # one of two cores busy
    assert threads.busy_cores() == 1  # the load average alone would say 0
    monkeypatch.setattr(threads, "_cpu_times", lambda: None)  # no /proc: the load average decides
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (1.7, 1.0, 1.0))
    assert threads.busy_cores() == 1
