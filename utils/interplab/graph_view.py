"""Seeing an attribution graph: an interactive view that works offline, and a matplotlib picture.

    view = graph_view(data)       # data: circuit-tracer graph JSON (`interplab.attribution.to_circuit_tracer_json`)
    view                          # in Jupyter: the interactive HTML (and a PNG as fallback)
    graph_view(data, backend="matplotlib")

The HTML is self-contained: an SVG drawn by a few lines of JavaScript inlined in the page (no
network, no CDN). Nodes sit at (token position, layer); hovering a node shows its label,
activation and influence; clicking it keeps only its edges in view. Supernodes (qParams'
``supernodes``: lists [name, node_id, ...]) are drawn as dashed boxes around their members.

`auto_supernodes` groups features by a simple rule: kept features at the same position whose
labels (clerps) are equal, e.g. features that promote the same token.
"""

from __future__ import annotations

import base64
import html as html_lib
import io
import json
import uuid
from collections import defaultdict

_COLOURS = {
    "cross layer transcoder": "#f5c26b",
    "mlp reconstruction error": "#b8b8b8",
    "embedding": "#c9a7e0",
    "logit": "#8fd19e",
}


def _row(node: dict) -> float:
    layer = node["layer"]
    return -1.0 if layer == "E" else float(layer)


def layout(data: dict) -> dict[str, tuple[float, float]]:
    """(x, y) of every node: x the token position (nodes sharing a cell spread out), y the layer."""
    cells: dict[tuple, list[str]] = defaultdict(list)
    for n in data["nodes"]:
        cells[(n["ctx_idx"], _row(n))].append(n["node_id"])
    pos = {}
    for (ctx, row), ids in cells.items():
        k = len(ids)
        for j, nid in enumerate(ids):
            pos[nid] = (ctx + (j - (k - 1) / 2) * min(0.8 / max(k, 1), 0.22), row)
    return pos


def auto_supernodes(data: dict, min_size: int = 2) -> list[list[str]]:
    """Supernodes by a simple rule: feature nodes at the same position with the same non-empty clerp.

    Returns circuit-tracer's format: [[name, node_id, node_id, ...], ...], groups of at least ``min_size``.
    """
    groups: dict[tuple, list[str]] = defaultdict(list)
    for n in data["nodes"]:
        if n["feature_type"] == "cross layer transcoder" and n.get("clerp"):
            groups[(n["ctx_idx"], n["clerp"])].append(n["node_id"])
    return [[f"{clerp} @{ctx}", *ids] for (ctx, clerp), ids in groups.items() if len(ids) >= min_size]


def figure(data: dict, max_edges: int = 150, title: str = ""):
    """A static matplotlib picture of a graph JSON: strongest edges, nodes coloured by kind, supernode boxes."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    pos = layout(data)
    tokens = data["metadata"]["prompt_tokens"]
    fig, ax = plt.subplots(figsize=(min(16, 2 + 1.3 * len(tokens)), 6))
    links = sorted(data["links"], key=lambda e: -abs(e["weight"]))[:max_edges]
    biggest = max([abs(e["weight"]) for e in links] + [1e-9])
    for e in links:
        (x0, y0), (x1, y1) = pos[e["source"]], pos[e["target"]]
        ax.plot(
            [x0, x1],
            [y0, y1],
            color="tab:blue" if e["weight"] > 0 else "tab:red",
            lw=0.3 + 3 * abs(e["weight"]) / biggest,
            alpha=0.5,
            zorder=1,
        )
    for n in data["nodes"]:
        x, y = pos[n["node_id"]]
        ax.scatter([x], [y], s=60, color=_COLOURS.get(n["feature_type"], "white"), edgecolor="grey", zorder=2)
    for sn in data["qParams"].get("supernodes", []):
        pts = [pos[i] for i in sn[1:] if i in pos]
        if pts:
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            ax.add_patch(
                Rectangle(
                    (min(xs) - 0.12, min(ys) - 0.2),
                    max(xs) - min(xs) + 0.24,
                    max(ys) - min(ys) + 0.4,
                    fill=False,
                    ls="--",
                    ec="black",
                )
            )
            ax.text(min(xs) - 0.12, max(ys) + 0.25, sn[0], fontsize=7)
    n_layers = max([_row(n) for n in data["nodes"]] + [0])
    ax.set_xticks(range(len(tokens)))
    ax.set_xticklabels(tokens, rotation=30)
    ax.set_yticks([-1] + list(range(int(n_layers) + 1)))
    ax.set_yticklabels(["embeddings"] + [f"layer {L}" for L in range(int(n_layers))] + ["logits"])
    ax.legend(
        handles=[Patch(fc=c, ec="grey", label=k) for k, c in _COLOURS.items()],
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=8,
    )
    ax.set_title(title or f"attribution graph: {' '.join(tokens)}")
    fig.tight_layout()
    return fig


_SCRIPT = """
(function(){
const data = __DATA__; const pos = __POS__; const root = document.getElementById("__ROOT__");
const W = 120 + 110 * data.metadata.prompt_tokens.length, H = 420;
let maxRow = 0; for (const n of data.nodes) maxRow = Math.max(maxRow, n.layer === "E" ? -1 : +n.layer);
const X = x => 60 + x * 110, Y = y => H - 40 - (y + 1) * (H - 80) / (maxRow + 1);
const ns = "http://www.w3.org/2000/svg";
const svg = document.createElementNS(ns, "svg"); svg.setAttribute("width", W); svg.setAttribute("height", H);
const info = document.createElement("div"); info.style.font = "12px sans-serif"; info.style.minHeight = "2em";
const big = Math.max(1e-9, ...data.links.map(e => Math.abs(e.weight)));
const lines = [];
for (const e of data.links) {
  const a = pos[e.source], b = pos[e.target]; const l = document.createElementNS(ns, "line");
  l.setAttribute("x1", X(a[0])); l.setAttribute("y1", Y(a[1])); l.setAttribute("x2", X(b[0])); l.setAttribute("y2", Y(b[1]));
  l.setAttribute("stroke", e.weight > 0 ? "#1f77b4" : "#d62728"); l.setAttribute("stroke-opacity", 0.45);
  l.setAttribute("stroke-width", 0.3 + 4 * Math.abs(e.weight) / big); l.dataset.s = e.source; l.dataset.t = e.target;
  svg.appendChild(l); lines.push(l);
}
for (const sn of (data.qParams.supernodes || [])) {
  const pts = sn.slice(1).filter(i => pos[i]).map(i => pos[i]); if (!pts.length) continue;
  const xs = pts.map(p => X(p[0])), ys = pts.map(p => Y(p[1])); const r = document.createElementNS(ns, "rect");
  r.setAttribute("x", Math.min(...xs) - 12); r.setAttribute("y", Math.min(...ys) - 12);
  r.setAttribute("width", Math.max(...xs) - Math.min(...xs) + 24); r.setAttribute("height", Math.max(...ys) - Math.min(...ys) + 24);
  r.setAttribute("fill", "none"); r.setAttribute("stroke", "black"); r.setAttribute("stroke-dasharray", "4 3");
  const t = document.createElementNS(ns, "text"); t.setAttribute("x", Math.min(...xs) - 12); t.setAttribute("y", Math.min(...ys) - 15);
  t.setAttribute("font-size", "10"); t.textContent = sn[0]; svg.appendChild(r); svg.appendChild(t);
}
let pinned = null;
for (const n of data.nodes) {
  const p = pos[n.node_id]; const c = document.createElementNS(ns, "circle");
  c.setAttribute("cx", X(p[0])); c.setAttribute("cy", Y(p[1])); c.setAttribute("r", 7);
  c.setAttribute("fill", __COLOURS__[n.feature_type] || "white"); c.setAttribute("stroke", "#555");
  const text = `${n.node_id} (${n.feature_type}) ${n.clerp || ""} | activation ${n.activation == null ? "-" : n.activation.toFixed(3)} | cumulative influence ${n.influence == null ? "-" : n.influence.toFixed(3)}`;
  c.addEventListener("mouseenter", () => { info.textContent = text; });
  c.addEventListener("click", () => {
    pinned = pinned === n.node_id ? null : n.node_id;
    for (const l of lines) l.style.display = (!pinned || l.dataset.s === pinned || l.dataset.t === pinned) ? "" : "none";
  });
  svg.appendChild(c);
}
data.metadata.prompt_tokens.forEach((tok, i) => {
  const t = document.createElementNS(ns, "text"); t.setAttribute("x", X(i)); t.setAttribute("y", H - 8);
  t.setAttribute("text-anchor", "middle"); t.setAttribute("font-size", "11"); t.textContent = tok; svg.appendChild(t);
});
root.appendChild(info); root.appendChild(svg);
})();
"""


class GraphView:
    """A graph JSON that renders as offline interactive HTML in Jupyter, with a PNG as fallback."""

    def __init__(self, data: dict):
        self.data = data

    def html(self) -> str:
        """A self-contained HTML snippet: the SVG view and its inlined JavaScript (no network)."""
        root = f"interplab-graph-{uuid.uuid4().hex[:8]}"
        script = (
            _SCRIPT.replace("__POS__", json.dumps(layout(self.data)))
            .replace("__COLOURS__", json.dumps(_COLOURS))
            .replace("__ROOT__", root)
            .replace("__DATA__", json.dumps(self.data).replace("</", "<\\/"))
        )
        title = html_lib.escape(" ".join(self.data["metadata"]["prompt_tokens"]))
        return (
            f'<div id="{root}"><b>{title}</b> (hover a node for its details; click it to show only its edges)'
            f"</div><script>{script}</script>"
        )

    def png(self) -> bytes:
        import matplotlib.pyplot as plt

        fig = figure(self.data)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=80)
        plt.close(fig)
        return buf.getvalue()

    def _repr_mimebundle_(self, include=None, exclude=None):
        return {
            "text/plain": f"<attribution graph: {len(self.data['nodes'])} nodes, {len(self.data['links'])} edges>",
            "text/html": self.html(),
            "image/png": base64.b64encode(self.png()).decode(),
        }


def graph_view(data: dict, backend: str = "auto"):
    """Show a graph JSON: "auto" (interactive HTML with a PNG fallback), "html" or "matplotlib" (a figure)."""
    if backend == "matplotlib":
        return figure(data)
    view = GraphView(data)
    if backend == "html":
        from IPython.display import HTML

        return HTML(view.html())
    if backend != "auto":
        raise ValueError(f"backend must be 'auto', 'html' or 'matplotlib', not {backend!r}")
    return view
