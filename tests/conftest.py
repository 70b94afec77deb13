"""Test-suite set-up: no network, no hub, quiet libraries, and shared fixtures."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

try:
    import fcntl
except ImportError:  # Windows: no bwrap sandbox there, and nothing to lock
    fcntl = None

NETGUARD = Path(__file__).parent / "netguard"
REPO = Path(__file__).resolve().parents[1]

# Every process the suite starts (notebook kernels, CLI runs) inherits these.
os.environ["INTERPLAB_BLOCK_NETWORK"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["MPLBACKEND"] = "Agg"
os.environ["PYTHONPATH"] = os.pathsep.join([str(NETGUARD), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)

# ...and this process too (loaded under its own name: another sitecustomize may exist).
if not hasattr(__import__("socket"), "NetworkBlockedError"):
    import importlib.util

    _spec = importlib.util.spec_from_file_location("interplab_netguard", NETGUARD / "sitecustomize.py")
    _spec.loader.exec_module(importlib.util.module_from_spec(_spec))


SANDBOX_LOCK = Path(tempfile.gettempdir()) / "interplab-sandbox-tests.lock"


@pytest.fixture
def one_sandbox_at_a_time():
    """Hold a machine-wide lock while a test runs submissions in the grading sandbox.

    The sandbox runs a submission as `nobody` and caps that user's process count, so two sandboxes at
    once (one per pytest-xdist worker, or two test runs) could starve each other: a hostile submission
    that forks up to its cap leaves the other none. The test files that use the sandbox take this lock.
    """
    if fcntl is None:
        yield
        return
    with open(SANDBOX_LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def model():
    """The bundled TinyWorld model, loaded once for the whole session."""
    import interplab

    m = interplab.load_model("tinyworld", device="cpu")
    return m


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO
