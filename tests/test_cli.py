"""The interplab command: doctor and lab."""

import subprocess
import sys

import pytest


def run(*args):
    return subprocess.run([sys.executable, "-m", "interplab.cli", *args], capture_output=True, text=True, timeout=300)


def test_doctor_verifies_bundled_files_and_reports_the_hub():
    r = run("doctor")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "files verified (sha256)" in r.stdout
    assert "not reachable" in r.stdout  # the suite blocks the network
    assert "transformer_lens" in r.stdout and "all good" in r.stdout


def test_lab_opens_jupyterlab_on_the_chapters(repo):
    r = run("lab", "--print-command")
    assert r.returncode == 0
    assert "jupyterlab" in r.stdout and str(repo / "chapters") in r.stdout


def test_lab_passes_jupyter_options_through():
    r = run("lab", "--print-command", "--no-browser", "--port", "8890")
    assert r.returncode == 0 and "--no-browser --port 8890" in r.stdout


def test_bench_options_reach_the_bench_parser(capsys):
    """`interplab bench --quick --only X`: the options go to bench's own parser, which names the bad section."""
    from interplab import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--quick", "--only", "no-such-section"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown sections" in err and "unrecognized arguments" not in err
