"""Feature circuits on transcoders: reading features through the weights, attributing one prompt, graphs.

- `de_embedding`, `feature_logit_effect`: which tokens turn a feature on (through the
  embeddings) and which it promotes (through the unembedding).
- `feature_attribution_to`: activation x gradient of every transcoder feature and error term
  for a target: an answer logit, a weighted sum of logits, or one feature's pre-activation.
- `attribution_graph`, `node_label`, `draw_attribution_graph`: a small attribution graph.
- `fact_prompt`, `contrast_weights`, `fact_recall_check`: the fact-recall circuit, checked
  against the facts TinyWorld's generator planted.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

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


def feature_attribution_to(
    model, transcoders: Sequence[SparseDictionary], tokens: Tensor, target: tuple[int, int, int] | None = None,
    answer_id: int | None = None, logit_weights: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """`answer_attribution` for other targets: an answer logit, a weighted sum of logits, or one feature.

    Exactly one target: ``answer_id`` (the logit of that token at the last position, as
    in `answer_attribution`); ``logit_weights`` ([d_vocab]; the target is
    ``logits[0, -1] @ logit_weights``, e.g. the right answer's logit minus the mean of
    its competitors'); or ``target=(i, p, f)``: the pre-activation of feature f of
    transcoders[i] at position p, where only the transcoders of earlier layers get
    attributions (the others stay zero): the incoming edges of one node of the graph.
    """
    if sum(t is not None for t in (target, answer_id, logit_weights)) != 1:
        raise ValueError("give exactly one of target, answer_id and logit_weights")
    by_layer = {tc.cfg.layer: i for i, tc in enumerate(transcoders)}
    inputs: dict[int, Tensor] = {}
    n = len(transcoders)
    acts: list[Tensor | None] = [None] * n
    errors: list[Tensor | None] = [None] * n
    pres: list[Tensor | None] = [None] * n

    def save_input(x, hook):
        inputs[hook.layer()] = x

    def replace(y, hook):
        i = by_layer[hook.layer()]
        tc, x = transcoders[i], inputs[hook.layer()]
        pres[i] = tc.pre_acts(x)
        acts[i] = tc.encode(x)
        recon = tc.decode(acts[i]) + tc.skip_out(x)
        errors[i] = (y - recon).detach().requires_grad_(True)
        return recon + errors[i]

    hooks = [(mlp_in_hook(L), save_input) for L in by_layer] + [(mlp_out_hook(L), replace) for L in by_layer]
    feat = torch.zeros(n, tokens.shape[0], transcoders[0].cfg.d_sae, device=tokens.device)
    err = torch.zeros(n, tokens.shape[0], device=tokens.device)
    with torch.enable_grad():
        logits = model.run_with_hooks(tokens[None], fwd_hooks=hooks)
        upstream = list(range(n))
        if answer_id is not None:
            value = logits[0, -1, answer_id]
        elif logit_weights is not None:
            value = logits[0, -1] @ logit_weights.to(logits)
        else:
            ti, tp, tf = target
            value = pres[ti][0, tp, tf]
            upstream = [i for i in range(n) if transcoders[i].cfg.layer < transcoders[ti].cfg.layer]
        if not upstream:
            return feat, err
        grads = torch.autograd.grad(value, [acts[i] for i in upstream] + [errors[i] for i in upstream],
                                    allow_unused=True)
    for j, i in enumerate(upstream):
        ga, ge = grads[j], grads[len(upstream) + j]
        if ga is not None:
            feat[i] = (acts[i] * ga)[0].detach()
        if ge is not None:
            err[i] = (errors[i] * ge).sum(-1)[0].detach()
    return feat, err


def contrast_weights(answer: str, competitors: Sequence[str], d_vocab: int) -> Tensor:
    """[d_vocab] weights: +1 on the answer, -1/len(competitors) on each competitor (the answer's logit lead)."""
    w = torch.zeros(d_vocab)
    others = [c for c in competitors if c != answer]
    w[[token_id(c) for c in others]] = -1.0 / len(others)
    w[token_id(answer)] = 1.0
    return w


def attribution_graph(model, transcoders: Sequence[SparseDictionary], tokens: Tensor, answer_id: int | None = None,
                      logit_weights: Tensor | None = None, n_nodes: int = 8, max_error_nodes: int = 3,
                      edge_threshold: float = 0.05, answer_label: str | None = None) -> dict:
    """A small attribution graph: the features that drive the answer most, and the edges between them.

    Nodes: the ``n_nodes`` (transcoder, position, feature) triples with the largest
    |attribution| to the target (the answer's logit, or ``logits @ logit_weights``), and
    the ``max_error_nodes`` largest error terms among those at least as large as the
    smallest kept feature (position 0, ``<bos>``, is left out: it is the same in every
    prompt). Edges: activation x gradient of each later feature node's pre-activation
    with respect to each earlier node; kept when |edge| >= edge_threshold * the largest.
    Every node's own attribution is its edge to the answer.
    """
    feat, err = feature_attribution_to(model, transcoders, tokens, answer_id=answer_id, logit_weights=logit_weights)
    feat[:, 0], err[:, 0] = 0.0, 0.0
    flat = feat.flatten()
    top = flat.abs().topk(n_nodes).indices
    n_pos, d_sae = feat.shape[1], feat.shape[2]
    nodes = []
    for idx in top.tolist():
        i, rem = divmod(idx, n_pos * d_sae)
        p, f = divmod(rem, d_sae)
        nodes.append({"kind": "feature", "index": i, "layer": transcoders[i].cfg.layer, "pos": p, "feature": f,
                      "attr": float(feat[i, p, f])})
    smallest = min(abs(nd["attr"]) for nd in nodes)
    big = [(abs(float(err[i, p])), i, p) for i in range(err.shape[0]) for p in range(err.shape[1])
           if abs(float(err[i, p])) >= smallest]
    for _, i, p in sorted(big, reverse=True)[:max_error_nodes]:
        nodes.append({"kind": "error", "index": i, "layer": transcoders[i].cfg.layer, "pos": p, "feature": None,
                      "attr": float(err[i, p])})
    edges = []
    for t in nodes:
        if t["kind"] != "feature":
            continue
        f_in, e_in = feature_attribution_to(model, transcoders, tokens, target=(t["index"], t["pos"], t["feature"]))
        for s in nodes:
            if s["layer"] >= t["layer"]:
                continue
            w = float(f_in[s["index"], s["pos"], s["feature"]]) if s["kind"] == "feature" else float(e_in[s["index"], s["pos"]])
            edges.append({"source": nodes.index(s), "target": nodes.index(t), "weight": w})
    if edges:
        biggest = max(abs(e["weight"]) for e in edges)
        edges = [e for e in edges if abs(e["weight"]) >= edge_threshold * biggest]
    if answer_label is None:
        answer_label = f"logit({model.tokenizer.decode([answer_id])})" if answer_id is not None else "target"
    return {"tokens": [model.tokenizer.decode([int(t)]) for t in tokens], "answer": answer_label,
            "nodes": nodes, "edges": edges, "feature_total": float(feat.sum()), "error_total": float(err.sum())}


def node_label(model, transcoders: Sequence[SparseDictionary], node: dict) -> str:
    """A short label for a graph node: L<layer>/<feature>, the token its de-embedding likes most and its top logit."""
    if node["kind"] == "error":
        return f"L{node['layer']} error"
    tc = transcoders[node["index"]]
    de = de_embedding(model, tc, node["feature"])
    out = feature_logit_effect(model, tc, node["feature"])
    dec = lambda i: model.tokenizer.decode([int(i)])
    return f"L{node['layer']}/{node['feature']}\nin: {dec(de.argmax())}\nout: {dec(out.argmax())}"


def draw_attribution_graph(graph: dict, labels: Sequence[str] | None = None, title: str = ""):
    """Draw a graph from `attribution_graph` with matplotlib: x = token position, y = layer; returns the figure."""
    import matplotlib.pyplot as plt  # optional at import time: only drawing needs it

    nodes, edges, tokens = graph["nodes"], graph["edges"], graph["tokens"]
    n_layers = max(nd["layer"] for nd in nodes) + 1
    # one column block per token that has nodes, as wide as its busiest layer
    count: dict[tuple[int, int], int] = {}
    for nd in nodes:
        count[(nd["pos"], nd["layer"])] = count.get((nd["pos"], nd["layer"]), 0) + 1
    columns = sorted({nd["pos"] for nd in nodes})
    width = {p: max(c for (q, _), c in count.items() if q == p) for p in columns}
    start, total = {}, 0.0
    for p in columns:
        start[p], total = total, total + width[p] + 0.5
    pos, used = {}, {}
    for k, nd in enumerate(nodes):
        key = (nd["pos"], nd["layer"])
        j = used.get(key, 0)
        used[key] = j + 1
        pos[k] = (start[nd["pos"]] + j + (width[nd["pos"]] - count[key]) / 2, nd["layer"])
    answer_xy = ((total - 0.5) / 2 - 0.5, n_layers + 0.2)
    fig, ax = plt.subplots(figsize=(min(13, 2.5 + 1.5 * total), 6))
    biggest = max([abs(e["weight"]) for e in edges] + [abs(nd["attr"]) for nd in nodes] + [1e-9])
    for e in edges:
        (x0, y0), (x1, y1) = pos[e["source"]], pos[e["target"]]
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops={
            "arrowstyle": "->", "lw": 0.5 + 4 * abs(e["weight"]) / biggest, "alpha": 0.6,
            "color": "tab:blue" if e["weight"] > 0 else "tab:red"})
    for k, nd in enumerate(nodes):
        x, y = pos[k]
        ax.annotate("", xy=answer_xy, xytext=(x, y), arrowprops={
            "arrowstyle": "->", "lw": 0.5 + 4 * abs(nd["attr"]) / biggest, "alpha": 0.25, "linestyle": "--",
            "color": "tab:blue" if nd["attr"] > 0 else "tab:red"})
        face = "lightgrey" if nd["kind"] == "error" else "moccasin"
        text = labels[k] if labels is not None else (f"L{nd['layer']} err" if nd["kind"] == "error"
                                                     else f"L{nd['layer']}/{nd['feature']}")
        ax.text(x, y, f"{text}\n{nd['attr']:+.2f}", ha="center", va="center", fontsize=7,
                bbox={"boxstyle": "round", "fc": face, "ec": "grey"})
    ax.text(*answer_xy, graph["answer"], ha="center", va="center", fontsize=9,
            bbox={"boxstyle": "round", "fc": "lightgreen", "ec": "grey"})
    ax.set_xticks([start[p] + (width[p] - 1) / 2 for p in columns])
    ax.set_xticklabels([f"'{tokens[p]}' (position {p})" for p in columns])
    ax.set_yticks(range(n_layers))
    ax.set_yticklabels([f"MLP {L}" for L in range(n_layers)])
    ax.set_xlim(-0.8, total - 0.7)
    ax.set_ylim(-0.7, n_layers + 0.6)
    ax.set_title(title or "attribution graph (blue: excites, red: inhibits; dashed: to the answer)")
    fig.tight_layout()
    return fig


@torch.no_grad()
def fact_recall_check(model, transcoders: Sequence[SparseDictionary], relation: str = "city", people: Sequence[str] | None = None,
                      top: int = 3) -> dict:
    """Score the fact-recall circuit against TinyWorld's known facts, person by person.

    For every person, prompt "where does P live ?" (or the relation's question) and
    attribute the true value's LEAD (its logit minus the mean logit of the other values
    of the relation, e.g. the other nine cities) to every transcoder feature, with
    `feature_attribution_to`. The lead isolates what picks THIS city over the others;
    the plain logit also credits features that only say "a city comes next". Then check:

    - "person_feature": the most active layer-0 feature on the person's token has the
      person's name as its top de-embedding token (a feature that fires on the name);
    - "value_feature": among the ``top`` features with the largest attribution, one has
      the true value as the value its decoder row promotes most (through the unembedding);
    - "selectivity": for that value-writing feature, the AUROC of its activation at the
      last position, over the prompts of every person asked about, for "this person's
      value is the same" (1.0: it fires exactly for the people who live in that city);
    - "model_correct": the model's top prediction is the true value.

    Position 0 (``<bos>``) is left out: it is the same in every prompt. Returns the
    per-person rows, the fractions, the mean selectivity, the mean share of |attribution|
    on error terms, and where (layer, token) the value-writing features sit.
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
    for k, person in enumerate(people):
        words = fact_prompt(person, relation)
        ids = torch.tensor(encode(words), device=device)
        truth = WORLD.value(person, relation)
        weights = contrast_weights(truth, values, model.cfg.d_vocab)
        feat, err = feature_attribution_to(model, transcoders, ids, logit_weights=weights)
        feat[:, 0], err[:, 0] = 0.0, 0.0
        person_pos = words.index(person)
        first = min(range(len(transcoders)), key=lambda j: transcoders[j].cfg.layer)
        i, f = first, int(transcoders[first].encode(cache[mlp_in_hook(transcoders[first].cfg.layer)][k, person_pos]).argmax())
        de = de_embedding(model, transcoders[i], f)
        person_feature = model.tokenizer.decode([int(de.argmax())]) == person
        flat = feat.flatten()
        writes = []
        for idx in flat.topk(top).indices.tolist():
            li, rem = divmod(idx, feat.shape[1] * feat.shape[2])
            p, ff = divmod(rem, feat.shape[2])
            effect = feature_logit_effect(model, transcoders[li], ff)[value_ids.to(device)]
            writes.append({"layer": transcoders[li].cfg.layer, "pos": p, "token": words[p], "feature": ff,
                           "attr": round(float(flat[idx]), 3), "writes": values[int(effect.argmax())]})
            if writes[-1]["writes"] == truth:
                where[(writes[-1]["layer"], "name" if p == person_pos else words[p])] += 1
        logits = model(ids[None])[0, -1]
        selectivity = None
        hit = next((w for w in writes if w["writes"] == truth), None)
        same = torch.tensor([t == truth for t in truths])
        if hit is not None and hit["pos"] == len(words) - 1 and 0 < int(same.sum()) < len(people):
            j = next(j for j, tc in enumerate(transcoders) if tc.cfg.layer == hit["layer"])
            scores = last[j][:, hit["feature"]].cpu()
            selectivity = round(float(feature_aurocs(scores[:, None], same)[0]), 3)
        rows.append({"person": person, "truth": truth, "person_layer": transcoders[i].cfg.layer, "person_feature_id": f,
                     "person_feature": person_feature, "top_features": writes, "selectivity": selectivity,
                     "value_feature": hit is not None,
                     "model_correct": model.tokenizer.decode([int(logits.argmax())]) == truth,
                     "lead": round(float(logits @ weights.to(logits)), 3),
                     "error_share": round(float(err.abs().sum() / (feat.abs().sum() + err.abs().sum())), 3)})
    n = len(rows)
    return {"rows": rows, "person_feature": sum(r["person_feature"] for r in rows) / n,
            "value_feature": sum(r["value_feature"] for r in rows) / n,
            "model_correct": sum(r["model_correct"] for r in rows) / n,
            "mean_error_share": round(sum(r["error_share"] for r in rows) / n, 4),
            "mean_selectivity": round(sum(sel) / len(sel), 4) if (sel := [r["selectivity"] for r in rows
                                                                          if r["selectivity"] is not None]) else None,
            "selective": sum(x >= 0.9 for x in sel) / n if sel else 0.0,
            "value_features_at": {f"MLP {L} at {tok}": c for (L, tok), c in where.most_common()}}
