"""Hook names: one thin wrapper around TransformerLens's `get_act_name`."""

from __future__ import annotations

import warnings


def act_name(name: str, layer: int | None = None, layer_type: str | None = None) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from transformer_lens.utils import get_act_name
    return get_act_name(name, layer, layer_type)
