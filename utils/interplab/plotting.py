"""Figures for the chapters: matplotlib plots, and circuitsvis attention views that work offline.

circuitsvis ships its JavaScript inside the Python package, but its default HTML
first checks whether google.com answers (a one-second wait, or a hang behind some
firewalls) and then loads the JavaScript from a CDN. `attention_heads` here always
inlines the bundled JavaScript (no network at all) and also carries a matplotlib
picture, so a front end that cannot run the JavaScript still shows the patterns.
"""

from __future__ import annotations

import base64
import io
from typing import Sequence

import torch


def _to_numpy(x):
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    import numpy as np

    return np.asarray(x, dtype=float)


def heads_figure(pattern, tokens: Sequence[str], head_names: Sequence[str] | None = None, max_cols: int = 4):
    """A matplotlib figure of attention patterns [head, query, key], one panel per head."""
    import matplotlib.pyplot as plt

    p = _to_numpy(pattern)
    if p.ndim == 2:
        p = p[None]
    n = p.shape[0]
    cols = min(n, max_cols)
    rows = (n + cols - 1) // cols
    size = max(2.5, 0.22 * len(tokens))
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.axis("off")
            continue
        ax.imshow(p[i], cmap="Blues", vmin=0, vmax=1)
        ax.set_title(head_names[i] if head_names else f"head {i}", fontsize=9)
        ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=6)
        ax.set_yticks(range(len(tokens)), tokens, fontsize=6)
        ax.set_xlabel("key (attended to)", fontsize=7)
        ax.set_ylabel("query", fontsize=7)
    fig.tight_layout()
    return fig


class AttentionView:
    """Attention patterns that render as interactive circuitsvis HTML (offline) or as a PNG."""

    def __init__(self, pattern, tokens: Sequence[str], head_names: Sequence[str] | None = None):
        self.pattern = pattern.detach().float().cpu() if isinstance(pattern, torch.Tensor) else torch.tensor(pattern)
        if self.pattern.ndim == 2:
            self.pattern = self.pattern[None]
        self.tokens = [str(t) for t in tokens]
        if self.pattern.shape[-1] != len(self.tokens) or self.pattern.shape[-2] != len(self.tokens):
            raise ValueError(f"pattern is {tuple(self.pattern.shape)} but there are {len(self.tokens)} tokens; "
                             f"pass one layer's pattern for one prompt: [head, query, key]")
        self.head_names = list(head_names) if head_names else [f"head {i}" for i in range(self.pattern.shape[0])]

    def html(self) -> str:
        """circuitsvis's attention_heads view with its bundled JavaScript inlined (no network)."""
        from circuitsvis.utils.render import render_local

        return render_local("AttentionHeads", attention=self.pattern.tolist(), tokens=self.tokens,
                            attentionHeadNames=self.head_names)

    def png(self) -> bytes:
        import matplotlib.pyplot as plt

        fig = heads_figure(self.pattern, self.tokens, self.head_names)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
        plt.close(fig)
        return buf.getvalue()

    def _repr_mimebundle_(self, include=None, exclude=None):
        bundle = {"text/plain": f"<attention patterns: {len(self.head_names)} heads x {len(self.tokens)} tokens>"}
        try:
            bundle["text/html"] = self.html()
        except Exception:  # circuitsvis missing or broken: the picture still shows
            pass
        bundle["image/png"] = base64.b64encode(self.png()).decode()
        return bundle


def attention_heads(pattern, tokens: Sequence[str], head_names: Sequence[str] | None = None,
                    backend: str = "auto"):
    """Show attention patterns [head, query, key] of one prompt.

    backend: "auto" (interactive HTML, with a picture as fallback), "html", or "matplotlib".
    """
    view = AttentionView(pattern, tokens, head_names)
    if backend == "matplotlib":
        return heads_figure(view.pattern, view.tokens, view.head_names)
    if backend == "html":
        from IPython.display import HTML

        return HTML(view.html())
    if backend != "auto":
        raise ValueError(f"backend must be 'auto', 'html' or 'matplotlib', not {backend!r}")
    return view


def heatmap(values, xlabels: Sequence[str], ylabels: Sequence[str], title: str = "", cmap: str = "RdBu",
            center: bool = True, xlabel: str = "", ylabel: str = "", fmt: str | None = None):
    """A labelled heat map (e.g. patching results by layer and position, or by layer and head)."""
    import matplotlib.pyplot as plt

    v = _to_numpy(values)
    fig, ax = plt.subplots(figsize=(max(4, 0.45 * len(xlabels) + 2), max(2.5, 0.4 * len(ylabels) + 1.5)))
    lim = abs(v).max() if center else None
    im = ax.imshow(v, cmap=cmap, vmin=-lim if center else None, vmax=lim, aspect="auto")
    ax.set_xticks(range(len(xlabels)), xlabels, rotation=90 if max(map(len, map(str, xlabels))) > 3 else 0, fontsize=8)
    ax.set_yticks(range(len(ylabels)), ylabels, fontsize=8)
    if fmt:
        for i in range(v.shape[0]):
            for j in range(v.shape[1]):
                ax.text(j, i, format(v[i, j], fmt), ha="center", va="center", fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    return fig
