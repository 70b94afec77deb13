"""Progress bars for long notebook cells: `progress(iterable, total=None, desc=None)`.

The bar is tqdm's: a widget where Jupyter widgets are available (Colab, a JupyterLab with
ipywidgets), text on stderr everywhere else (JupyterLab without ipywidgets, nbclient runs,
a terminal). Without ipywidgets, ``tqdm.auto`` warns "IProgress not found" on import; that
warning says nothing a learner can act on, so the package silences it (see `quiet_tqdm`)
before anything imports tqdm.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any


def quiet_tqdm() -> None:
    """Silence tqdm's import-time warnings about notebook widgets (called when interplab is imported)."""
    try:
        from tqdm import TqdmExperimentalWarning, TqdmWarning
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return
    warnings.filterwarnings("ignore", message="IProgress not found", category=TqdmWarning)
    warnings.filterwarnings("ignore", category=TqdmExperimentalWarning)


def progress(
    iterable: Iterable | None = None,
    total: int | None = None,
    desc: str | None = None,
    *,
    leave: bool = True,
    disable: bool = False,
    **kwargs: Any,
):
    """A progress bar over ``iterable`` (or a manual one with ``total`` and ``.update(n)``).

    Use it for every loop in a notebook cell that may run for more than a few seconds, so a
    learner on a slow or shared machine sees that work is going on.
    """
    quiet_tqdm()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=leave, disable=disable, **kwargs)
