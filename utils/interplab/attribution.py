"""Attribution graphs on a cross-layer transcoder (Ameisen et al. 2025, "Circuit Tracing"), on a CPU.

- `LocalReplacement`: one prompt through the model with attention patterns and LayerNorm scales
  frozen from the real run, every MLP replaced by the CLT's reconstruction plus an error node
  (the true MLP output minus the reconstruction). From the sources (embeddings, feature
  activations, errors) to any feature's pre-activation or any logit the model is then linear.
- `attribution_graph`: the adjacency matrix ``A`` (rows: targets, columns: sources) of direct
  effects between nodes, one backward pass per target row, batched; rows of features and logits.
  Nodes, in circuit-tracer's order: active features, error nodes (layer-major), one embedding
  node per position (token + position embedding), the top logits.
- `normalise_rows`, `influence_matrix`, `node_influence`, `cumulative_mask`, `prune`: influence
  on the logits through all paths on the row-normalised |A| (Neumann series) and pruning by
  cumulative influence, as circuit-tracer does.
- `graph_scores`: the completeness and replacement scores.
- `ablate_feature_logit_change`, `predicted_ablation_change`, `intervention_check`: validating a
  graph by intervening in the REAL model.
- `to_circuit_tracer_json`, `GRAPH_JSON_SCHEMA`: the graph in circuit-tracer's front-end format.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from .dictionaries.circuits import fact_prompt, rate_interval
from .dictionaries.config import mlp_in_hook, mlp_out_hook
from .pairs import ioi_pairs, ioi_positions, sample_ioi_prompts
from .tinyworld import CAST, RELATIONS, WORLD, encode, token_id
from .tinyworld.language import NAMES, ROOMS

# =====================================================================================
# The local replacement model
# =====================================================================================


class LocalReplacement:
    """One prompt: the real run's patterns and LayerNorm scales frozen, the CLT in place of the MLPs, error nodes.

    ``values``: "emb" [pos, d_model] (token + position embedding), "acts" [pos, n_layers, d_sae]
    (the CLT's features on the real run's MLP inputs), "errors" [pos, n_layers, d_model] (true
    MLP output minus the CLT's reconstruction). Run with these values, the replacement model
    reproduces the real run exactly; with any other values it is linear in them.
    """

    def __init__(self, model, clt, tokens: Tensor):
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be one prompt, [pos]; got shape {tuple(tokens.shape)}")
        self.model, self.clt, self.tokens = model, clt, tokens
        self.n_layers = clt.cfg.n_layers
        frozen: dict[str, Tensor] = {}

        def keep(value: Tensor, hook) -> None:
            frozen[hook.name] = value.detach()

        names = lambda n: n.endswith("hook_pattern") or n.endswith("hook_scale")  # noqa: E731
        with torch.no_grad():
            logits, cache = model.run_with_cache(
                tokens[None],
                names_filter=lambda n: names(n) or n in ("hook_embed", "hook_pos_embed") or "mlp" in n or "ln2" in n,
            )
            self.frozen = {k: v for k, v in cache.items() if names(k)}
            x = torch.stack([cache[mlp_in_hook(L)][0] for L in range(self.n_layers)], dim=1)
            y = torch.stack([cache[mlp_out_hook(L)][0] for L in range(self.n_layers)], dim=1)
            acts = clt.encode(x)
            self.values = {
                "emb": (cache["hook_embed"] + cache["hook_pos_embed"])[0],
                "acts": acts,
                "errors": y - clt.decode(acts),
            }
            self.pre = clt.pre_acts(x)  # [pos, n_layers, d_sae]
            self.logits = logits[0]

    def run(self, emb: Tensor, acts: Tensor, errors: Tensor) -> dict[str, Tensor]:
        """The replacement model on a batch of source values ([B, pos, ...] each): "logits" and "pre"."""
        clt, B = self.clt, emb.shape[0]
        pre: dict[int, Tensor] = {}

        def frozen(value: Tensor, hook) -> Tensor:
            f = self.frozen[hook.name]
            return f.expand(B, *f.shape[1:])

        def read(x: Tensor, hook) -> None:
            L = hook.layer()
            if L < self.n_layers:
                pre[L] = x @ clt.W_enc[L] + clt.b_enc[L]

        def write(y: Tensor, hook) -> Tensor:
            L = hook.layer()
            recon = clt.b_dec[L] + sum(acts[:, :, l] @ clt.W_dec[l][:, L - l] for l in range(L + 1))  # noqa: E741
            return recon + errors[:, :, L]

        hooks = [
            (lambda n: n.endswith("hook_pattern") or n.endswith("hook_scale"), frozen),
            ("hook_embed", lambda v, hook: emb),
            ("hook_pos_embed", lambda v, hook: torch.zeros_like(v).expand(B, *v.shape[1:])),
            (lambda n: n.endswith("ln2.hook_normalized"), read),
            (lambda n: n.endswith("hook_mlp_out"), write),
        ]
        logits = self.model.run_with_hooks(self.tokens[None].expand(B, -1), fwd_hooks=hooks)
        return {"logits": logits, "pre": torch.stack([pre[L] for L in range(self.n_layers)], dim=2)}

    def run_linear(
        self, emb: Tensor, errors: Tensor, heads_off: Sequence[tuple[int, int] | None] | None = None
    ) -> Tensor:
        """The graph's model as a function of its input sources: logits [B, pos, vocab].

        As `run`, but the features are not sources: each is recomputed from its input, passing a
        change of its pre-activation on one for one while it is active on this prompt and staying
        at zero otherwise (the linearisation `total_effects` uses). With the prompt's own values it
        reproduces the real run. ``heads_off[b]`` = (layer, head) removes that head's output (its
        frozen-pattern mix of values; the output bias stays) in batch row b: since the model is
        linear in its sources, the change of a logit is the sum of every path of the graph that
        passes through the head.
        """
        clt, B = self.clt, emb.shape[0]
        active = self.values["acts"] != 0  # [pos, n_layers, d_sae]
        acts: dict[int, Tensor] = {}

        def frozen(value: Tensor, hook) -> Tensor:
            f = self.frozen[hook.name]
            return f.expand(B, *f.shape[1:])

        def read(x: Tensor, hook) -> None:
            L = hook.layer()
            if L < self.n_layers:
                acts[L] = (x @ clt.W_enc[L] + clt.b_enc[L]) * active[:, L]

        def write(y: Tensor, hook) -> Tensor:
            L = hook.layer()
            recon = clt.b_dec[L] + sum(acts[l] @ clt.W_dec[l][:, L - l] for l in range(L + 1))  # noqa: E741
            return recon + errors[:, :, L]

        def silence(z: Tensor, hook) -> Tensor:
            z = z.clone()
            for b, off in enumerate(heads_off):
                if off is not None and off[0] == hook.layer():
                    z[b, :, off[1]] = 0.0
            return z

        hooks = [
            (lambda n: n.endswith("hook_pattern") or n.endswith("hook_scale"), frozen),
            ("hook_embed", lambda v, hook: emb),
            ("hook_pos_embed", lambda v, hook: torch.zeros_like(v).expand(B, *v.shape[1:])),
            (lambda n: n.endswith("ln2.hook_normalized"), read),
            (lambda n: n.endswith("hook_mlp_out"), write),
        ]
        if heads_off is not None:
            hooks.append((lambda n: n.endswith("attn.hook_z"), silence))
        return self.model.run_with_hooks(self.tokens[None].expand(B, -1), fwd_hooks=hooks)

    def constants(self) -> dict[str, Tensor]:
        """The replacement model with every source at zero: what the biases alone give ("logits", "pre")."""
        with torch.no_grad():
            z = {k: torch.zeros_like(v)[None] for k, v in self.values.items()}
            out = self.run(z["emb"], z["acts"], z["errors"])
        return {k: v[0] for k, v in out.items()}


# =====================================================================================
# The graph
# =====================================================================================


@dataclass
class AttributionGraph:
    """An attribution graph of one prompt. Node order: features, errors (layer-major), embeddings, logits.

    ``adjacency[t, s]`` is the direct effect of source s on target t (for a feature target, on
    its pre-activation; for a logit, on the logit), in the replacement model with every other
    source held fixed. ``constants[t]`` is what the biases add to t's input, so that
    ``adjacency[t].sum() + constants[t] == inputs[t]`` (the identity the tests assert).
    """

    prompt: list[str]
    token_ids: Tensor
    active: Tensor  # [n_features, 3]: layer, pos, feature
    activations: Tensor  # [n_features]
    adjacency: Tensor  # [n_nodes, n_nodes]
    constants: Tensor  # [n_nodes]
    inputs: Tensor  # [n_nodes]: a feature's pre-activation, a logit (0 for errors and embeddings)
    logit_ids: Tensor  # [n_logits]
    logit_probs: Tensor  # [n_logits]
    n_layers: int
    logit_labels: list[str]

    @property
    def n_pos(self) -> int:
        return len(self.prompt)

    @property
    def n_features(self) -> int:
        return int(self.active.shape[0])

    @property
    def n_nodes(self) -> int:
        return int(self.adjacency.shape[0])

    def slices(self) -> dict[str, slice]:
        f, e, p = self.n_features, self.n_layers * self.n_pos, self.n_pos
        return {
            "features": slice(0, f),
            "errors": slice(f, f + e),
            "embeddings": slice(f + e, f + e + p),
            "logits": slice(f + e + p, self.n_nodes),
        }

    def kind(self, i: int) -> str:
        return next(k for k, s in self.slices().items() if s.start <= i < s.stop)

    def node(self, i: int) -> dict:
        """What node ``i`` is: kind, layer (-1 embeddings, n_layers logits), position, feature id or token."""
        kind, s = self.kind(i), self.slices()
        if kind == "features":
            layer, pos, feat = self.active[i].tolist()
            return {"kind": "feature", "layer": layer, "pos": pos, "feature": feat}
        if kind == "errors":
            layer, pos = divmod(i - s["errors"].start, self.n_pos)
            return {"kind": "error", "layer": layer, "pos": pos, "feature": None}
        if kind == "embeddings":
            pos = i - s["embeddings"].start
            return {"kind": "embedding", "layer": -1, "pos": pos, "feature": None, "token": self.prompt[pos]}
        j = i - s["logits"].start
        return {
            "kind": "logit",
            "layer": self.n_layers,
            "pos": self.n_pos - 1,
            "feature": int(self.logit_ids[j]),
            "token": self.logit_labels[j],
        }

    def label(self, i: int) -> str:
        n = self.node(i)
        if n["kind"] == "feature":
            return f"L{n['layer']}/{n['feature']} @{self.prompt[n['pos']]}"
        if n["kind"] == "error":
            return f"err L{n['layer']} @{self.prompt[n['pos']]}"
        if n["kind"] == "embedding":
            return f"emb {n['token']}"
        return f"logit {n['token']}"

    def logit_weights(self) -> Tensor:
        """[n_nodes]: each logit node's probability, 0 elsewhere (what influence is measured on)."""
        w = torch.zeros(self.n_nodes, dtype=self.adjacency.dtype)
        w[self.slices()["logits"]] = self.logit_probs.to(w)
        return w

    def feature_index(self, layer: int, pos: int, feature: int) -> int | None:
        hit = ((self.active == torch.tensor([layer, pos, feature])).all(1)).nonzero()
        return int(hit[0, 0]) if len(hit) else None


def top_logits(logits: Tensor, max_n: int = 10, desired_prob: float = 0.95) -> tuple[Tensor, Tensor]:
    """(ids, probabilities) of the most likely next tokens until they hold ``desired_prob``, at most ``max_n``."""
    probs = logits.float().softmax(-1)
    p, ids = probs.sort(descending=True)
    n = int((p.cumsum(0) < desired_prob).sum()) + 1
    n = max(1, min(n, max_n))
    return ids[:n], p[:n]


def attribution_graph(
    model,
    clt,
    tokens: Tensor,
    *,
    logit_ids: Sequence[int] | None = None,
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
    batch_size: int = 64,
) -> AttributionGraph:
    """The full attribution graph of one prompt: every active feature, error, embedding and the top logits.

    One backward pass per target row (every active feature and every logit node), ``batch_size``
    rows at a time: the sources are batched leaves, each batch row's target is read from its own
    copy of the run. ``logit_ids`` fixes the logit nodes (default: the top logits holding
    ``desired_logit_prob`` of the probability, at most ``max_n_logits``).
    """
    rep = LocalReplacement(model, clt, tokens)
    vals = rep.values
    n_pos, n_layers = tokens.shape[0], clt.cfg.n_layers
    active = vals["acts"].nonzero()  # [n_f, 3]: pos, layer, feature
    active = active[:, [1, 0, 2]]  # layer, pos, feature
    order = torch.argsort(active[:, 0] * n_pos + active[:, 1], stable=True)
    active = active[order]
    activations = vals["acts"][active[:, 1], active[:, 0], active[:, 2]]
    if logit_ids is None:
        ids, probs = top_logits(rep.logits[-1], max_n_logits, desired_logit_prob)
    else:
        ids = torch.tensor(list(logit_ids))
        probs = rep.logits[-1].float().softmax(-1)[ids]
    n_f, n_l = active.shape[0], len(ids)
    n = n_f + n_layers * n_pos + n_pos + n_l
    A = torch.zeros(n, n)
    targets = [("feature", i) for i in range(n_f)] + [("logit", j) for j in range(n_l)]
    feat_cols = slice(0, n_f)
    err_cols = slice(n_f, n_f + n_layers * n_pos)
    emb_cols = slice(n_f + n_layers * n_pos, n_f + n_layers * n_pos + n_pos)
    for start in range(0, len(targets), batch_size):
        chunk = targets[start : start + batch_size]
        B = len(chunk)
        with torch.enable_grad():
            leaves = {k: v.detach()[None].repeat(B, *([1] * v.ndim)).requires_grad_(True) for k, v in vals.items()}
            out = rep.run(leaves["emb"], leaves["acts"], leaves["errors"])
            picked = []
            for b, (kind, i) in enumerate(chunk):
                if kind == "feature":
                    L, p, f = active[i].tolist()
                    picked.append(out["pre"][b, p, L, f])
                else:
                    picked.append(out["logits"][b, -1, ids[i]])
            grads = torch.autograd.grad(torch.stack(picked).sum(), [leaves["emb"], leaves["acts"], leaves["errors"]])
        g_emb, g_acts, g_err = (g.detach() for g in grads)
        rows = [i if kind == "feature" else n_f + n_layers * n_pos + n_pos + i for kind, i in chunk]
        rows_t = torch.tensor(rows)
        A[rows_t, feat_cols] = g_acts[:, active[:, 1], active[:, 0], active[:, 2]] * activations
        A[rows_t, err_cols] = (g_err * vals["errors"]).sum(-1).transpose(1, 2).reshape(B, -1)
        A[rows_t, emb_cols] = (g_emb * vals["emb"]).sum(-1)
    const = rep.constants()
    constants, inputs = torch.zeros(n), torch.zeros(n)
    constants[:n_f] = const["pre"][active[:, 1], active[:, 0], active[:, 2]]
    inputs[:n_f] = rep.pre[active[:, 1], active[:, 0], active[:, 2]]
    constants[n - n_l :] = const["logits"][-1, ids]
    inputs[n - n_l :] = rep.logits[-1, ids]
    prompt = [model.tokenizer.decode([int(t)]) for t in tokens]
    return AttributionGraph(
        prompt=prompt,
        token_ids=tokens.detach().cpu(),
        active=active.cpu(),
        activations=activations.detach().cpu(),
        adjacency=A,
        constants=constants,
        inputs=inputs.detach(),
        logit_ids=ids.cpu(),
        logit_probs=probs.detach().float().cpu(),
        n_layers=n_layers,
        logit_labels=[model.tokenizer.decode([int(t)]) for t in ids],
    )


# =====================================================================================
# Influence and pruning (circuit-tracer's definitions)
# =====================================================================================


def normalise_rows(A: Float[Tensor, "n n"]) -> Float[Tensor, "n n"]:
    """|A| with every row scaled to sum to 1 (rows that are all zero stay zero)."""
    a = A.abs()
    return a / a.sum(dim=1, keepdim=True).clamp_min(1e-10)


def influence_matrix(A: Float[Tensor, "n n"]) -> Float[Tensor, "n n"]:
    """B = N + N^2 + ... = (I - N)^-1 - I on the row-normalised |A| (float64 inside): every path's share."""
    N = normalise_rows(A.double())
    eye = torch.eye(N.shape[0], dtype=N.dtype)
    return (torch.linalg.solve(eye - N, eye) - eye).to(A.dtype)


def node_influence(graph: AttributionGraph) -> Tensor:
    """[n_nodes]: each node's influence on the logits, w @ B with w the logit nodes' probabilities."""
    w = graph.logit_weights().double()
    N = normalise_rows(graph.adjacency.double())
    # w @ (N + N^2 + ...): the graph is acyclic, so the series ends after at most n_layers + 2 terms
    out, term = torch.zeros_like(w), w @ N
    for _ in range(graph.n_nodes + 1):
        if not term.any():
            break
        out, term = out + term, term @ N
    return out.float()


def cumulative_mask(scores: Tensor, threshold: float) -> Tensor:
    """Keep the strongest scores until they hold ``threshold`` of the total (the smallest such set, ties kept)."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be between 0 and 1, got {threshold}")
    s = scores.flatten().double()
    total = s.sum()
    if total <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    ranked = s.sort(descending=True).values
    share = ranked.cumsum(0) / total
    idx = min(int(torch.searchsorted(share, torch.tensor(threshold, dtype=share.dtype))), len(ranked) - 1)
    return (scores.double() >= ranked[idx]) & (scores > 0)


@dataclass
class Pruned:
    node_mask: Tensor
    edge_mask: Tensor
    influence: Tensor


def prune(graph: AttributionGraph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Pruned:
    """Nodes holding ``node_threshold`` of the influence on the logits, then edges holding ``edge_threshold``.

    Embeddings and logits are always kept. An edge's score is its share of its target's
    (normalised) input times the target's influence (a logit's influence is its probability).
    Feature and error nodes left without an outgoing edge, and features without an incoming
    edge, are dropped, repeatedly, as circuit-tracer does.
    """
    s = graph.slices()
    infl = node_influence(graph)
    keep = cumulative_mask(infl, node_threshold)
    keep[s["embeddings"].start :] = True
    A = graph.adjacency.clone()
    A[~keep] = 0
    A[:, ~keep] = 0
    N = normalise_rows(A.double())
    w = graph.logit_weights().double()
    target_infl, term = w.clone(), w @ N
    for _ in range(graph.n_nodes + 1):
        if not term.any():
            break
        target_infl, term = target_infl + term, term @ N
    edge_scores = N * target_infl[:, None]
    edges = cumulative_mask(edge_scores, edge_threshold)
    inner = slice(0, s["embeddings"].start)
    while True:
        before = keep.clone()
        edges[~keep] = False
        edges[:, ~keep] = False
        keep[inner] &= edges[:, inner].any(0)
        keep[s["features"]] &= edges[s["features"]].any(1)
        if torch.equal(before, keep):
            break
    return Pruned(keep, edges, infl)


def graph_scores(graph: AttributionGraph, edge_mask: Tensor | None = None) -> dict[str, float]:
    """Completeness and replacement scores (Ameisen et al. 2025), on the full graph or on the kept edges.

    completeness: each node's share of (absolute) input coming from non-error nodes, averaged
    over the nodes weighted by their influence on the logits (the logits by their probability);
    replacement: of the influence that reaches the logits from source nodes (embeddings and
    errors, the nodes without inputs), the share that starts at the embeddings, i.e. the part
    of the end-to-end paths that run through features only.
    """
    A = graph.adjacency if edge_mask is None else graph.adjacency * edge_mask
    s = graph.slices()
    N = normalise_rows(A.double())
    w = graph.logit_weights().double()
    infl, term = torch.zeros_like(w), w @ N
    for _ in range(graph.n_nodes + 1):
        if not term.any():
            break
        infl, term = infl + term, term @ N
    non_error = 1.0 - N[:, s["errors"]].sum(1)
    has_input = N.sum(1) > 0
    weight = (infl + w) * has_input
    completeness = float((non_error * weight).sum() / weight.sum().clamp_min(1e-12))
    emb, err = float(infl[s["embeddings"]].sum()), float(infl[s["errors"]].sum())
    return {"completeness": completeness, "replacement": emb / max(emb + err, 1e-12)}


# =====================================================================================
# Validation by intervention in the real model
# =====================================================================================


@torch.no_grad()
def ablate_feature_logit_change(
    model, clt, tokens: Tensor, layer: int, pos: int, feature: int, logit_id: int, scale: float = 0.0
) -> float:
    """Run the REAL model with one feature's decoder writes removed (or rescaled) at its position; a logit's change.

    Feature ``feature`` of ``layer`` at ``pos`` is read from the clean run; (1 - scale) a_f times
    its decoder into layer L is subtracted from the MLP output of every layer L >= layer at
    ``pos`` (scale 0 ablates the feature, 2 doubles it). Every later computation (attention
    patterns, LayerNorm, the real MLPs) responds as the model does. Returns logit(intervened) -
    logit(clean) at the last position.
    """
    x = model.run_with_cache(tokens[None], names_filter=[mlp_in_hook(layer)])[1][mlp_in_hook(layer)][0, pos]
    pre = x @ clt.W_enc[layer][:, feature] + clt.b_enc[layer, feature]
    a = float(torch.relu(pre) * (pre > clt.threshold[layer]))

    def remove(y: Tensor, hook) -> Tensor:
        y = y.clone()
        y[:, pos] -= (1.0 - scale) * a * clt.W_dec[layer][feature, hook.layer() - layer]
        return y

    hooks = [(mlp_out_hook(L), remove) for L in range(layer, clt.cfg.n_layers)]
    clean = model(tokens[None])[0, -1, logit_id]
    ablated = model.run_with_hooks(tokens[None], fwd_hooks=hooks)[0, -1, logit_id]
    return float(ablated - clean)


def total_effects(graph: AttributionGraph) -> Tensor:
    """[n_nodes, n_nodes]: the signed effect on each target of removing each source, through every path.

    A feature's outgoing edges are scaled per unit of its activation (G, the per-unit edges from
    features into every target); an active feature passes a change of its pre-activation on one for
    one (the slope of its JumpReLU). Removing source s changes its direct targets by -A[:, s], and
    the changes then travel along G: target t changes by -((I - G)^-1 A)[t, s].
    """
    A = graph.adjacency.double()
    n_f = graph.n_features
    G = torch.zeros_like(A)
    G[:, :n_f] = A[:, :n_f] / graph.activations.double().clamp_min(1e-12)
    eye = torch.eye(A.shape[0], dtype=A.dtype)
    return torch.linalg.solve(eye - G, A).float()


def predicted_ablation_change(graph: AttributionGraph, node: int, logit: int = 0) -> float:
    """The graph's prediction of the change of logit node ``logit`` when feature node ``node`` is ablated."""
    T = total_effects(graph)
    return -float(T[graph.slices()["logits"].start + logit, node])


def pearson(x: Tensor, y: Tensor) -> float:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    return float((x * y).sum() / (x.norm() * y.norm()).clamp_min(1e-12))


def spearman(x: Tensor, y: Tensor) -> float:
    rank = lambda v: v.double().argsort(stable=True).argsort().double()  # noqa: E731
    return pearson(rank(x), rank(y))


def bootstrap_interval(
    stat: Callable[[Tensor, Tensor], float], x: Tensor, y: Tensor, n: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """A 95% percentile bootstrap interval of ``stat(x, y)`` over resampled pairs."""
    g = torch.Generator().manual_seed(seed)
    vals = []
    for _ in range(n):
        idx = torch.randint(0, len(x), (len(x),), generator=g)
        vals.append(stat(x[idx], y[idx]))
    t = torch.tensor(vals)
    return float(t.quantile(0.025)), float(t.quantile(0.975))


def intervention_check(
    items: Sequence, predict: Callable[[object], float], intervene: Callable[[object], float], tolerance: float = 0.5
) -> dict:
    """Compare a graph's predictions with interventions, item by item (the library's copy of the exercise).

    For every item: predicted = predict(item), observed = intervene(item). Returns
    "predicted" and "observed" (float tensors), "pearson" and "spearman" (None with fewer than
    3 items), and "failures": the indices where the signs differ or the observed change is off
    the prediction by more than ``tolerance`` times the larger of the two magnitudes.
    """
    pred = torch.tensor([float(predict(it)) for it in items], dtype=torch.float64)
    obs = torch.tensor([float(intervene(it)) for it in items], dtype=torch.float64)
    bad = (torch.sign(pred) != torch.sign(obs)) | (
        (obs - pred).abs() > tolerance * torch.maximum(pred.abs(), obs.abs())
    )
    enough = len(items) >= 3
    return {
        "predicted": pred,
        "observed": obs,
        "pearson": pearson(pred, obs) if enough else None,
        "spearman": spearman(pred, obs) if enough else None,
        "failures": bad.nonzero()[:, 0].tolist(),
    }


# =====================================================================================
# Export: circuit-tracer's graph JSON
# =====================================================================================


def _clean_token(t: str) -> str:
    return t.replace("\n", "⏎").replace("\t", "→")


def to_circuit_tracer_json(
    graph: AttributionGraph,
    slug: str,
    scan: str = "interplab-tinyworld-clt",
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    clerps: dict[int, str] | None = None,
    supernodes: Sequence[Sequence[str]] = (),
) -> dict:
    """The pruned graph as circuit-tracer's front end reads it: metadata, qParams, nodes, links.

    Node ids follow circuit-tracer: features "{layer}_{feature}_{pos}", embeddings
    "E_{token_id}_{pos}", logits "{n_layers + 1}_{token_id}_{pos}"; errors are "err_{layer}_{pos}"
    (circuit-tracer writes "0_{layer}_{pos}", which can collide with a layer-0 feature's id). A node's
    influence is its cumulative influence rank share (circuit-tracer's "cumulative_scores").
    """
    pr = prune(graph, node_threshold, edge_threshold)
    infl = pr.influence.double()
    order = infl.argsort(descending=True)
    cum = torch.zeros_like(infl)
    cum[order] = infl[order].cumsum(0) / infl.sum().clamp_min(1e-12)
    offset = 10 ** math.ceil(math.log10(max(2, int(graph.active[:, 2].max()) + 1 if graph.n_features else 2)))
    nodes, ids = [], {}
    s = graph.slices()
    for i in pr.node_mask.nonzero()[:, 0].tolist():
        nd, kind = graph.node(i), graph.kind(i)
        base = {"ctx_idx": nd["pos"], "token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0}
        if kind == "features":
            L, p, f = nd["layer"], nd["pos"], nd["feature"]
            node = {
                "node_id": f"{L}_{f}_{p}",
                "feature": f + offset * L,
                "layer": str(L),
                "feature_type": "cross layer transcoder",
                "jsNodeId": f"{L}_{f}-0",
                "activation": float(graph.activations[i]),
            }
        elif kind == "errors":
            node = {
                "node_id": f"err_{nd['layer']}_{nd['pos']}",
                "feature": -1,
                "layer": str(nd["layer"]),
                "feature_type": "mlp reconstruction error",
                "jsNodeId": f"{nd['layer']}_{nd['pos']}-0",
                "activation": None,
            }
        elif kind == "embeddings":
            tok = int(graph.token_ids[nd["pos"]])
            node = {
                "node_id": f"E_{tok}_{nd['pos']}",
                "feature": nd["pos"],
                "layer": "E",
                "feature_type": "embedding",
                "jsNodeId": f"E_{tok}-{nd['pos']}",
                "activation": None,
            }
        else:
            j = i - s["logits"].start
            tok, layer = int(graph.logit_ids[j]), str(graph.n_layers + 1)
            prob = float(graph.logit_probs[j])
            node = {
                "node_id": f"{layer}_{tok}_{nd['pos']}",
                "feature": tok,
                "layer": layer,
                "feature_type": "logit",
                "jsNodeId": f"L_{tok}-{nd['pos']}",
                "activation": None,
                "token_prob": prob,
                "is_target_logit": j == 0,
                "clerp": f'Output "{_clean_token(graph.logit_labels[j])}" (p={prob:.3f})',
            }
        node = {**base, **node}
        node.setdefault("clerp", (clerps or {}).get(i, ""))
        node["influence"] = float(cum[i])
        ids[i] = node["node_id"]
        nodes.append(node)
    tgt, src = pr.edge_mask.nonzero(as_tuple=True)
    links = [
        {"source": ids[int(a)], "target": ids[int(b)], "weight": float(graph.adjacency[b, a])}
        for b, a in zip(tgt.tolist(), src.tolist())
        if a in ids and b in ids
    ]
    return {
        "metadata": {
            "slug": slug,
            "scan": scan,
            "transcoder_list": [],
            "prompt_tokens": [_clean_token(t) for t in graph.prompt],
            "prompt": "".join(graph.prompt) if not any(t.startswith(" ") for t in graph.prompt[1:]) else "",
            "node_threshold": node_threshold,
        },
        "qParams": {
            "pinnedIds": [],
            "supernodes": [list(sn) for sn in supernodes],
            "linkType": "both",
            "clickedId": "",
            "sg_pos": "",
        },
        "nodes": nodes,
        "links": links,
    }


def write_graph_json(data: dict, folder: str | Path) -> Path:
    """Write ``{slug}.json`` into ``folder`` and list it in the folder's ``graph-metadata.json``.

    That is the layout circuit-tracer's local server serves: one file per graph and an index of
    their metadata (an existing entry with the same slug is replaced).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{data['metadata']['slug']}.json"
    path.write_text(json.dumps(data, indent=1))
    index = folder / "graph-metadata.json"
    listing = json.loads(index.read_text()) if index.is_file() else {"graphs": []}
    listing["graphs"] = [g for g in listing["graphs"] if g.get("slug") != data["metadata"]["slug"]]
    listing["graphs"].append(data["metadata"])
    index.write_text(json.dumps(listing, indent=2))
    return path


_NODE_TYPES = ["cross layer transcoder", "mlp reconstruction error", "embedding", "logit"]
GRAPH_JSON_SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "circuit-tracer attribution graph (front-end JSON), as read from circuit_tracer/frontend/graph_models.py",
    "type": "object",
    "required": ["metadata", "qParams", "nodes", "links"],
    "properties": {
        "metadata": {
            "type": "object",
            "required": ["slug", "scan", "transcoder_list", "prompt_tokens", "prompt"],
            "properties": {
                "slug": {"type": "string"},
                "scan": {"type": "string"},
                "transcoder_list": {"type": "array", "items": {"type": "string"}},
                "prompt_tokens": {"type": "array", "items": {"type": "string"}},
                "prompt": {"type": "string"},
                "node_threshold": {"type": ["number", "null"]},
            },
        },
        "qParams": {
            "type": "object",
            "required": ["pinnedIds", "supernodes", "linkType", "clickedId", "sg_pos"],
            "properties": {
                "pinnedIds": {"type": "array", "items": {"type": "string"}},
                "supernodes": {"type": "array", "items": {"type": "array", "items": {"type": "string"}}},
                "linkType": {"type": "string"},
                "clickedId": {"type": "string"},
                "sg_pos": {"type": "string"},
            },
        },
        "nodes": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["node_id", "feature", "layer", "ctx_idx", "feature_type", "jsNodeId"],
                "properties": {
                    "node_id": {"type": "string"},
                    "feature": {"type": "integer"},
                    "layer": {"type": "string"},
                    "ctx_idx": {"type": "integer", "minimum": 0},
                    "feature_type": {"enum": _NODE_TYPES},
                    "token_prob": {"type": "number"},
                    "is_target_logit": {"type": "boolean"},
                    "run_idx": {"type": "integer"},
                    "reverse_ctx_idx": {"type": "integer"},
                    "jsNodeId": {"type": "string"},
                    "clerp": {"type": "string"},
                    "influence": {"type": ["number", "null"]},
                    "activation": {"type": ["number", "null"]},
                },
            },
        },
        "links": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["source", "target", "weight"],
                "properties": {
                    "source": {"type": "string"},
                    "target": {"type": "string"},
                    "weight": {"type": "number"},
                },
            },
        },
    },
}


def validate_graph_json(data: dict) -> list[str]:
    """Problems of ``data`` against `GRAPH_JSON_SCHEMA` plus what a schema cannot say (links name existing nodes)."""
    problems = []
    try:
        import jsonschema

        problems += [e.message for e in jsonschema.Draft202012Validator(GRAPH_JSON_SCHEMA).iter_errors(data)]
    except ImportError:  # pragma: no cover - jsonschema ships with JupyterLab
        for key in GRAPH_JSON_SCHEMA["required"]:
            if key not in data:
                problems.append(f"missing {key}")
    ids = [n.get("node_id") for n in data.get("nodes", [])]
    if len(set(ids)) != len(ids):
        problems.append("node ids are not unique")
    known = set(ids)
    for link in data.get("links", []):
        for end in ("source", "target"):
            if link.get(end) not in known:
                problems.append(f"link {end} {link.get(end)!r} names no node")
    return problems


# =====================================================================================
# Checked against the world: fact recall, room tracking, indirect objects (TinyWorld only)
# =====================================================================================


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95%) of a rate."""
    return rate_interval(successes, n, z)


def reachable(pruned: Pruned, graph: AttributionGraph, sources: Sequence[int], target: int) -> bool:
    """Whether a path of kept edges leads from any of ``sources`` to ``target`` (kept nodes only)."""
    edges = pruned.edge_mask & pruned.node_mask[:, None] & pruned.node_mask[None, :]
    seen, frontier = set(), [s for s in sources if pruned.node_mask[s]]
    while frontier:
        s = frontier.pop()
        if s == target:
            return True
        if s in seen:
            continue
        seen.add(s)
        frontier += edges[:, s].nonzero()[:, 0].tolist()
    return False


def nodes_at(graph: AttributionGraph, pos: int) -> list[int]:
    """Every feature, error and embedding node at position ``pos``."""
    return [i for i in range(graph.slices()["logits"].start) if graph.node(i)["pos"] == pos]


def feature_write(model, clt, layer: int, feature: int) -> Tensor:
    """[d_vocab]: what a feature's decoders, summed over the layers they write to, add to the logits (via W_U)."""
    return clt.W_dec[layer][feature].sum(0) @ model.W_U


@torch.no_grad()
def fact_recall_score(model, clt, people: Sequence[str] | None = None, relation: str = "city") -> dict:
    """Does the graph route each person's identity to a feature of the right city?

    For "where does P live ?", the graph of the true city's logit is built and pruned; the
    "city feature" is the kept feature at the last position with the largest direct edge into
    the true city's logit. A person counts as a hit when that feature's decoders promote the
    true city most among the relation's values AND a path of kept edges leads to it from a node
    at the person's name. Returns the rate with its Wilson interval and the rows.
    """
    values = RELATIONS[relation][2]
    value_ids = torch.tensor([token_id(v) for v in values])
    rows = []
    for person in people or CAST:
        words = fact_prompt(person, relation)
        ids = torch.tensor(encode(words))
        truth = WORLD.value(person, relation)
        g = attribution_graph(model, clt, ids, logit_ids=[token_id(truth)])
        pr = prune(g)
        last, logit = len(words) - 1, g.slices()["logits"].start
        cands = [i for i in range(g.n_features) if pr.node_mask[i] and g.node(i)["pos"] == last]
        row = {"person": person, "truth": truth, "city_feature": None, "writes": None, "routed": False}
        if cands:
            best = max(cands, key=lambda i: float(g.adjacency[logit, i]))
            nd = g.node(best)
            writes = values[int(feature_write(model, clt, nd["layer"], nd["feature"])[value_ids].argmax())]
            row.update(
                city_feature=f"L{nd['layer']}/{nd['feature']}",
                writes=writes,
                routed=reachable(pr, g, nodes_at(g, words.index(person)), best),
            )
        row["hit"] = row["writes"] == truth and row["routed"]
        rows.append(row)
    hits = sum(r["hit"] for r in rows)
    return {"rate": hits / len(rows), "interval": wilson(hits, len(rows)), "n": len(rows), "rows": rows}


def room_prompts(n: int, seed: int = 0) -> list[dict]:
    """Two-person room prompts "<bos> A r1 . B r2 . where is X" with X's room as the answer."""
    rng = random.Random(f"rooms-{seed}")
    out = []
    for _ in range(n):
        a, b = rng.sample(NAMES, 2)
        ra, rb = rng.sample(ROOMS, 2)
        x = rng.choice([a, b])
        words = ["<bos>", a, ra, ".", b, rb, ".", "where", "is", x]
        out.append(
            {"words": words, "answer": ra if x == a else rb, "right": 2 if x == a else 5, "wrong": 5 if x == a else 2}
        )
    return out


@torch.no_grad()
def room_binding_score(model, clt, n: int = 24, seed: int = 0) -> dict:
    """Does the graph pass through the right person-room binding?

    On two-person room prompts the model answers X's room; in the pruned graph of that logit,
    a hit is a prompt where the nodes at the position of X's room carry more influence than the
    nodes at the other person's room. Prompts the model gets wrong are counted and left out.
    """
    rows = []
    for p in room_prompts(n, seed):
        ids = torch.tensor(encode(p["words"]))
        correct = int(model(ids[None])[0, -1].argmax()) == token_id(p["answer"])
        g = attribution_graph(model, clt, ids, logit_ids=[token_id(p["answer"])])
        infl = node_influence(g)
        right, wrong = float(infl[nodes_at(g, p["right"])].sum()), float(infl[nodes_at(g, p["wrong"])].sum())
        rows.append({"prompt": " ".join(p["words"][1:]), "correct": correct, "right": right, "wrong": wrong})
    kept = [r for r in rows if r["correct"]]
    hits = sum(r["right"] > r["wrong"] for r in kept)
    return {
        "rate": hits / max(1, len(kept)),
        "interval": wilson(hits, max(1, len(kept))),
        "n": len(kept),
        "model_wrong": len(rows) - len(kept),
        "rows": rows,
    }


@torch.no_grad()
def ioi_agreement(model, clt, n: int = 6, seed: int = 0) -> dict:
    """Does the answer's graph draw more influence from the IO name than from the first mention of S?

    For each indirect-object prompt, the graph of the IO logit; a hit is a prompt whose nodes at
    the IO position carry more influence than the nodes at S1. Returns the rate, its Wilson
    interval and the rows.
    """
    pairs = ioi_pairs(model, sample_ioi_prompts(n, seed=seed, model=model), corruption="swap_names")
    where = ioi_positions(pairs)
    rows = []
    for k in range(pairs["clean"].shape[0]):
        g = attribution_graph(model, clt, pairs["clean"][k], logit_ids=[int(pairs["answer"][k])])
        infl = node_influence(g)
        io, s1 = int(where["IO"][k]), int(where["S1"][k])
        rows.append({"io": float(infl[nodes_at(g, io)].sum()), "s1": float(infl[nodes_at(g, s1)].sum())})
    hits = sum(r["io"] > r["s1"] for r in rows)
    return {"routing": hits / len(rows), "routing_interval": wilson(hits, len(rows)), "n": len(rows), "rows": rows}


def _logit_diffs(logits: Tensor, answer: Tensor, wrong: Tensor) -> Tensor:
    final = logits[:, -1]
    return final.gather(-1, answer[:, None])[:, 0] - final.gather(-1, wrong[:, None])[:, 0]


@torch.no_grad()
def head_patching_per_prompt(model, pairs: dict[str, Tensor], component: str = "z", freeze_patterns: bool = False):
    """[n_prompts, n_layers, n_heads]: how much each prompt's logit difference drops when one head is noised.

    Noising as in chapter 06: the model runs on the clean prompts with one head's ``component``
    ("z": its output; "v": its values; "pattern": its attention pattern) taken from the corrupted
    prompts; the drop is clean minus patched logit difference (answer minus wrong name, final
    position), per prompt. ``freeze_patterns``: every head's attention pattern is held at its clean
    value during the patched run (with "v", the head moves the corrupted values where the clean
    prompt looked: attention as the replacement model sees it).
    """
    clean, corrupted, answer, wrong = pairs["clean"], pairs["corrupted"], pairs["answer"], pairs["wrong"]
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    name = lambda L: f"blocks.{L}.attn.hook_{component}"  # noqa: E731
    source = model.run_with_cache(corrupted, names_filter=[name(L) for L in range(n_layers)])[1]
    patterns = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_pattern"))[1]
    base = _logit_diffs(model(clean), answer, wrong)
    out = torch.zeros(clean.shape[0], n_layers, n_heads)
    for L in range(n_layers):
        for h in range(n_heads):

            def paste(x: Tensor, hook, h=h) -> Tensor:
                x = x.clone()
                if component == "pattern":
                    x[:, h] = source[hook.name][:, h]
                else:
                    x[:, :, h] = source[hook.name][:, :, h]
                return x

            hooks = [(name(L), paste)]
            if freeze_patterns:
                hooks = [(k, lambda x, hook: patterns[hook.name]) for k in patterns] + hooks
            out[:, L, h] = base - _logit_diffs(model.run_with_hooks(clean, fwd_hooks=hooks), answer, wrong)
    return out


@torch.no_grad()
def head_path_sums(model, clt, pairs: dict[str, Tensor]) -> Tensor:
    """[n_prompts, n_layers, n_heads]: the logit difference each head carries in each prompt's graph.

    For each clean prompt, the local replacement model (`LocalReplacement.run_linear`) with and
    without one head's output: the difference is the sum of every path of the attribution graph,
    from the embeddings and error nodes through features and frozen attention to the logit
    difference (answer minus wrong name), that passes through the head. Attention patterns are
    frozen, so a head is credited only for what it moves, never for where it looks.
    """
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    heads = [(L, h) for L in range(n_layers) for h in range(n_heads)]
    out = torch.zeros(pairs["clean"].shape[0], n_layers, n_heads)
    for k in range(pairs["clean"].shape[0]):
        rep = LocalReplacement(model, clt, pairs["clean"][k])
        emb, err = rep.values["emb"][None], rep.values["errors"][None]
        B = len(heads) + 1
        logits = rep.run_linear(emb.expand(B, -1, -1), err.expand(B, -1, -1, -1), [None, *heads])
        ld = _logit_diffs(logits, pairs["answer"][k].expand(B), pairs["wrong"][k].expand(B))
        out[k] = (ld[0] - ld[1:]).reshape(n_layers, n_heads)
    return out


def head_ranking_agreement(graph: Tensor, patching: Tensor, top: int = 3) -> dict:
    """Agreement of two per-prompt head scores [n_prompts, n_layers, n_heads], averaged over the prompts.

    "spearman": rank correlation over all heads of the magnitudes of the two mean scores;
    "signed_spearman": the same on the signed means; "overlap": the share of the ``top`` heads by
    magnitude that both name; "graph_heads", "patching_heads": those heads, strongest first.
    """
    g, p = graph.mean(0).flatten(), patching.mean(0).flatten()
    n_heads = graph.shape[-1]
    name = lambda i: f"L{i // n_heads}H{i % n_heads}"  # noqa: E731
    gt, pt = g.abs().topk(top).indices.tolist(), p.abs().topk(top).indices.tolist()
    return {
        "spearman": spearman(g.abs(), p.abs()),
        "signed_spearman": spearman(g, p),
        "overlap": len(set(gt) & set(pt)) / top,
        "graph_heads": [name(i) for i in gt],
        "patching_heads": [name(i) for i in pt],
    }


def random_overlap_baseline(n_heads: int, top: int) -> dict:
    """Top-k overlap of two head sets of size ``top`` drawn at random from ``n_heads``: its mean and P(>= 2/3 of k)."""
    total = math.comb(n_heads, top)
    p = [math.comb(top, j) * math.comb(n_heads - top, top - j) / total for j in range(top + 1)]
    need = math.ceil(2 * top / 3)
    return {"mean": top / n_heads, "p_two_thirds": sum(p[need:])}


def spearman_null(n: int, n_draws: int = 2000, seed: int = 0) -> float:
    """The 97.5% quantile of Spearman's rho between two random rankings of ``n`` items (no agreement at all)."""
    g = torch.Generator().manual_seed(seed)
    ref = torch.arange(n).double()
    rhos = torch.tensor([spearman(torch.randperm(n, generator=g).double(), ref) for _ in range(n_draws)])
    return float(rhos.quantile(0.975))


@torch.no_grad()
def ioi_head_agreement(model, clt, n: int = 64, seed: int = 0, top: int = 3, n_boot: int = 1000) -> dict:
    """Do the graphs credit the heads that activation patching finds, on the same indirect-object prompts?

    Graph: `head_path_sums`, the logit difference routed through each head (attention frozen).
    Patching (chapter 06's method, ``swap_names`` corruption, noising): "z", each head's output;
    "v_frozen", its values with every attention pattern held at the clean run's (what a head moves
    when where it looks cannot change: attention as the graph sees it); "pattern", its attention
    pattern alone (where it looks: invisible to the graph). Agreement (`head_ranking_agreement`)
    of the graph with "z" and with "v_frozen", each with 95% bootstrap intervals over the prompts
    (and the share of resamples where the top-``top`` overlap is at least 2/3), beside the chance
    levels: random head sets' overlap and the 97.5% quantile of rho for random rankings.
    """
    pairs = ioi_pairs(model, sample_ioi_prompts(n, seed=seed, model=model), corruption="swap_names")
    graph = head_path_sums(model, clt, pairs)
    patching = {
        "z": head_patching_per_prompt(model, pairs, "z"),
        "v_frozen": head_patching_per_prompt(model, pairs, "v", freeze_patterns=True),
        "pattern": head_patching_per_prompt(model, pairs, "pattern"),
    }
    gen = torch.Generator().manual_seed(seed)
    draws = [torch.randint(0, n, (n,), generator=gen) for _ in range(n_boot)]
    out = {"n": n, "top": top, "graph": graph, "patching": patching}
    for key in ("z", "v_frozen"):
        res = head_ranking_agreement(graph, patching[key], top)
        boot = [head_ranking_agreement(graph[i], patching[key][i], top) for i in draws]
        rho = torch.tensor([b["spearman"] for b in boot])
        res["spearman_interval"] = (float(rho.quantile(0.025)), float(rho.quantile(0.975)))
        res["overlap_at_least_two_thirds"] = sum(b["overlap"] >= 2 / 3 - 1e-9 for b in boot) / n_boot
        out[key] = res
    n_heads = model.cfg.n_layers * model.cfg.n_heads
    out["random"] = random_overlap_baseline(n_heads, top) | {"spearman_97_5": spearman_null(n_heads)}
    z, pattern = patching["z"].mean(0), patching["pattern"].mean(0)
    out["pattern_share"] = float(pattern.abs().max() / z.abs().max())
    out["z_vs_v_frozen_spearman"] = spearman(z.flatten(), patching["v_frozen"].mean(0).flatten())
    return out


def validation_items(model, clt, prompts: Sequence[Tensor], per_prompt: int = 5) -> list[dict]:
    """(prompt, feature) items for `intervention_check`: each prompt's ``per_prompt`` most influential features."""
    items = []
    for ids in prompts:
        g = attribution_graph(model, clt, ids)
        infl = node_influence(g)[: g.n_features]
        T = total_effects(g)
        logit = g.slices()["logits"].start
        for i in infl.topk(min(per_prompt, g.n_features)).indices.tolist():
            nd = g.node(i)
            items.append(
                {
                    "tokens": ids,
                    "label": f"{' '.join(g.prompt[1:])} | {g.label(i)}",
                    "layer": nd["layer"],
                    "pos": nd["pos"],
                    "feature": nd["feature"],
                    "logit_id": int(g.logit_ids[0]),
                    "predicted": -float(T[logit, i]),
                }
            )
    return items
