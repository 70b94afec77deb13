"""interplab: a hands-on curriculum in mechanistic interpretability.

The package behind the course's notebooks:

- `load_model` - the bundled TinyWorld model (offline) or a TransformerLens model.
- `tinyworld` - the synthetic language: generator, annotations, tokenizer, training, evaluation.
- `activations`, `activation_store` - activations in memory (batched) and on disk.
- `hooks` - hook names (TransformerLens's `get_act_name`).
- the library side of each method: `prompts` (chapter 00), `probes` (01), `lenses` (02),
  `superposition` (03), `dictionaries` (SAEs, transcoders and cross-layer transcoders: 04, 05, 08),
  `pairs`, `patching`, `circuits` (06), `discovery`, `alignment` (07), `attribution`, `graph_view` (08).
- `artifacts` - everything trained on the bundled model; `interplab rebuild`.
- `check`, `show_solution` - grading of exercises in notebooks (`grading` for the rest).
- `threads` - torch's thread count for this machine and its load (set on import).
- `plotting` - figures, and circuitsvis attention views that work offline.
"""

from __future__ import annotations

__version__ = "0.1.0"

import os as _os

from .progress import progress, quiet_tqdm

quiet_tqdm()  # before any module imports tqdm.auto: no "IProgress not found" warning in notebooks

from . import threads  # noqa: E402
from .models import best_device, is_tinyworld, load_model, tinyworld_only  # noqa: E402

if _os.environ.get(threads.ENV, "").strip().lower() != "off":
    threads.configure(quiet=True)  # at most the free physical cores; the first load_model says what it chose


def check(fn, name=None, strict=None):
    """Check your exercise function; see `interplab.grading.check`."""
    from .grading import check as _check  # lazy: `import interplab` stays light until a check runs

    return _check(fn, name=name, strict=strict)


def show_solution(name):
    """Print the reference solution of an exercise; see `interplab.grading.show_solution`."""
    from .grading import show_solution as _show  # lazy, as in check

    return _show(name)


__all__ = [
    "progress",
    "load_model",
    "best_device",
    "is_tinyworld",
    "tinyworld_only",
    "check",
    "show_solution",
    "__version__",
]
