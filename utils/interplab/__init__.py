"""interplab: a hands-on curriculum in mechanistic interpretability.

The package behind the course's notebooks:

- `load_model` - the bundled TinyWorld model (offline) or a TransformerLens model.
- `tinyworld` - the synthetic language: generator, annotations, tokenizer, training, evaluation.
- `activations` - batched, memory-bounded activation collection.
- `check`, `show_solution` - grading of exercises in notebooks (`grading` for the rest).
- `plotting` - figures, and circuitsvis attention views that work offline.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .models import best_device, is_tinyworld, load_model, tinyworld_only


def check(fn, name=None, strict=None):
    """Check your exercise function; see `interplab.grading.check`."""
    from .grading import check as _check

    return _check(fn, name=name, strict=strict)


def show_solution(name):
    """Print the reference solution of an exercise; see `interplab.grading.show_solution`."""
    from .grading import show_solution as _show

    return _show(name)


__all__ = ["load_model", "best_device", "is_tinyworld", "tinyworld_only", "check", "show_solution", "__version__"]
