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


def _preview(t: torch.Tensor, n: int = 6) -> str:
    flat = t.detach().flatten()[:n].tolist()
    if t.dtype.is_floating_point:
        body = ", ".join(f"{v:.4g}" for v in flat)
    else:
        body = ", ".join(str(v) for v in flat)
    return f"[{body}{', ...' if t.numel() > n else ''}]"


def _where(idx: tuple[int, ...]) -> str:
    return "[" + ", ".join(map(str, idx)) + "]"


def compare_tensors(expected: torch.Tensor, got: Any, rtol: float | None, atol: float | None, path: str) -> str | None:
    if not isinstance(got, torch.Tensor):
        return f"{path}expected a torch.Tensor, got {describe(got)}"
    if got.shape != expected.shape:
        return (
            f"{path}wrong shape: expected {tuple(expected.shape)}, got {tuple(got.shape)}. "
            f"Check which dimensions you reduce over, index or keep."
        )
    if got.dtype != expected.dtype:
        return f"{path}wrong dtype: expected {expected.dtype}, got {got.dtype}"
    if got.device.type != expected.device.type:
        return f"{path}wrong device: expected {expected.device.type}, got {got.device.type}"
    e, g = expected.detach().cpu(), got.detach().cpu()
    if g.dtype.is_floating_point or g.is_complex():
        bad_nan = torch.isnan(g) & ~torch.isnan(e)
        if bad_nan.any():
            idx = tuple(int(i) for i in bad_nan.nonzero()[0])
            return f"{path}your output has NaN at {_where(idx)} ({int(bad_nan.sum())} NaN values) where the reference has numbers"
        r, a = tolerances(e.dtype, rtol, atol)
        close = torch.isclose(g, e, rtol=r, atol=a, equal_nan=True)
    else:
        close = g == e
    if bool(close.all()):
        return None
    idx = tuple(int(i) for i in (~close).nonzero()[0])
    n_bad = int((~close).sum())
    msg = (
        f"{path}values differ at {n_bad} of {e.numel()} positions; first at {_where(idx)}: "
        f"expected {e[idx].item():.6g}, got {g[idx].item():.6g}\n"
        f"    expected {_preview(e)}\n    got      {_preview(g)}"
    )
    return msg


def compare(
    expected: Any, got: Any, rtol: float | None = None, atol: float | None = None, path: str = ""
) -> str | None:
    """None if ``got`` matches ``expected``, else a message describing the first difference."""
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
            return f"{path}expected {len(expected)} items, got {len(got)}"
        for i, (e, g) in enumerate(zip(expected, got)):
            msg = compare(e, g, rtol, atol, path=f"{path}item {i}: ")
            if msg:
                return msg
        return None
    if isinstance(expected, dict):
        if not isinstance(got, dict):
            return f"{path}expected a dict, got {describe(got)}"
        if set(got) != set(expected):
            return f"{path}expected keys {sorted(map(str, expected))}, got {sorted(map(str, got))}"
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
