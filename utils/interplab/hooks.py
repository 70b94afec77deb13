"""Hook names, from TransformerLens's own `get_act_name`, so that no module spells them by hand.

    >>> act_name("resid_post", 1)
    'blocks.1.hook_resid_post'
    >>> act_name("normalized", 0, "ln2")
    'blocks.0.ln2.hook_normalized'

TransformerLens 3 keeps `get_act_name` in `transformer_lens.utilities` (its old home,
`transformer_lens.utils`, warns that it is deprecated).
"""

from __future__ import annotations

try:
    from transformer_lens.utilities import get_act_name
except ImportError:  # older TransformerLens 3.x releases keep it only in utils
    from transformer_lens.utils import get_act_name


def act_name(name: str, layer: int | None = None, layer_type: str | None = None) -> str:
    """The full hook name of an activation: ``act_name("z", 2)`` is ``"blocks.2.attn.hook_z"``."""
    return get_act_name(name, layer, layer_type)


def layer_of(hook: str) -> int | None:
    """The block index of a hook name (``blocks.2.attn.hook_z`` -> 2); None for hooks outside the blocks."""
    parts = hook.split(".")
    return int(parts[1]) if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit() else None
