"""Comparing a learner's output with the reference's: type, shape, dtype, device, then values.

`compare(expected, got, rtol, atol)` returns None when they agree, or a short
message saying the first way they differ, written for a learner: what was expected,
what came back, and where the values differ.
"""

from __future__ import annotations

import math
from typing import Any

import torch

# Default tolerances by dtype: (rtol, atol).
TOLERANCES = {
    torch.float64: (1e-7, 1e-9),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (2e-2, 1e-2),
}


def tolerances(dtype: torch.dtype, rtol: float | None = None, atol: float | None = None) -> tuple[float, float]:
    r, a = TOLERANCES.get(dtype, (0.0, 0.0))
    return (r if rtol is None else rtol, a if atol is None else atol)


def describe(x: Any) -> str:
    """A short description of a value: type, shape and dtype for tensors."""
    if isinstance(x, torch.Tensor):
        return f"Tensor(shape={tuple(x.shape)}, dtype={x.dtype}, device={x.device.type})"
    if isinstance(x, (tuple, list)):
        inner = ", ".join(describe(v) for v in list(x)[:4])
        return f"{type(x).__name__} of {len(x)}: [{inner}{', ...' if len(x) > 4 else ''}]"
    if isinstance(x, dict):
        return f"dict with keys {sorted(map(str, x))[:8]}"
    r = repr(x)
    return f"{type(x).__name__} {r if len(r) < 60 else r[:57] + '...'}"


def _fmt(v: Any, floating: bool) -> str:
    return f"{v:.4g}" if floating else str(v)


def _window(e: torch.Tensor, g: torch.Tensor, idx: tuple[int, ...], radius: int = 2) -> str:
    """The expected and the returned entries around ``idx`` along the last dimension."""
    if e.dim() == 0:
        return f":\n    expected {_fmt(e.item(), e.is_floating_point())}\n    got      {_fmt(g.item(), g.is_floating_point())}"
    last = idx[-1]
    lo, hi = max(0, last - radius), min(e.shape[-1], last + radius + 1)
    row = idx[:-1]
    where = "[" + ", ".join([*map(str, row), f"{lo}:{hi}"]) + "]"
    ev = e[row][lo:hi].tolist()
    gv = g[row][lo:hi].tolist()
    fe, fg = e.is_floating_point(), g.is_floating_point()
    return (
        f" at {where}:\n    expected [{', '.join(_fmt(v, fe) for v in ev)}]\n"
        f"    got      [{', '.join(_fmt(v, fg) for v in gv)}]"
    )


def _degenerate(e: torch.Tensor, g: torch.Tensor) -> str | None:
    """A note when the learner's output is all NaN, all zero or all one value while the expected one is not."""
    if g.numel() < 2:
        return None
    if g.is_floating_point() and bool(torch.isnan(g).all()) and not bool(torch.isnan(e).all()):
        return "every value you returned is NaN"
    if bool((g == 0).all()) and not bool((e == 0).all()):
        return "every value you returned is 0 (is something not computed, or multiplied by a zero mask?)"
    if bool((g == g.flatten()[0]).all()) and not bool((e == e.flatten()[0]).all()):
        return f"every value you returned is the same ({_fmt(g.flatten()[0].item(), g.is_floating_point())})"
    return None


def _where(idx: tuple[int, ...]) -> str:
    return "[" + ", ".join(map(str, idx)) + "]"


def _family(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_floating_point:
        return "float"
    if dtype.is_complex:
        return "complex"
    return "integer"


FAMILY_WORDS = {
    "bool": "a bool mask",
    "float": "a floating-point tensor",
    "integer": "an integer tensor",
    "complex": "a complex tensor",
}


def compare_tensors(expected: torch.Tensor, got: Any, rtol: float | None, atol: float | None, path: str) -> str | None:
    """Shape, dtype family, device, then values.

    The course's dtype policy: a floating output may be any floating dtype of at least float32
    precision and is judged at the looser of the two dtypes' tolerances (a float64 implementation
    passes a float32 reference); an integer output may be any integer dtype; a mask must be bool.
    """
    if not isinstance(got, torch.Tensor):
        return f"{path}expected a torch.Tensor, got {describe(got)}"
    if got.shape != expected.shape:
        return (
            f"{path}wrong shape: expected {tuple(expected.shape)}, got {tuple(got.shape)}. "
            f"Check which dimensions you reduce over, index or keep."
        )
    fam_e, fam_g = _family(expected.dtype), _family(got.dtype)
    if fam_e != fam_g:
        return f"{path}wrong dtype: expected {FAMILY_WORDS[fam_e]} (like {expected.dtype}), got {got.dtype}"
    if fam_e == "float" and got.dtype in (torch.float16, torch.bfloat16) and got.dtype != expected.dtype:
        return f"{path}wrong dtype: {got.dtype} loses precision; compute in float32 (or float64)"
    if got.device.type != expected.device.type:
        return f"{path}wrong device: expected {expected.device.type}, got {got.device.type}"
    e, g = expected.detach().cpu(), got.detach().cpu()
    if fam_e in ("float", "complex"):
        bad_nan = torch.isnan(g) & ~torch.isnan(e)
        if bad_nan.any():
            idx = tuple(int(i) for i in bad_nan.nonzero()[0])
            return (
                f"{path}your output has NaN at {_where(idx)} ({int(bad_nan.sum())} NaN values) where the "
                f"reference has numbers"
            )
        r1, a1 = tolerances(e.dtype, rtol, atol)
        r2, a2 = tolerances(g.dtype, rtol, atol)
        common = torch.promote_types(e.dtype, g.dtype)
        e, g = e.to(common), g.to(common)
        close = torch.isclose(g, e, rtol=max(r1, r2), atol=max(a1, a2), equal_nan=True)
    else:
        close = g == e
    if bool(close.all()):
        return None
    bad = ~close
    first = tuple(int(i) for i in bad.nonzero()[0])
    n_bad = int(bad.sum())
    lines = [f"{path}values differ at {n_bad} of {e.numel()} positions", "  first difference" + _window(e, g, first)]
    if fam_e in ("float", "complex"):
        gap = (g - e).abs().masked_fill(~bad, 0)
        gap = torch.nan_to_num(gap, nan=float("inf"))
        largest = tuple(int(i) for i in torch.unravel_index(gap.flatten().argmax(), gap.shape)) if gap.dim() else ()
        if largest != first:
            lines.append("  largest difference" + _window(e, g, largest))
    note = _degenerate(e, g)
    if note:
        lines.append(f"  note: {note}")
    return "\n".join(lines)


def _item_path(path: str, i: int, names: tuple[str, ...] | None) -> str:
    if names is not None and i < len(names):
        return f"{path}item {i} (`{names[i]}`): "
    return f"{path}item {i}: "


def compare(
    expected: Any,
    got: Any,
    rtol: float | None = None,
    atol: float | None = None,
    path: str = "",
    names: tuple[str, ...] | None = None,
) -> str | None:
    """None if ``got`` matches ``expected``, else a message describing the first difference.

    ``names`` gives a tuple output's items the names the docstring uses, for the messages.
    """
    if isinstance(expected, torch.Tensor):
        return compare_tensors(expected, got, rtol, atol, path)
    if isinstance(expected, bool) or expected is None:
        if got is expected or (isinstance(got, bool) and got == expected):
            return None
        return f"{path}expected {expected!r}, got {describe(got)}"
    if isinstance(expected, (int, float)):
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            return f"{path}expected a Python number, got a one-element tensor; use .item()"
        if not isinstance(got, (int, float)) or isinstance(got, bool):
            return f"{path}expected a number ({type(expected).__name__}), got {describe(got)}"
        if isinstance(got, float) and math.isnan(got) and not (isinstance(expected, float) and math.isnan(expected)):
            return f"{path}your output is NaN; expected {expected:.6g}"
        r, a = tolerances(torch.float32, rtol, atol)
        if math.isclose(got, expected, rel_tol=r, abs_tol=a) or (math.isnan(got) and math.isnan(expected)):
            return None
        return f"{path}expected {expected:.6g}, got {got:.6g}"
    if isinstance(expected, (tuple, list)):
        if not isinstance(got, (tuple, list)):
            return f"{path}expected a {type(expected).__name__} of {len(expected)}, got {describe(got)}"
        if len(got) != len(expected):
            what = f" ({', '.join(names)})" if names is not None and len(names) == len(expected) else ""
            return f"{path}expected {len(expected)} items{what}, got {len(got)}"
        for i, (e, g) in enumerate(zip(expected, got)):
            msg = compare(e, g, rtol, atol, path=_item_path(path, i, names))
            if msg:
                return msg
        return None
    if isinstance(expected, dict):
        if not isinstance(got, dict):
            return f"{path}expected a dict, got {describe(got)}"
        if set(got) != set(expected):
            missing, extra = set(expected) - set(got), set(got) - set(expected)
            parts = []
            if missing:
                parts.append(f"missing keys {sorted(map(str, missing))}")
            if extra:
                parts.append(f"unexpected keys {sorted(map(str, extra))}")
            return f"{path}expected keys {sorted(map(str, expected))}: {'; '.join(parts)}"
        for k in expected:
            msg = compare(expected[k], got[k], rtol, atol, path=f"{path}[{k!r}]: ")
            if msg:
                return msg
        return None
    if expected == got:
        return None
    return f"{path}expected {describe(expected)}, got {describe(got)}"


def matches(a: Any, b: Any, rtol: float | None = None, atol: float | None = None) -> bool:
    """Whether two outputs agree (used to recognise a known mistake in a learner's output)."""
    try:
        return compare(a, b, rtol, atol) is None
    except Exception:
        return False
