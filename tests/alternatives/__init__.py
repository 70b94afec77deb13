"""Correct implementations of every exercise, written differently from the answer key.

One module per chapter, ``chNN_slug.py`` (more modules may share the prefix, e.g.
``chNN_slug_more.py``), each defining ``ALTERNATIVES: dict[str, list[Callable]]``: for every
exercise of the chapter, at least two functions that the checks must accept (another algorithm,
float64 inside, loops instead of vectorised code, another valid random draw). They prove that
the checks test the contract rather than one way of meeting it; `tests/test_alternatives.py`
runs them.
"""
