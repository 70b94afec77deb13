"""The `course` launcher: the README's two commands (`./course lab`, `./course test`).

The set-up logic is tested with a fake installer (no pip runs in the suite); the lab test starts
JupyterLab through the launcher for real, on a free loopback port, and stops it again.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COURSE = REPO / "course"


def _load_launcher():
    loader = importlib.machinery.SourceFileLoader("course_launcher", str(COURSE))
    spec = importlib.util.spec_from_loader("course_launcher", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


course = _load_launcher()


@pytest.fixture(autouse=True)
def _setup_allowed(monkeypatch):
    """The launcher's own tests decide whether set-up may run (the suite itself may run under INTERPLAB_NO_SETUP=1)."""
    monkeypatch.delenv("INTERPLAB_NO_SETUP", raising=False)


class ThisPythonEnv(course.Env):
    """An environment whose Python is the one running the tests (which has everything), with its stamp in tmp."""

    @property
    def python(self) -> Path:
        return Path(sys.executable)


def _python_version() -> list:
    return list(sys.version_info[:2])


class Installs:
    """A fake installer that records its calls and writes the stamp, as the real one does at its end."""

    def __init__(self):
        self.calls = 0

    def __call__(self, env, force=False):
        self.calls += 1
        course.write_stamp(env, _python_version())


def _course_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("course:")]


def test_the_launcher_is_an_executable_python3_script():
    assert COURSE.read_text().startswith("#!/usr/bin/env python3\n")
    assert os.access(COURSE, os.X_OK), "course must be executable (git update-index --chmod=+x course)"


def test_a_valid_stamp_means_no_install_step(tmp_path, capsys):
    env = ThisPythonEnv(tmp_path, own=True, why="test")
    course.write_stamp(env, _python_version())
    installer = Installs()
    assert course.diagnose(env) is None
    assert course.ensure(env, installer=installer) is False
    assert installer.calls == 0
    assert capsys.readouterr().out == ""  # a ready environment starts silently


def test_set_up_runs_once_then_never_again(tmp_path, capsys):
    env = ThisPythonEnv(tmp_path, own=True, why="test")
    installer = Installs()
    assert course.ensure(env, installer=installer) is True
    lines = _course_lines(capsys.readouterr().out)
    assert len(lines) == 1 and "was not set up by this course yet" in lines[0], lines
    for _ in range(2):
        assert course.ensure(env, installer=installer) is False
    assert installer.calls == 1
    assert course.ensure(env, force=True, installer=installer) is True  # ./course setup --force
    assert installer.calls == 2


def test_main_skips_the_installer_when_ready(tmp_path, monkeypatch, capsys):
    env = ThisPythonEnv(tmp_path, own=True, why="test")
    course.write_stamp(env, _python_version())
    monkeypatch.setattr(course, "choose_env", lambda: env)

    def must_not_run(env, force=False):
        raise AssertionError("the installer ran although the stamp was valid")

    monkeypatch.setattr(course, "install", must_not_run)
    assert course.main(["setup"]) == 0
    assert "already set up" in capsys.readouterr().out


@pytest.mark.parametrize(
    "stamp, reason",
    [
        ("{not json", "has no valid set-up stamp"),
        (
            json.dumps({"inputs": "0" * 64, "root": str(REPO), "python": list(sys.version_info[:2])}),
            "pyproject.toml or the set-up recipe changed",
        ),
        ("OTHER_ROOT", "was set up for another clone or another Python"),
    ],
)
def test_a_broken_or_stale_stamp_is_repaired_with_one_line(tmp_path, capsys, stamp, reason):
    env = ThisPythonEnv(tmp_path, own=True, why="test")
    if stamp == "OTHER_ROOT":
        stamp = json.dumps(
            {"inputs": course.inputs_hash(), "root": "/elsewhere/interplab", "python": _python_version()}
        )
    env.stamp.write_text(stamp)
    installer = Installs()
    assert course.ensure(env, installer=installer) is True
    lines = _course_lines(capsys.readouterr().out)
    assert len(lines) == 1 and reason in lines[0] and lines[0].endswith("repairing it"), lines
    assert installer.calls == 1 and course.diagnose(env) is None


def test_a_venv_without_python_is_repaired_with_one_line(tmp_path, capsys):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("home = /nowhere\n")
    env = course.Env(venv, own=True, why="test")
    assert "has no Python" in course.diagnose(env)
    installer = Installs()
    assert course.ensure(env, installer=installer) is True
    lines = _course_lines(capsys.readouterr().out)
    assert len(lines) == 1 and "has no Python" in lines[0], lines


def test_no_environment_yet_says_it_sets_up_once(tmp_path, capsys):
    env = course.Env(tmp_path / "venv", own=True, why="test")
    assert course.ensure(env, installer=lambda env, force=False: None) is True
    lines = _course_lines(capsys.readouterr().out)
    assert len(lines) == 1 and "no environment yet" in lines[0] and "once" in lines[0], lines


def test_the_quick_check_finds_this_environment_complete():
    info = course.probe(ThisPythonEnv(Path("."), own=True, why="test"))
    assert info is not None and info["python"][:2] == _python_version()
    assert all(info["found"][name] for name in course.NEEDED), info
    assert course.check_packages(info) is None


def test_the_quick_check_names_what_is_missing_or_wrong():
    good = course.probe(ThisPythonEnv(Path("."), own=True, why="test"))
    missing = json.loads(json.dumps(good))
    missing["found"]["jupyterlab"] = None
    assert course.check_packages(missing) == "jupyterlab cannot be imported"
    old_torch = dict(good, torch="2.3.1")
    assert "torch 2.3.1 is outside" in course.check_packages(old_torch)
    elsewhere = json.loads(json.dumps(good))
    elsewhere["found"]["interplab"] = "/elsewhere/utils/interplab/__init__.py"
    assert "not this clone" in course.check_packages(elsewhere)
    old_python = dict(good, python=[3, 9, 18])
    assert "needs 3.10 or newer" in course.check_packages(old_python)


def test_the_stamp_follows_pyproject(tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'a'\n")
    monkeypatch.setattr(course, "ROOT", tmp_path)
    first = course.inputs_hash()
    assert course.inputs_hash() == first
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'a'\ndependencies = ['numpy']\n")
    assert course.inputs_hash() != first


def test_active_environments_are_respected_except_conda_base(tmp_path):
    own = course.ROOT / ".venv"
    assert course.choose_env({}).prefix == own and course.choose_env({}).own
    chosen = course.choose_env({"VIRTUAL_ENV": str(tmp_path / "myenv")})
    assert chosen.prefix == tmp_path / "myenv" and not chosen.own
    chosen = course.choose_env({"VIRTUAL_ENV": str(own)})  # the course's own venv, activated: still ours
    assert chosen.own
    chosen = course.choose_env({"CONDA_PREFIX": str(tmp_path / "envs" / "interplab"), "CONDA_DEFAULT_ENV": "interplab"})
    assert chosen.prefix == tmp_path / "envs" / "interplab" and not chosen.own
    chosen = course.choose_env({"CONDA_PREFIX": str(tmp_path / "miniconda3"), "CONDA_DEFAULT_ENV": "base"})
    assert chosen.own  # never install the course into conda's base environment
    assert course.choose_env({"INTERPLAB_VENV": str(tmp_path / "v")}).prefix == tmp_path / "v"


def _launcher_env(**extra) -> dict:
    """Run the launcher on the environment running these tests, never installing anything."""
    env = dict(os.environ, VIRTUAL_ENV=sys.prefix, INTERPLAB_NO_SETUP="1")
    env.update(extra)
    return env


def test_a_broken_environment_is_reported_in_one_line_by_the_command(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("home = /nowhere\n")
    env = dict(os.environ, INTERPLAB_VENV=str(venv), INTERPLAB_NO_SETUP="1")
    env.pop("VIRTUAL_ENV", None)
    env.pop("CONDA_PREFIX", None)
    r = subprocess.run(
        [sys.executable, str(COURSE), "test"], check=False, env=env, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "has no Python" in r.stderr and "INTERPLAB_NO_SETUP" in r.stderr, r.stderr


def test_unknown_setup_options_are_refused():
    r = subprocess.run(
        [sys.executable, str(COURSE), "setup", "--frce"],
        check=False,
        env=_launcher_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "--frce" in r.stderr


def test_course_test_runs_pytest_in_the_clone_and_passes_arguments(tmp_path):
    r = subprocess.run(
        [sys.executable, str(COURSE), "test", "--collect-only", "-q", "tests/test_cli.py"],
        check=False,
        cwd=tmp_path,
        env=_launcher_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "tests/test_cli.py::test_lab_opens_jupyterlab_on_the_chapters" in r.stdout


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_group(proc: subprocess.Popen) -> None:
    """Stop the launcher's process group (JupyterLab and anything it started): TERM, then KILL."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=15)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.mark.skipif(os.name == "nt", reason="process groups are POSIX")
def test_course_lab_opens_jupyterlab_on_the_chapters(tmp_path):
    port, token = _free_port(), "interplab-test-token"
    env = _launcher_env(
        JUPYTER_TOKEN=token, JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"), JUPYTER_CONFIG_DIR=str(tmp_path / "config")
    )
    cmd = [
        sys.executable,
        str(COURSE),
        "lab",
        "--no-browser",
        "--port",
        str(port),
        "--ServerApp.port_retries=0",
        "--ServerApp.ip=127.0.0.1",
    ]
    log = tmp_path / "lab.log"
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    url = f"http://127.0.0.1:{port}/api/contents?token={token}"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        listing, deadline = None, time.monotonic() + 60
        while listing is None and time.monotonic() < deadline:
            assert proc.poll() is None, f"course lab exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            try:
                with no_proxy.open(url, timeout=5) as resp:
                    assert resp.status == 200
                    listing = json.loads(resp.read())
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        assert listing is not None, (
            f"JupyterLab did not answer on 127.0.0.1:{port} within 60 s:\n{log.read_text()[-3000:]}"
        )
        names = {item["name"] for item in listing["content"]}
        assert "00_orientation.ipynb" in names, names  # it serves the chapters folder
        with no_proxy.open(f"http://127.0.0.1:{port}/lab?token={token}", timeout=10) as resp:
            assert resp.status == 200 and b"JupyterLab" in resp.read()
    finally:
        _stop_group(proc)
    deadline = time.monotonic() + 10  # killed processes leave the group once reaped
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _group_alive(proc.pid), "something the lab command started is still running"


def test_course_test_spreads_the_suite_over_the_cores_unless_told_otherwise():
    launcher = _load_launcher()
    assert launcher.parallel_args([], 2, True) == ["-n", "2"]
    assert launcher.parallel_args(["tests/test_cli.py"], 16, True)[:2] == ["-n", str(launcher.MAX_WORKERS)]
    for chosen in (["-n", "3"], ["-n0"], ["--numprocesses=2"], ["-p", "no:xdist"], ["--pdb"], ["--dist", "load"]):
        assert launcher.parallel_args(chosen, 2, True) == [], chosen
    assert launcher.parallel_args([], 1, True) == []
    assert launcher.parallel_args([], 8, False) == []
