"""Hook names: one spelling, TransformerLens's own (`transformer_lens.utils.get_act_name`)."""

from __future__ import annotations

import warnings


def act_name(name: str, layer: int | None = None, layer_type: str | None = None) -> str:
    """The TransformerLens hook name of activation `name` ("resid_pre", "z", "pattern", ...) in block `layer`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from transformer_lens.utils import get_act_name
    return get_act_name(name, layer, layer_type)
