"""Feature circuits on transcoders: reading features through the weights, attributing one prompt, graphs.

- `de_embedding`, `feature_logit_effect`: which tokens turn a feature on (through the
  embeddings) and which it promotes (through the unembedding).
- `FrozenReplacement`: one prompt with attention patterns and LayerNorm scales frozen and every
  MLP replaced by a transcoder plus an error term, so that a target (a logit, a feature's
  pre-activation, a head's output) is exactly the sum of its sources' attributions: transcoder
  features, error terms, embeddings, attention heads (optionally) and biases.
- `attribution_graph`, `node_label`, `draw_attribution_graph`: a small attribution graph.
- `fact_prompt`, `contrast_weights`, `fact_recall_check`: the fact-recall circuit, checked
  against the facts TinyWorld's generator planted.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from ..hooks import act_name
from ..progress import progress as progress_bar
from ..tinyworld import CAST, RELATIONS, WORLD, encode, token_id
from ..tinyworld.language import BOS
from .config import mlp_in_hook, mlp_out_hook
from .latents import feature_aurocs
from .modules import SparseDictionary


def de_embedding(model, transcoder: SparseDictionary, feature: int) -> Float[Tensor, " d_vocab"]:
    """Which tokens turn a feature on directly: model.W_E @ transcoder.W_enc[:, feature] (the direct path)."""
    if not 0 <= feature < transcoder.cfg.d_sae:
        raise ValueError(f"feature must be between 0 and {transcoder.cfg.d_sae - 1}, got {feature}")
    return model.W_E @ transcoder.W_enc[:, feature]


def feature_logit_effect(model, transcoder: SparseDictionary, feature: int) -> Float[Tensor, " d_vocab"]:
    """A feature's direct effect on the logits: its decoder row times the unembedding (ignoring later layers)."""
    return transcoder.W_dec[feature] @ model.W_U


def fact_prompt(person: str, relation: str = "city") -> list[str]:
    """The question prompt of TinyWorld's facts family, e.g. ['<bos>', 'where', 'does', 'Alice', 'live', '?']."""
    _, query, _ = RELATIONS[relation]
    return [BOS] + query.split("{V}")[0].format(P=person).split()


# --- attribution with frozen attention and LayerNorm (Dunefsky et al.'s linearisation) ------------------------

SOURCE_KINDS = ("features", "errors", "attention", "embeddings", "mlps", "biases")


class FrozenReplacement:
    """One prompt through the model with attention patterns and LayerNorm scales frozen and every MLP replaced.

    Attention patterns and LayerNorm scales keep their values from the real run; every MLP
    with a transcoder becomes the transcoder's features (sources) plus its error term (a
    source: the part of the MLP output the transcoder misses); an MLP without one keeps its
    real output (a source of kind "mlps"). Token and position embeddings are sources too, and
    with ``heads_as_sources`` so is every attention head's output at every position (its OV
    contribution, ``hook_z``). What is left between the sources and any target (a logit, a
    feature's pre-activation, a head's output) is linear, so a target is exactly the sum of
    its sources' attributions (source value x gradient) plus a constant, the target with every
    source set to zero (the biases). `attribute` returns that decomposition.

    With ``heads_as_sources=False`` the heads are transparent: a feature at an earlier position
    reaches the target through the heads' OV circuits under the frozen patterns. With True,
    the heads are nodes of their own and their inputs are read with `head_target`.
    """

    def __init__(self, model, transcoders: Sequence[SparseDictionary], tokens: Tensor, heads_as_sources: bool = False):
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be one prompt, [pos]; got shape {tuple(tokens.shape)}")
        self.model, self.tokens, self.heads_as_sources = model, tokens, heads_as_sources
        self.transcoders = list(transcoders)
        self.index = {tc.cfg.layer: i for i, tc in enumerate(self.transcoders)}
        if len(self.index) != len(self.transcoders):
            raise ValueError("two transcoders replace the same MLP; pass at most one per layer")
        self.frozen: dict[str, Tensor] = {}
        with torch.enable_grad():
            self.live = self._run(zero=False)
        with torch.no_grad():
            self.zero = self._run(zero=True)

    def _run(self, zero: bool) -> dict:
        cfg = self.model.cfg
        n = len(self.transcoders)
        out: dict = {
            "sources": {},
            "pre": [None] * n,
            "acts": [None] * n,
            "errors": [None] * n,
            "z": [None] * cfg.n_layers,
            "heads": [None] * cfg.n_layers,
            "mlps": [None] * cfg.n_layers,
        }
        inputs: dict[int, Tensor] = {}

        def source(value: Tensor) -> Tensor:
            return torch.zeros_like(value) if zero else value.detach().requires_grad_(True)

        def freeze(value: Tensor, hook) -> Tensor:
            if not zero:
                self.frozen[hook.name] = value.detach()
            return self.frozen[hook.name]

        def embed(value: Tensor, hook) -> Tensor:
            out["sources"][hook.name] = source(value)
            return out["sources"][hook.name]

        def heads(z: Tensor, hook) -> Tensor:
            out["z"][hook.layer()] = z[0]
            if not self.heads_as_sources:
                return z
            out["heads"][hook.layer()] = source(z)
            return out["heads"][hook.layer()]

        def save_input(x: Tensor, hook) -> None:
            inputs[hook.layer()] = x

        def mlp_out(y: Tensor, hook) -> Tensor:
            L = hook.layer()
            if L not in self.index:
                out["mlps"][L] = source(y)
                return out["mlps"][L]
            i = self.index[L]
            tc, x = self.transcoders[i], inputs[L]
            out["pre"][i] = tc.pre_acts(x)[0]
            acts = source(tc.encode(x))
            recon = tc.decode(acts) + tc.skip_out(x)
            error = source(y - recon)
            out["acts"][i], out["errors"][i] = acts, error
            return recon + error

        hooks = [
            (lambda name: name.endswith("hook_pattern") or name.endswith("hook_scale"), freeze),
            ("hook_embed", embed),
            ("hook_pos_embed", embed),
            (lambda name: name.endswith("attn.hook_z"), heads),
            (lambda name: name.endswith("ln2.hook_normalized"), save_input),
            (lambda name: name.endswith("hook_mlp_out"), mlp_out),
        ]
        out["logits"] = self.model.run_with_hooks(self.tokens[None], fwd_hooks=hooks)[0]
        return out

    def attribute(self, target: Callable[[dict], Tensor]) -> dict[str, Tensor]:
        """The decomposition of one target: ``target(values)`` -> a scalar, from a run's values.

        ``values`` has "logits" [pos, d_vocab], "pre" (each transcoder's pre-activations,
        [pos, d_sae]) and "z" (each layer's head outputs before W_O, [pos, n_heads, d_head]);
        `logit_target`, `feature_target` and `head_target` build the usual ones. Returns
        "features" [n_transcoders, pos, d_sae], "errors" [n_transcoders, pos], "attention"
        [n_layers, pos, n_heads] (zero unless heads are sources), "embeddings" [2, pos] (token,
        position), "mlps" [n_layers, pos] (MLPs without a transcoder), "biases" (a scalar),
        and "target", the target's value: the sum of all the others. With heads as sources,
        "head_grads" holds each layer's gradient with respect to the head outputs (for `head_target`).
        """
        live, cfg = self.live, self.model.cfg
        n, n_pos = len(self.transcoders), self.tokens.shape[0]
        leaves = [live["sources"]["hook_embed"], live["sources"]["hook_pos_embed"]]
        leaves += live["acts"] + live["errors"]
        leaves += [h for h in live["heads"] if h is not None] + [m for m in live["mlps"] if m is not None]
        with torch.enable_grad():
            value = target(live)
            grads = torch.autograd.grad(value, leaves, retain_graph=True, allow_unused=True)
        attr = lambda leaf, grad: torch.zeros_like(leaf) if grad is None else (leaf * grad).detach()  # noqa: E731
        g = iter(grads)
        emb = [attr(leaves[0], next(g)), attr(leaves[1], next(g))]
        out = {
            "embeddings": torch.stack([e[0].sum(-1) for e in emb]),
            "features": torch.stack([attr(a, next(g))[0] for a in live["acts"]]) if n else torch.zeros(0, n_pos, 0),
        }
        out["errors"] = (
            torch.stack([attr(e, next(g))[0].sum(-1) for e in live["errors"]]) if n else torch.zeros(0, n_pos)
        )
        out["attention"] = torch.zeros(cfg.n_layers, n_pos, cfg.n_heads, device=self.tokens.device)
        out["head_grads"] = [None] * cfg.n_layers
        for L, h in enumerate(live["heads"]):
            if h is not None:
                grad = next(g)
                out["head_grads"][L] = torch.zeros_like(h[0]) if grad is None else grad[0].detach()
                out["attention"][L] = attr(h, grad)[0].sum(-1)
        out["mlps"] = torch.zeros(cfg.n_layers, n_pos, device=self.tokens.device)
        for L, m in enumerate(live["mlps"]):
            if m is not None:
                out["mlps"][L] = attr(m, next(g))[0].sum(-1)
        with torch.no_grad():
            out["biases"] = target(self.zero).detach().reshape(())
        out["target"] = value.detach().reshape(())
        return out


def logit_target(weights: Tensor, pos: int = -1) -> Callable[[dict], Tensor]:
    """The target ``logits[pos] @ weights``: one answer's logit (a one-hot vector) or its lead over competitors."""
    return lambda values: values["logits"][pos] @ weights.to(values["logits"])


def feature_target(index: int, pos: int, feature: int) -> Callable[[dict], Tensor]:
    """The target: the pre-activation of ``feature`` of transcoders[index] at ``pos`` (a graph node's input)."""
    return lambda values: values["pre"][index][pos, feature]


def head_target(layer: int, head: int, pos: int, direction: Tensor) -> Callable[[dict], Tensor]:
    """The target: head ``head`` of ``layer`` at ``pos``, its output before W_O (hook_z) dotted with ``direction``."""
    return lambda values: values["z"][layer][pos, head] @ direction


def kind_totals(attr: dict[str, Tensor]) -> dict[str, float]:
    """The attribution of each kind of source, summed: features, errors, attention, embeddings, mlps, biases."""
    return {kind: float(attr[kind].sum()) for kind in SOURCE_KINDS}


def contrast_weights(answer: str, competitors: Sequence[str], d_vocab: int) -> Tensor:
    """[d_vocab] weights: +1 on the answer, -1/len(competitors) on each competitor (the answer's logit lead)."""
    w = torch.zeros(d_vocab)
    others = [c for c in competitors if c != answer]
    w[[token_id(c) for c in others]] = -1.0 / len(others)
    w[token_id(answer)] = 1.0
    return w


NODE_COLOURS = {"feature": "moccasin", "error": "lightgrey", "head": "lightblue", "embedding": "thistle"}
NODE_KIND_NAMES = {
    "feature": "transcoder feature",
    "error": "error term",
    "head": "attention head (OV)",
    "embedding": "embedding",
}


def _source_values(attr: dict[str, Tensor]) -> list[tuple[tuple, float]]:
    """Every source with a non-zero attribution as (key, value); keys name a graph node. Position 0 left out."""
    out = []
    for i, p, f in attr["features"].nonzero().tolist():
        if p > 0:
            out.append((("feature", i, p, f), float(attr["features"][i, p, f])))
    for i, p in attr["errors"].nonzero().tolist():
        if p > 0:
            out.append((("error", i, p, 0), float(attr["errors"][i, p])))
    for L, p, h in attr["attention"].nonzero().tolist():
        if p > 0:
            out.append((("head", L, p, h), float(attr["attention"][L, p, h])))
    for k, p in attr["embeddings"].nonzero().tolist():
        if p > 0:
            out.append((("embedding", k, p, 0), float(attr["embeddings"][k, p])))
    return out


def _node(key: tuple, attr: float, transcoders: Sequence[SparseDictionary]) -> dict:
    kind, a, p, b = key
    layer = transcoders[a].cfg.layer if kind in ("feature", "error") else (a if kind == "head" else -1)
    return {
        "kind": kind,
        "index": a,
        "layer": layer,
        "pos": p,
        "feature": b if kind == "feature" else None,
        "head": b if kind == "head" else None,
        "embedding": ("token", "position")[a] if kind == "embedding" else None,
        "key": key,
        "attr": attr,
    }


def attribution_graph(
    model,
    transcoders: Sequence[SparseDictionary],
    tokens: Tensor,
    answer_id: int | None = None,
    logit_weights: Tensor | None = None,
    n_nodes: int = 8,
    n_inputs: int = 2,
    max_nodes: int = 18,
    edge_threshold: float = 0.05,
    answer_label: str | None = None,
) -> dict:
    """A small attribution graph in the frozen replacement model, with heads and embeddings as nodes.

    The target is the answer's logit (``answer_id``) or ``logits[-1] @ logit_weights``. Its
    sources, with every attention head's output a source of its own (`FrozenReplacement` with
    ``heads_as_sources=True``), are transcoder features, error terms, heads and embeddings;
    the ``n_nodes`` with the largest |attribution| become nodes (position 0, ``<bos>``, is left
    out: it is the same in every prompt). Each feature or head node is then expanded, breadth
    first: its own input is attributed to every source, the ``n_inputs`` strongest become nodes
    too (and are expanded in turn) until the graph has ``max_nodes`` nodes, and an
    edge s -> t carries s's share of t's attribution, in units of the target, so a node's
    incoming edges (over all sources, plus its biases) add up to its own attribution. A
    feature's incoming edge from an earlier feature at its position is activation x pullback,
    read through the frozen LayerNorm. Edges below ``edge_threshold`` x the largest are dropped.
    """
    if (answer_id is None) == (logit_weights is None):
        raise ValueError("give exactly one of answer_id and logit_weights")
    if logit_weights is None:
        logit_weights = torch.zeros(model.cfg.d_vocab)
        logit_weights[answer_id] = 1.0
    frozen = FrozenReplacement(model, transcoders, tokens, heads_as_sources=True)
    top = frozen.attribute(logit_target(logit_weights))
    ranked = sorted(_source_values(top), key=lambda kv: -abs(kv[1]))
    nodes = {key: _node(key, value, transcoders) for key, value in ranked[:n_nodes]}
    incoming: dict[tuple, dict[tuple, float]] = {}

    def expand(key: tuple) -> dict[tuple, float]:
        kind, a, p, b = key
        if kind == "feature":
            act = float(frozen.live["acts"][a][0, p, b].detach())
            scale = nodes[key]["attr"] / act if act else 0.0
            attr = frozen.attribute(feature_target(a, p, b))
        else:
            attr = frozen.attribute(head_target(a, b, p, top["head_grads"][a][p, b]))
            scale = 1.0
        return {k: v * scale for k, v in _source_values(attr)}

    queue = [key for key in nodes if key[0] in ("feature", "head")]
    while queue:
        key = queue.pop(0)
        incoming[key] = expand(key)
        for k, _ in sorted(incoming[key].items(), key=lambda kv: -abs(kv[1]))[:n_inputs]:
            if k not in nodes and len(nodes) < max_nodes:
                nodes[k] = _node(k, _direct_value(top, k), transcoders)
                if k[0] in ("feature", "head"):
                    queue.append(k)
    order = list(nodes)
    edges = [
        {"source": order.index(s), "target": order.index(t), "weight": w}
        for t, ins in incoming.items()
        for s, w in ins.items()
        if s in nodes and s != t
    ]
    if edges:
        biggest = max(abs(e["weight"]) for e in edges)
        edges = [e for e in edges if abs(e["weight"]) >= edge_threshold * biggest]
    if answer_label is None:
        answer_label = f"logit({model.tokenizer.decode([answer_id])})" if answer_id is not None else "target"
    return {
        "tokens": [model.tokenizer.decode([int(t)]) for t in tokens],
        "answer": answer_label,
        "nodes": [nodes[k] for k in order],
        "edges": edges,
        "target": float(top["target"]),
        "totals": kind_totals(top),
        "feature_total": float(top["features"].sum()),
        "error_total": float(top["errors"].sum()),
    }


def _direct_value(attr: dict[str, Tensor], key: tuple) -> float:
    """A source's attribution to the graph's target (0 for sources that reach it only through other nodes)."""
    kind, a, p, b = key
    if kind == "feature":
        return float(attr["features"][a, p, b])
    if kind == "error":
        return float(attr["errors"][a, p])
    if kind == "head":
        return float(attr["attention"][a, p, b])
    return float(attr["embeddings"][a, p])


def node_label(model, transcoders: Sequence[SparseDictionary], node: dict) -> str:
    """A short label for a graph node: a feature's top de-embedding token and top logit; a head's name; a token."""
    if node["kind"] == "error":
        return f"L{node['layer']} error"
    if node["kind"] == "head":
        return f"head L{node['layer']}H{node['head']}"
    if node["kind"] == "embedding":
        return f"{node['embedding']} embedding"
    tc = transcoders[node["index"]]
    de = de_embedding(model, tc, node["feature"])
    out = feature_logit_effect(model, tc, node["feature"])
    dec = lambda i: model.tokenizer.decode([int(i)])
    return f"L{node['layer']}/{node['feature']}\nin: {dec(de.argmax())}\nout: {dec(out.argmax())}"


def _row(node: dict) -> float:
    """The drawing's height of a node: embeddings at the bottom, then per layer its heads and its MLP."""
    if node["kind"] == "embedding":
        return -1.0
    return node["layer"] + (0.5 if node["kind"] in ("feature", "error") else 0.0)


def draw_attribution_graph(graph: dict, labels: Sequence[str] | None = None, title: str = ""):
    """Draw a graph from `attribution_graph` with matplotlib (x: token position; y: layer), with a legend."""
    import matplotlib.pyplot as plt  # optional at import time: only drawing needs it
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    nodes, edges, tokens = graph["nodes"], graph["edges"], graph["tokens"]
    n_layers = max([nd["layer"] for nd in nodes] + [0]) + 1
    count: dict[tuple[int, float], int] = {}
    for nd in nodes:
        count[(nd["pos"], _row(nd))] = count.get((nd["pos"], _row(nd)), 0) + 1
    columns = sorted({nd["pos"] for nd in nodes})
    width = {p: max(c for (q, _), c in count.items() if q == p) for p in columns}
    start, total = {}, 0.0
    for p in columns:
        start[p], total = total, total + width[p] + 0.5
    pos, used = {}, {}
    for k, nd in enumerate(nodes):
        key = (nd["pos"], _row(nd))
        j = used.get(key, 0)
        used[key] = j + 1
        pos[k] = (start[nd["pos"]] + j + (width[nd["pos"]] - count[key]) / 2, _row(nd))
    answer_xy = ((total - 0.5) / 2 - 0.5, n_layers + 0.3)
    fig, ax = plt.subplots(figsize=(min(14, 3.5 + 1.6 * total), 7))
    biggest = max([abs(e["weight"]) for e in edges] + [abs(nd["attr"]) for nd in nodes] + [1e-9])
    for e in edges:
        (x0, y0), (x1, y1) = pos[e["source"]], pos[e["target"]]
        ax.annotate(
            "",
            xy=(x1, y1),
            xytext=(x0, y0),
            arrowprops={
                "arrowstyle": "->",
                "lw": 0.5 + 4 * abs(e["weight"]) / biggest,
                "alpha": 0.6,
                "color": "tab:blue" if e["weight"] > 0 else "tab:red",
            },
        )
    for k, nd in enumerate(nodes):
        x, y = pos[k]
        if nd["attr"] != 0.0:
            ax.annotate(
                "",
                xy=answer_xy,
                xytext=(x, y),
                arrowprops={
                    "arrowstyle": "->",
                    "lw": 0.5 + 4 * abs(nd["attr"]) / biggest,
                    "alpha": 0.25,
                    "linestyle": "--",
                    "color": "tab:blue" if nd["attr"] > 0 else "tab:red",
                },
            )
        text = labels[k] if labels is not None else nd["kind"]
        ax.text(
            x,
            y,
            f"{text}\n{nd['attr']:+.2f}",
            ha="center",
            va="center",
            fontsize=7,
            bbox={"boxstyle": "round", "fc": NODE_COLOURS[nd["kind"]], "ec": "grey"},
        )
    ax.text(
        *answer_xy,
        graph["answer"],
        ha="center",
        va="center",
        fontsize=9,
        bbox={"boxstyle": "round", "fc": "lightgreen", "ec": "grey"},
    )
    ax.set_xticks([start[p] + (width[p] - 1) / 2 for p in columns])
    ax.set_xticklabels([f"'{tokens[p]}' (position {p})" for p in columns])
    rows = [-1.0] + [v for L in range(n_layers) for v in (L, L + 0.5)]
    ax.set_yticks(rows)
    ax.set_yticklabels(["embeddings"] + [name for L in range(n_layers) for name in (f"attn {L}", f"MLP {L}")])
    ax.set_xlim(-0.8, total - 0.7)
    ax.set_ylim(-1.6, n_layers + 0.8)
    handles = [Patch(fc=NODE_COLOURS[kind], ec="grey", label=name) for kind, name in NODE_KIND_NAMES.items()]
    handles += [
        Line2D([], [], color="tab:blue", lw=2, label="excites (positive attribution)"),
        Line2D([], [], color="tab:red", lw=2, label="inhibits (negative attribution)"),
        Line2D([], [], color="grey", lw=1, ls="--", label="direct effect on the target"),
    ]
    ax.legend(
        handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, title="node value: attribution"
    )
    ax.set_title(title or "attribution graph")
    fig.tight_layout()
    return fig


def _mean_sem(values: Sequence[float]) -> tuple[float, float]:
    """The mean and its standard error (0 for a single value)."""
    t = torch.tensor(list(values), dtype=torch.float64)
    sem = float(t.std() / len(t) ** 0.5) if len(t) > 1 else 0.0
    return float(t.mean()), sem


def lead_shares(attr: dict[str, Tensor]) -> dict[str, float]:
    """Each kind of source's share of the target: its summed attribution over the target (the shares add up to 1)."""
    target = float(attr["target"])
    return {kind: value / target for kind, value in kind_totals(attr).items()}


@torch.no_grad()
def fact_recall_check(
    model,
    transcoders: Sequence[SparseDictionary],
    relation: str = "city",
    people: Sequence[str] | None = None,
    top: int = 3,
    progress: bool = False,
) -> dict:
    """Score the fact-recall circuit against TinyWorld's known facts, person by person.

    For every person, prompt "where does P live ?" (or the relation's question) and decompose
    the true value's LEAD (its logit minus the mean logit of the other values of the relation,
    e.g. the other nine cities) over its sources in the frozen replacement model
    (`FrozenReplacement`), twice: with the attention heads transparent (a source at the name
    reaches the answer through the heads' OV circuits) and with every head a source of its own
    (who writes the lead into the last position). The lead isolates what picks THIS city over
    the others; the plain logit also credits what only says "a city comes next". Then:

    - "selectivity": among the ``top`` features with the largest attribution, the first whose
      decoder row promotes the true value most (through the unembedding) is a candidate city
      feature; its AUROC, over the prompts of every person asked about, for "this person's
      value is the same as P's" (1.0: it fires exactly for the people with that value);
      "selectivity_held_out": the same AUROC over the OTHER people's prompts only, so that the
      prompt the feature was chosen on is not among those it is scored on;
    - "value_feature": such a feature exists among the ``top`` (features are ranked by their
      attribution to the true value's lead, so this is expected; selectivity is the test);
    - "person_feature": the most active feature of the first transcoder on the person's token
      has the person's name as its top de-embedding token;
    - "model_correct": the model's top prediction is the true value;
    - "shares" / "direct_shares": each kind of source's share of the lead (features, errors,
      attention, embeddings, mlps, biases; they add up to 1), heads transparent / heads as
      sources, per person and as mean and standard error over people.

    Position 0 (``<bos>``) is left out of the rankings: it is the same in every prompt.
    ``progress`` shows a progress bar over the people.
    """
    values = RELATIONS[relation][2]
    value_ids = torch.tensor([token_id(v) for v in values])
    device = next(model.parameters()).device
    people = list(people or CAST)
    truths = [WORLD.value(p, relation) for p in people]
    batch = torch.tensor([encode(fact_prompt(p, relation)) for p in people], device=device)
    _, cache = model.run_with_cache(batch, names_filter=[mlp_in_hook(tc.cfg.layer) for tc in transcoders])
    last = [tc.encode(cache[mlp_in_hook(tc.cfg.layer)][:, -1]) for tc in transcoders]  # [people, d_sae] each
    rows, where = [], Counter()
    for k, person in enumerate(progress_bar(people, desc="fact recall, person by person", disable=not progress)):
        words = fact_prompt(person, relation)
        ids = torch.tensor(encode(words), device=device)
        truth = WORLD.value(person, relation)
        weights = contrast_weights(truth, values, model.cfg.d_vocab)
        through = FrozenReplacement(model, transcoders, ids).attribute(logit_target(weights))
        direct = FrozenReplacement(model, transcoders, ids, heads_as_sources=True).attribute(logit_target(weights))
        feat, err = through["features"].clone(), through["errors"].clone()
        feat[:, 0], err[:, 0] = 0.0, 0.0
        person_pos = words.index(person)
        first = min(range(len(transcoders)), key=lambda j: transcoders[j].cfg.layer)
        i, f = (
            first,
            int(transcoders[first].encode(cache[mlp_in_hook(transcoders[first].cfg.layer)][k, person_pos]).argmax()),
        )
        de = de_embedding(model, transcoders[i], f)
        person_feature = model.tokenizer.decode([int(de.argmax())]) == person
        flat = feat.flatten()
        writes = []
        for idx in flat.topk(top).indices.tolist():
            li, rem = divmod(idx, feat.shape[1] * feat.shape[2])
            p, ff = divmod(rem, feat.shape[2])
            effect = feature_logit_effect(model, transcoders[li], ff)[value_ids.to(device)]
            writes.append(
                {
                    "layer": transcoders[li].cfg.layer,
                    "pos": p,
                    "token": words[p],
                    "feature": ff,
                    "attr": round(float(flat[idx]), 3),
                    "writes": values[int(effect.argmax())],
                }
            )
            if writes[-1]["writes"] == truth:
                where[(writes[-1]["layer"], "name" if p == person_pos else words[p])] += 1
        logits = model(ids[None])[0, -1]
        selectivity = held_out = None
        hit = next((w for w in writes if w["writes"] == truth), None)
        same = torch.tensor([t == truth for t in truths])
        others = torch.arange(len(people)) != k
        if hit is not None and hit["pos"] == len(words) - 1 and 0 < int(same.sum()) < len(people):
            j = next(j for j, tc in enumerate(transcoders) if tc.cfg.layer == hit["layer"])
            scores = last[j][:, hit["feature"]].cpu()
            selectivity = round(float(feature_aurocs(scores[:, None], same)[0]), 3)
            if 0 < int(same[others].sum()) < int(others.sum()):
                held_out = round(float(feature_aurocs(scores[others][:, None], same[others])[0]), 3)
        rows.append(
            {
                "person": person,
                "truth": truth,
                "person_layer": transcoders[i].cfg.layer,
                "person_feature_id": f,
                "person_feature": person_feature,
                "top_features": writes,
                "selectivity": selectivity,
                "selectivity_held_out": held_out,
                "value_feature": hit is not None,
                "model_correct": model.tokenizer.decode([int(logits.argmax())]) == truth,
                "lead": round(float(logits @ weights.to(logits)), 3),
                "attributed": float(through["target"]),
                "error_share": round(float(err.abs().sum() / (feat.abs().sum() + err.abs().sum())), 3),
                "feature_share_at_name": float(through["features"][:, person_pos].sum() / through["target"]),
                "shares": lead_shares(through),
                "direct_shares": lead_shares(direct),
            }
        )
    n = len(rows)
    sel = [r["selectivity"] for r in rows if r["selectivity"] is not None]
    held = [r["selectivity_held_out"] for r in rows if r["selectivity_held_out"] is not None]
    return {
        "rows": rows,
        "person_feature": sum(r["person_feature"] for r in rows) / n,
        "value_feature": sum(r["value_feature"] for r in rows) / n,
        "model_correct": sum(r["model_correct"] for r in rows) / n,
        "mean_error_share": round(sum(r["error_share"] for r in rows) / n, 4),
        "mean_selectivity": round(sum(sel) / len(sel), 4) if sel else None,
        "selectivity_sem": _mean_sem(sel)[1] if sel else None,
        "n_selectivity": len(sel),
        "n_selective": sum(x >= 0.9 for x in sel),
        "selective": sum(x >= 0.9 for x in sel) / n if sel else 0.0,
        "held_out_selectivity": _mean_sem(held) if held else None,
        "n_held_out": len(held),
        "n_held_out_selective": sum(x >= 0.9 for x in held),
        "value_features_at": {f"MLP {L} at {tok}": c for (L, tok), c in where.most_common()},
        "shares": {kind: _mean_sem([r["shares"][kind] for r in rows]) for kind in SOURCE_KINDS},
        "direct_shares": {kind: _mean_sem([r["direct_shares"][kind] for r in rows]) for kind in SOURCE_KINDS},
        "feature_share_at_name": _mean_sem([r["feature_share_at_name"] for r in rows]),
    }


def rate_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95% by default) of a rate of ``successes`` out of ``n``."""
    if n <= 0:
        raise ValueError("a rate needs at least one trial (n >= 1)")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5 / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@torch.no_grad()
def mlp_ablation_flips(model, relation: str = "city", people: Sequence[str] | None = None) -> list[dict]:
    """Every (person, layer) where zeroing one MLP's output at the question's last position changes the answer.

    For each person's question ("where does P live ?") and each MLP, the MLP's output at the
    last position is set to zero; a row is kept when the model's top prediction, right on the
    clean prompt, is then something else. Rows: person, layer, truth, ablated (the new top
    token), and the true value's logit lead over the new top token, clean and ablated.
    """
    people = list(people or CAST)
    device = next(model.parameters()).device
    batch = torch.tensor([encode(fact_prompt(p, relation)) for p in people], device=device)
    truth_ids = torch.tensor([token_id(WORLD.value(p, relation)) for p in people], device=device)
    clean = model(batch)[:, -1]
    rows = []

    def zero_last(y: Tensor, hook) -> Tensor:
        y = y.clone()
        y[:, -1] = 0.0
        return y

    for L in range(model.cfg.n_layers):
        ablated = model.run_with_hooks(batch, fwd_hooks=[(mlp_out_hook(L), zero_last)])[:, -1]
        for k, person in enumerate(people):
            new, truth = int(ablated[k].argmax()), int(truth_ids[k])
            if int(clean[k].argmax()) == truth and new != truth:
                rows.append(
                    {
                        "person": person,
                        "layer": L,
                        "truth": WORLD.value(person, relation),
                        "ablated": model.tokenizer.decode([new]),
                        "lead_clean": float(clean[k, truth] - clean[k, new]),
                        "lead_ablated": float(ablated[k, truth] - ablated[k, new]),
                    }
                )
    return rows


def _units_for_share(effects: Tensor, total: float, share: float) -> int | None:
    """How many units, strongest first, reach ``share`` of a positive total (None when they never do)."""
    if total <= 0:
        return None
    reached = (effects.sort(descending=True).values.cumsum(0) >= share * total).nonzero()
    return int(reached[0]) + 1 if len(reached) else None


@torch.no_grad()
def compare_mlp_units(
    model,
    transcoder: SparseDictionary,
    sae: SparseDictionary,
    tokens: Tensor,
    pos: int,
    logit_weights: Tensor,
    values: Sequence[str] = (),
    share: float = 0.8,
) -> dict[str, dict]:
    """One MLP's output at one position, decomposed three ways: transcoder features, SAE features, neurons.

    Each unit's direct effect on the target ``logits[pos] @ logit_weights`` is its write into
    the residual stream read through the final LayerNorm (its scale frozen at this run's) and
    the unembedding. For each decomposition: the number of active units, the MLP's total direct
    effect, the part its units account for ("explained"), the dictionary's error (zero for the
    neurons) and its biases (the rest), how many units
    (strongest first) reach ``share`` of the total, and the three strongest units with the
    value among ``values`` each promotes most.
    """
    layer = transcoder.cfg.layer
    names = [mlp_in_hook(layer), mlp_out_hook(layer), act_name("post", layer), act_name("scale")]
    _, cache = model.run_with_cache(tokens[None], names_filter=names)
    x, y = cache[names[0]][0, pos], cache[names[1]][0, pos]
    post, scale = cache[names[2]][0, pos], cache[names[3]][0, pos]
    direction = model.W_U @ logit_weights.to(model.W_U)

    def effect(writes: Tensor) -> Tensor:
        return (writes - writes.mean(-1, keepdim=True)) @ direction / scale

    value_dirs = torch.stack([model.W_U[:, token_id(v)] for v in values]) if values else None
    total = float(effect(y[None])[0])
    out = {}
    for name, acts, W, recon in (
        ("transcoder", transcoder.encode(x[None])[0], transcoder.W_dec, transcoder(x[None])[0]),
        ("SAE on the MLP output", sae.encode(y[None])[0], sae.W_dec, sae(y[None])[0]),
        ("MLP neurons", post, model.blocks[layer].mlp.W_out, y),
    ):
        unit = acts * effect(W)
        active = acts > 0
        top = unit.topk(3).indices.tolist()
        out[name] = {
            "active": int(active.sum()),
            "of": int(acts.shape[0]),
            "total": total,
            "explained": float(unit.sum()),
            "error": total - float(effect(recon[None])[0]),
            "units_for_share": _units_for_share(unit, total, share),
            "top": [
                {
                    "unit": i,
                    "effect": float(unit[i]),
                    "promotes": values[int((value_dirs @ W[i]).argmax())] if value_dirs is not None else None,
                }
                for i in top
            ],
        }
    for row in out.values():
        row["biases"] = row["total"] - row["explained"] - row["error"]
    return out
