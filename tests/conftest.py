"""Test-suite set-up: no network, no hub, quiet libraries, and shared fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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


# Tests that run submissions in the grading sandbox. The sandbox runs them as `nobody` and limits
# that user's process count, so two sandboxes at once (one per pytest-xdist worker) could starve each
# other: `--dist loadgroup` (what `./course test` passes) keeps these on one worker, one at a time.
SANDBOX_FILES = {"test_grading.py", "test_grading_hostile.py", "test_gradebook.py"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in SANDBOX_FILES:
            item.add_marker(pytest.mark.xdist_group("sandbox"))


@pytest.fixture(scope="session")
def model():
    """The bundled TinyWorld model, loaded once for the whole session."""
    import interplab

    m = interplab.load_model("tinyworld", device="cpu")
    return m


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO
