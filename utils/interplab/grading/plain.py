"""Plain values: the only kind of output a learner's function is judged on.

A plain value is exactly a ``torch.Tensor`` (not a subclass), an ``int``, ``float``,
``bool``, ``str`` or ``None``, or a tuple, list or dict of plain values. The course's own
SAE and transcoder modules (exactly those classes, which exercises such as ``train_sae``
return) become a plain dict of their config, weights, mode and info; `module_from_plain`
rebuilds the module from it in the grader. `to_plain`
turns an output into a fresh plain copy, or raises `WrongType` saying what came back:
a tensor subclass with its own ``__torch_function__`` or an object that lies about its
``__class__`` never reaches a comparison.

`encode`/`decode` carry plain values from the grading worker to the grader without
pickle: a JSON description of the structure plus one safetensors blob of the tensors.
`decode` runs in the grader and builds every value itself, so whatever bytes a
submission manages to send, what comes out is plain data.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from ..dictionaries.config import SAEConfig, TranscoderConfig
from ..dictionaries.modules import SAE, Transcoder

MAX_DEPTH = 20
MAX_ITEMS = 100_000
MAX_STR = 100_000


class WrongType(TypeError):
    """An output that is not a plain value (the message says what it was)."""


def _type_name(x: Any) -> str:
    t = type(x)  # type(), unlike x.__class__, cannot be faked by the object
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def to_plain(x: Any, path: str = "", _depth: int = 0, _count: list | None = None) -> Any:
    """A plain copy of ``x``; raises WrongType for anything else."""
    count = _count if _count is not None else [0]
    count[0] += 1
    if count[0] > MAX_ITEMS or _depth > MAX_DEPTH:
        raise WrongType(f"{path or 'the output'} is nested too deeply or has too many items to be an answer")
    t = type(x)
    where = f" (at {path})" if path else ""
    if t is torch.Tensor or t is torch.nn.Parameter:
        y = torch.Tensor.detach(x)
        if y.layout != torch.strided:
            y = y.to_dense()
        return torch.Tensor.clone(y, memory_format=torch.contiguous_format).cpu()
    if issubclass(t, torch.Tensor):  # a subclass: its methods are the learner's, not torch's
        raise WrongType(
            f"returned a {_type_name(x)}{where}, a subclass of torch.Tensor; return a plain torch.Tensor "
            f"(for example torch.as_tensor(x) or x.detach().clone())"
        )
    if x is None or t is bool or t is str:
        if t is str and len(x) > MAX_STR:
            raise WrongType(f"returned a string of {len(x)} characters{where}; that is too long to be an answer")
        return x
    if t is int:
        return int(x)
    if t is float:
        return float(x)
    if t is tuple or t is list:
        items = [
            to_plain(v, f"{path}[{i}]", _depth + 1, count)
            for i, v in enumerate(list.__iter__(x) if t is list else tuple.__iter__(x))
        ]
        return tuple(items) if t is tuple else items
    if t is dict:
        out = {}
        for k, v in dict.items(x):
            if type(k) not in (str, int, bool) and k is not None:
                raise WrongType(f"returned a dict with a key of type {_type_name(k)}{where}; use str or int keys")
            out[k] = to_plain(v, f"{path}[{k!r}]", _depth + 1, count)
        return out
    if t in _MODULES:
        return _module_to_plain(x, path, _depth, count)
    import numpy as np

    if issubclass(t, (np.ndarray, np.generic)):
        raise WrongType(
            f"returned a numpy {_type_name(x)}{where}; return a torch.Tensor (torch.as_tensor(x)) or, "
            f"for one number, a Python float/int (x.item())"
        )
    raise WrongType(
        f"returned a {_type_name(x)}{where}; an answer must be a torch.Tensor, a number, a bool, a string, "
        f"None, or a tuple/list/dict of these"
    )


# --- the course's dictionary modules -----------------------------------------------------------

_MODULES = {SAE: SAEConfig, Transcoder: TranscoderConfig}  # exact classes: a subclass is not plain
MODULE_KEY = "interplab_module"


def _module_to_plain(x: Any, path: str, depth: int, count: list) -> dict:
    """An SAE or transcoder as {module, cfg, state, training, info}, each part plain."""
    cfg = x.__dict__.get("cfg")
    if type(cfg) is not _MODULES[type(x)]:
        raise WrongType(f"returned a {_type_name(x)} whose cfg is a {_type_name(cfg)}; build it from its own config")
    state = {k: to_plain(v, f"{path}.{k}", depth + 1, count) for k, v in torch.nn.Module.state_dict(x).items()}
    return {
        MODULE_KEY: type(x).__name__,
        "cfg": to_plain(dataclasses.asdict(cfg), f"{path}.cfg", depth + 1, count),
        "state": state,
        "training": to_plain(x.__dict__.get("training", True), f"{path}.training", depth + 1, count),
        "info": to_plain(x.__dict__.get("info", {}), f"{path}.info", depth + 1, count),
    }


def module_from_plain(value: Any) -> Any:
    """The SAE or transcoder a plain dict describes (anything else is returned as it is)."""
    if not (type(value) is dict and value.get(MODULE_KEY) in {c.__name__ for c in _MODULES}):
        return value
    cls = next(c for c in _MODULES if c.__name__ == value[MODULE_KEY])
    cfg = dict(value["cfg"])
    module = cls(_MODULES[cls](**cfg))
    module.load_state_dict(value["state"])
    module.train(bool(value["training"]))
    module.info = value["info"]
    return module


# --- carrying plain values between processes without pickle ------------------------------


def encode(x: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """(JSON-able structure, tensors by key) for a value that `to_plain` already produced."""
    tensors: dict[str, torch.Tensor] = {}

    def enc(v: Any) -> Any:
        t = type(v)
        if t is torch.Tensor:
            key = str(len(tensors))
            tensors[key] = v.contiguous()
            return {"t": "tensor", "k": key}
        if v is None:
            return {"t": "none"}
        if t is bool:
            return {"t": "bool", "v": v}
        if t is int:
            return {"t": "int", "v": str(v)}  # str: JSON readers may round big integers
        if t is float:
            return {"t": "float", "v": repr(v)}  # repr keeps nan/inf and every digit
        if t is str:
            return {"t": "str", "v": v}
        if t is tuple or t is list:
            return {"t": t.__name__, "v": [enc(i) for i in v]}
        if t is dict:
            return {"t": "dict", "v": [[enc(k), enc(i)] for k, i in v.items()]}
        raise WrongType(f"cannot send a {_type_name(v)}")

    return enc(x), tensors


def to_bytes(x: Any) -> tuple[Any, bytes]:
    """The JSON-able description and the safetensors bytes of a plain value."""
    from safetensors.torch import save

    structure, tensors = encode(x)
    return structure, (save(tensors) if tensors else b"")


class ProtocolError(ValueError):
    """Bytes from a worker that do not describe a plain value."""


def decode(structure: Any, blob: bytes) -> Any:
    """Rebuild a plain value in this process from `to_bytes` output (raises ProtocolError if malformed)."""
    from safetensors.torch import load

    try:
        tensors = load(blob) if blob else {}
    except Exception as e:
        raise ProtocolError(f"the tensors sent are not a valid safetensors blob ({e})") from e
    count = [0]

    def dec(s: Any, depth: int) -> Any:
        count[0] += 1
        if depth > MAX_DEPTH + 1 or count[0] > MAX_ITEMS + 1 or type(s) is not dict:
            raise ProtocolError("malformed value description")
        t, v = s.get("t"), s.get("v")
        if t == "tensor":
            key = s.get("k")
            if type(key) is not str or key not in tensors:
                raise ProtocolError("a tensor the description names is missing")
            out = tensors[key]
            if type(out) is not torch.Tensor:
                raise ProtocolError("not a tensor")
            return out
        if t == "none":
            return None
        if t == "bool" and type(v) is bool:
            return v
        if t == "int" and type(v) is str and len(v) < 5000:
            return int(v)
        if t == "float" and type(v) is str and len(v) < 40:
            f = float(v)
            return f if not math.isnan(f) else float("nan")
        if t == "str" and type(v) is str:
            return v
        if t in ("list", "tuple") and type(v) is list:
            items = [dec(i, depth + 1) for i in v]
            return tuple(items) if t == "tuple" else items
        if t == "dict" and type(v) is list:
            out = {}
            for pair in v:
                if type(pair) is not list or len(pair) != 2:
                    raise ProtocolError("malformed dict")
                k = dec(pair[0], depth + 1)
                if type(k) not in (str, int, bool) and k is not None:
                    raise ProtocolError("malformed dict key")
                out[k] = dec(pair[1], depth + 1)
            return out
        raise ProtocolError(f"unknown value kind {str(t)[:40]!r}")

    try:
        return dec(structure, 0)
    except (ValueError, TypeError, RecursionError) as e:
        if isinstance(e, ProtocolError):
            raise
        raise ProtocolError(f"malformed value description ({e})") from e
