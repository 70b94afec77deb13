"""Showing what a feature does: the tokens it promotes and its top contexts, as text and HTML."""

from __future__ import annotations

from collections.abc import Sequence

from jaxtyping import Float
from torch import Tensor


def top_tokens(values: Float[Tensor, " d_vocab"], model, n: int = 8) -> tuple[list[str], list[str]]:
    """(the n tokens with the largest values, the n with the smallest), as strings."""
    top = values.topk(n).indices.tolist()
    bottom = (-values).topk(n).indices.tolist()
    return [model.tokenizer.decode([i]) for i in top], [model.tokenizer.decode([i]) for i in bottom]


def context_html(tokens: Sequence[str], values: Sequence[float], center: int, vmax: float, width: int = 12) -> str:
    """One context as HTML: tokens shaded by the feature's activation, the top token underlined."""
    start = max(0, center - width)
    parts = []
    for i in range(start, min(len(tokens), center + 4)):
        a = max(0.0, float(values[i])) / vmax if vmax > 0 else 0.0
        style = f"background: rgba(255, 120, 0, {min(1.0, a):.2f}); padding: 0 2px;"
        if i == center:
            style += " text-decoration: underline; font-weight: bold;"
        tok = str(tokens[i]).replace("<", "&lt;").replace(">", "&gt;")
        parts.append(f'<span style="{style}" title="{float(values[i]):.2f}">{tok}</span>')
    return " ".join(parts)
