"""Automatic circuit discovery at the level of edges, and scoring circuits as the MIB benchmark does.

The computational graph (as in MIB's circuit track, Mueller et al. 2025):

- senders (nodes that write to the residual stream): ``input`` (token plus position
  embeddings), every attention head ``a{l}.h{h}`` (its output z @ W_O, without the bias) and
  every MLP ``m{l}``;
- receivers (nodes that read it): every head's query, key and value inputs separately,
  ``a{l}.h{h}<q>`` / ``<k>`` / ``<v>`` (MIB splits head inputs into q, k and v too), every MLP
  ``m{l}``, and ``logits`` (the input of the final layer norm);
- an edge from every sender to every receiver downstream of it.

A receiver's input is the sum of its upstream senders' outputs (plus the constant biases), so
an edge can be patched exactly: run the model with that one receiver's input changed by
(sender's corrupted output - sender's clean output), and recompute everything downstream
(`edge_patch_effects`). A circuit is a set of edges; running a circuit replaces, at each
receiver, the output of every sender whose edge is NOT in the circuit by its value on the
corrupted run (MIB's "patching" ablation, `run_circuit`).

Methods that score every edge: exact edge patching (one forward pass per edge, batched),
edge attribution patching (EAP: one forward and backward pass on the clean run, one forward
pass on the corrupted run; Syed et al. 2023), EAP with integrated gradients (EAP-IG: the
gradient averaged over inputs interpolated between clean and corrupted embeddings;
Hanna et al. 2024), node patching (each head or MLP patched as a whole; the chapter on
patching), random scores, and an ACDC-style greedy pruning (Conmy et al. 2023) with exact
edge patching.

Chapter 07's exercises ask learners to write some of this (the edge-patched input, EAP's scores,
EAP-IG's average, the faithfulness curve, CPR and CMD); the answer key holds their
references and tests/test_ch07_circuit_discovery.py checks that the two agree.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .hooks import act_name
from .models import is_tinyworld
from .pairs import induction_pairs, ioi_pairs, sample_induction_prompts, sample_ioi_prompts
from .patching import logit_diff
from .tinyworld import language as TW

# MIB's circuit sizes, as fractions of all edges
FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
QKV = ("q", "k", "v")


# --- the graph -----------------------------------------------------------------------------------


@dataclass
class Graph:
    """The edge-level computational graph of a HookedTransformer (see the module docstring).

    Attributes:
        senders: names of the S senders, in the order the model computes them.
        receivers: names of the R receivers, in the order the model computes them.
        valid: [S, R] bool, True where sender s is upstream of receiver r (an edge).
        sender_layer / receiver_layer: the block of each node (-1 for input, n_layers for logits).
    """

    n_layers: int
    n_heads: int
    senders: list[str] = field(default_factory=list)
    receivers: list[str] = field(default_factory=list)
    valid: Tensor | None = None

    @classmethod
    def of(cls, model) -> Graph:
        n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
        g = cls(n_layers, n_heads)
        g.senders = ["input"]
        for layer in range(n_layers):
            g.senders += [f"a{layer}.h{h}" for h in range(n_heads)] + [f"m{layer}"]
        for layer in range(n_layers):
            g.receivers += [f"a{layer}.h{h}<{x}>" for x in QKV for h in range(n_heads)] + [f"m{layer}"]
        g.receivers.append("logits")
        valid = torch.zeros(len(g.senders), len(g.receivers), dtype=torch.bool)
        for r in range(len(g.receivers)):
            valid[: g.n_upstream(r), r] = True
        g.valid = valid
        return g

    # indices -------------------------------------------------------------------------------
    def head_sender(self, layer: int, head: int) -> int:
        return 1 + layer * (self.n_heads + 1) + head

    def mlp_sender(self, layer: int) -> int:
        return 1 + layer * (self.n_heads + 1) + self.n_heads

    def qkv_receivers(self, layer: int, which: str) -> list[int]:
        start = layer * (3 * self.n_heads + 1) + QKV.index(which) * self.n_heads
        return list(range(start, start + self.n_heads))

    def mlp_receiver(self, layer: int) -> int:
        return layer * (3 * self.n_heads + 1) + 3 * self.n_heads

    @property
    def logits_receiver(self) -> int:
        return len(self.receivers) - 1

    def n_upstream(self, r: int) -> int:
        """How many senders (a prefix of `senders`) are upstream of receiver r."""
        if r == self.logits_receiver:
            return len(self.senders)
        layer, within = divmod(r, 3 * self.n_heads + 1)
        if within < 3 * self.n_heads:  # a head input: everything of earlier layers
            return 1 + layer * (self.n_heads + 1)
        return 1 + layer * (self.n_heads + 1) + self.n_heads  # an MLP: also its own layer's heads

    @property
    def n_edges(self) -> int:
        return int(self.valid.sum())

    def edges(self) -> list[tuple[int, int]]:
        """(sender, receiver) index pairs of every edge, sender-major."""
        return [tuple(e) for e in self.valid.nonzero().tolist()]

    def edge_name(self, s: int, r: int) -> str:
        return f"{self.senders[s]}->{self.receivers[r]}"


# --- running the model on the graph ---------------------------------------------------------------


@contextlib.contextmanager
def split_inputs(model):
    """Give every head its own q/k/v input hook and every MLP an input hook, for the duration."""
    old = (model.cfg.use_split_qkv_input, model.cfg.use_hook_mlp_in)
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    try:
        yield
    finally:
        model.set_use_split_qkv_input(old[0])
        model.set_use_hook_mlp_in(old[1])


def _graph_hooks(model, graph: Graph, record: list, correction: Callable[[int, list[int]], Tensor | None]):
    """Hooks that record every sender's output into `record` (in sender order) and add
    ``correction(n_upstream, receivers)`` ([batch, pos, len(receivers), d_model] or None) to receiver inputs."""
    n_heads = graph.n_heads
    hooks = []
    embed: dict[str, Tensor] = {}

    def keep_embed(act, hook):
        embed[hook.name] = act
        if len(embed) == 2:
            record.append(embed[act_name("embed")] + embed[act_name("pos_embed")])
        return act

    hooks += [(act_name("embed"), keep_embed), (act_name("pos_embed"), keep_embed)]
    for layer in range(graph.n_layers):
        for which in QKV:

            def qkv(act, hook, layer=layer, which=which):
                add = correction(1 + layer * (n_heads + 1), graph.qkv_receivers(layer, which))
                return act if add is None else act + add

            hooks.append((f"blocks.{layer}.hook_{which}_input", qkv))

        def heads(z, hook, layer=layer):
            out = torch.einsum("bphe,hed->bphd", z, model.blocks[layer].attn.W_O)
            record.extend(out.unbind(2))
            return z

        hooks.append((act_name("z", layer), heads))

        def mlp_in(act, hook, layer=layer):
            add = correction(1 + layer * (n_heads + 1) + n_heads, [graph.mlp_receiver(layer)])
            return act if add is None else act + add[:, :, 0]

        def mlp_out(act, hook):
            record.append(act)
            return act

        hooks += [(f"blocks.{layer}.hook_mlp_in", mlp_in), (act_name("mlp_out", layer), mlp_out)]

    def final(act, hook):
        add = correction(len(graph.senders), [graph.logits_receiver])
        return act if add is None else act + add[:, :, 0]

    hooks.append((act_name("resid_post", graph.n_layers - 1), final))
    return hooks


def sender_outputs(model, graph: Graph, tokens: Tensor) -> Tensor:
    """Every sender's output on `tokens`: [batch, pos, n_senders, d_model] (no gradient)."""
    record: list[Tensor] = []
    with torch.no_grad(), split_inputs(model):
        model.run_with_hooks(
            tokens.to(model.cfg.device), fwd_hooks=_graph_hooks(model, graph, record, lambda n, r: None)
        )
    return torch.stack(record, dim=2)


def run_circuit(
    model,
    graph: Graph,
    tokens: Tensor,
    corrupted_out: Tensor,
    keep: Tensor | None = None,
    probe: Tensor | None = None,
    embed_mix: tuple[Tensor, float] | None = None,
) -> Tensor:
    """Logits of the model on `tokens` with every edge outside the circuit patched from the corrupted run.

    Args:
        keep: [S, R] (bool or float; 1 = the edge is in the circuit) or None (every edge kept:
            the clean run). At receiver r, the output of each upstream sender s with keep 0 is
            replaced by its value in `corrupted_out` ([batch, pos, S, d_model]); the senders'
            outputs are otherwise those of this run (recomputed, nothing frozen).
        probe: an optional [batch, pos, R, d_model] tensor added to every receiver's input
            (zeros requiring grad give the gradient of the output wrt every receiver input).
        embed_mix: (other token embeddings [batch, pos, d_model], alpha): the token embeddings
            become (1 - alpha) * own + alpha * other (EAP-IG's interpolation; positions are shared).
    """
    record: list[Tensor] = []
    drop = None if keep is None else (1.0 - keep.to(corrupted_out.dtype))

    def correction(n_up: int, receivers: list[int]) -> Tensor | None:
        add = None
        if drop is not None:
            delta = corrupted_out[:, :, :n_up] - torch.stack(record[:n_up], dim=2)
            add = torch.einsum("bpsd,sr->bprd", delta, drop[:n_up, receivers])
        if probe is not None:
            add = probe[:, :, receivers] if add is None else add + probe[:, :, receivers]
        return add

    hooks = _graph_hooks(model, graph, record, correction)
    if embed_mix is not None:
        other, alpha = embed_mix

        def mix(act, hook):
            return act + alpha * (other - act)

        hooks = [(act_name("embed"), mix)] + hooks
    with split_inputs(model):
        return model.run_with_hooks(tokens.to(model.cfg.device), fwd_hooks=hooks)


# --- tasks --------------------------------------------------------------------------------------------

TASKS = ("ioi", "induction", "facts", "rooms")
TINYWORLD_TASKS = ("facts", "rooms")


def _tw_tokens(model, words: list[str]) -> list[int]:
    return model.to_tokens(" ".join(words))[0].tolist()


def facts_pairs(model, n: int, seed: int = 0) -> dict[str, Tensor]:
    """Fact recall (TinyWorld only): "where does P live ?" -> P's city; corrupted: another person
    P2 who lives elsewhere. answer = P's city, wrong = P2's city."""
    rng = random.Random(f"facts-{seed}")
    held = TW.WORLD.heldout_queries
    cast = [p for p in TW.CAST if (p, "city") not in held]
    clean, corrupted, answer, wrong = [], [], [], []
    while len(clean) < n:
        p, q = rng.sample(cast, 2)
        cp, cq = TW.WORLD.value(p, "city"), TW.WORLD.value(q, "city")
        if cp == cq:
            continue
        clean.append(_tw_tokens(model, ["where", "does", p, "live", "?"]))
        corrupted.append(_tw_tokens(model, ["where", "does", q, "live", "?"]))
        answer.append(model.to_single_token(cp))
        wrong.append(model.to_single_token(cq))
    return {
        k: torch.tensor(v) for k, v in zip(("clean", "corrupted", "answer", "wrong"), (clean, corrupted, answer, wrong))
    }


def room_prompts(n: int, seed: int = 0, moves: int = 0) -> list[dict]:
    """Room-tracking prompts (TinyWorld only): two people each enter a room, then `moves` moves of
    the person asked about, then "where is X". Each dict has "words" (without <bos>), "person",
    "room" (X's room: the answer), "other_room" (a room X was never in, for the corruption), and
    "slot" (the word index of X's last stated room)."""
    rng = random.Random(f"rooms-{seed}-{moves}")
    out = []
    for _ in range(n):
        a, b = rng.sample(TW.NAMES[:40], 2)
        rooms = rng.sample(TW.ROOMS, 3 + moves)
        x = rng.choice([a, b])
        words = [a, rooms[0], ".", b, rooms[1], "."]
        room = rooms[0] if x == a else rooms[1]
        slot = 1 if x == a else 4
        for m in range(moves):
            words += [rng.choice(["then", "later"]), x, rooms[3 + m], "."]
            room, slot = rooms[3 + m], len(words) - 2
        out.append(dict(words=words + ["where", "is", x], person=x, room=room, other_room=rooms[2], slot=slot))
    return out


def rooms_pairs(model, n: int, seed: int = 0, moves: int = 0, corruption: str = "room") -> dict[str, Tensor]:
    """Room tracking (TinyWorld only), "A r1 . B r2 . where is X" -> X's room, as clean/corrupted pairs.

    corruption "room": the corrupted prompt puts X in another room at X's last statement (one word
    changed); answer = X's room, wrong = that other room. corruption "person": the corrupted prompt
    asks about the other person (the last word changed); answer = X's room, wrong = the other
    person's room (the chapter's held-out variation)."""
    if corruption not in ("room", "person"):
        raise ValueError(f"corruption must be 'room' or 'person', not {corruption!r}")
    clean, corrupted, answer, wrong = [], [], [], []
    for p in room_prompts(n, seed, moves):
        words = p["words"]
        if corruption == "room":
            bad = list(words)
            bad[p["slot"]] = p["other_room"]
            other = p["other_room"]
        else:
            first = words[0] == p["person"]
            bad = words[:-1] + [words[3] if first else words[0]]
            other = words[4] if first else words[1]
        clean.append(_tw_tokens(model, words))
        corrupted.append(_tw_tokens(model, bad))
        answer.append(model.to_single_token(p["room"]))
        wrong.append(model.to_single_token(other))
    return {
        k: torch.tensor(v) for k, v in zip(("clean", "corrupted", "answer", "wrong"), (clean, corrupted, answer, wrong))
    }


def faithfulness_on(task: EdgeTask, edge_mask: Tensor) -> float:
    """The faithfulness of one circuit (a bool mask over `graph.edges()` order) on `task`."""
    m = task.circuit_metric(task.edge_keep(edge_mask))
    return (m - task.m_corrupted) / (task.m_clean - task.m_corrupted)


def task_pairs(model, task: str, n: int = 16, seed: int = 0) -> dict[str, Tensor]:
    """Clean/corrupted pairs of one task ("ioi", "induction", "facts", "rooms"), as `interplab.pairs` builds them."""
    if task == "ioi":
        return ioi_pairs(model, sample_ioi_prompts(n, seed=seed, template=0, model=model), "third_name")
    if task == "induction":
        seqs, reps = sample_induction_prompts(n, length=8, seed=seed, model=model)
        return induction_pairs(model, seqs, cut=4, replacements=reps, corruption="answer")
    if task not in TINYWORLD_TASKS:
        raise ValueError(f"task must be one of {TASKS}, not {task!r}")
    if not is_tinyworld(model):
        raise ValueError(f"the {task!r} task needs TinyWorld's facts and rooms (the bundled model)")
    return facts_pairs(model, n, seed) if task == "facts" else rooms_pairs(model, n, seed)


def mean_logit_diff(pairs: dict[str, Tensor]) -> Callable[[Tensor], Tensor]:
    """The metric: mean logit difference (answer minus wrong) at the final position (differentiable)."""

    def metric(logits: Tensor) -> Tensor:
        return logit_diff(logits, pairs["answer"].to(logits.device), pairs["wrong"].to(logits.device)).mean()

    return metric


# --- a task bundled with its graph and cached runs ------------------------------------------------------


class EdgeTask:
    """One task on one model: the pairs, the metric, the graph, the clean and corrupted sender outputs."""

    def __init__(self, model, pairs: dict[str, Tensor], graph: Graph | None = None):
        self.model, self.pairs = model, pairs
        self.graph = graph or Graph.of(model)
        self.metric = mean_logit_diff(pairs)
        self.clean_out = sender_outputs(model, self.graph, pairs["clean"])
        self.corrupted_out = sender_outputs(model, self.graph, pairs["corrupted"])
        with torch.no_grad():
            self.corrupted_embed = model.embed(pairs["corrupted"].to(model.cfg.device))
        with torch.no_grad():
            self.m_clean = self.metric(model(pairs["clean"].to(model.cfg.device))).item()
            self.m_corrupted = self.metric(model(pairs["corrupted"].to(model.cfg.device))).item()

    def circuit_metric(self, keep: Tensor) -> float:
        """The metric of the circuit `keep` ([S, R] bool; edges outside patched from the corrupted run)."""
        with torch.no_grad():
            return self.metric(
                run_circuit(self.model, self.graph, self.pairs["clean"], self.corrupted_out, keep)
            ).item()

    def edge_keep(self, edge_mask: Tensor) -> Tensor:
        """[S, R] keep-mask of the circuit given as a bool mask over `graph.edges()` order."""
        keep = torch.zeros_like(self.graph.valid)
        idx = self.graph.valid.nonzero()
        sel = idx[edge_mask]
        keep[sel[:, 0], sel[:, 1]] = True
        return keep


# --- scoring methods --------------------------------------------------------------------------------------


def edge_patch_effects(
    task: EdgeTask, groups: Sequence[Sequence[tuple[int, int]]], chunk: int = 16, progress: Callable | None = None
) -> Tensor:
    """Exact patching: for each group of edges, metric(run with those edges patched) - metric(clean).

    An edge (s, r) is patched by adding (corrupted output of s - clean output of s) to r's input
    in the clean run and recomputing everything downstream of r. A group of all edges out of
    one sender patches that node (its output replaced everywhere downstream). Many groups run
    in one batched forward pass.
    """
    model, graph = task.model, task.graph
    delta = task.corrupted_out - task.clean_out  # [batch, pos, S, d]
    tokens = task.pairs["clean"].to(model.cfg.device)
    batch = tokens.shape[0]
    out = torch.zeros(len(groups))
    starts = range(0, len(groups), chunk)
    for start in progress(starts, desc="exact patching") if progress else starts:
        part = groups[start : start + chunk]
        n = len(part)
        # adds[r] = list of (row group k, sender s)
        adds: dict[int, list[tuple[int, int]]] = {}
        for k, group in enumerate(part):
            for s, r in group:
                adds.setdefault(r, []).append((k, s))

        def correction(n_up: int, receivers: list[int], adds=adds, n=n) -> Tensor | None:
            if not any(r in adds for r in receivers):
                return None
            add = torch.zeros(n, batch, delta.shape[1], len(receivers), delta.shape[-1], device=delta.device)
            for j, r in enumerate(receivers):
                for k, s in adds.get(r, []):
                    add[k, :, :, j] += delta[:, :, s]
            return add.view(n * batch, delta.shape[1], len(receivers), delta.shape[-1])

        record: list[Tensor] = []
        with torch.no_grad(), split_inputs(model):
            logits = model.run_with_hooks(tokens.repeat(n, 1), fwd_hooks=_graph_hooks(model, graph, record, correction))
            for k in range(n):
                out[start + k] = task.metric(logits[k * batch : (k + 1) * batch]).item() - task.m_clean
    return out


def exact_edge_scores(
    task: EdgeTask, edges: Sequence[tuple[int, int]] | None = None, progress: Callable | None = None
) -> Tensor:
    """Exact edge patching of every edge (or `edges`): [S, R], 0 off the graph (and for edges not given)."""
    edges = task.graph.edges() if edges is None else list(edges)
    effects = edge_patch_effects(task, [[e] for e in edges], progress=progress)
    scores = torch.zeros(task.graph.valid.shape)
    for (s, r), v in zip(edges, effects):
        scores[s, r] = v
    return scores


def node_patch_scores(task: EdgeTask) -> Tensor:
    """Node patching as an edge ranking: each head and MLP patched as a whole (all its out-edges);
    an edge scores the smaller |effect| of its two ends (input and logits count as infinite),
    so the top edges are the subgraph among the most important nodes."""
    graph = task.graph
    edges = graph.edges()
    groups = [[(s, r) for (s2, r) in edges if s2 == s] for s in range(1, len(graph.senders))]
    node = torch.full((len(graph.senders),), float("inf"))
    node[1:] = edge_patch_effects(task, groups).abs()
    # a receiver's node effect: its sender node's (a head's q/k/v inputs belong to the head)
    recv_node = torch.full((len(graph.receivers),), float("inf"))
    for layer in range(graph.n_layers):
        for which in QKV:
            for h, r in enumerate(graph.qkv_receivers(layer, which)):
                recv_node[r] = node[graph.head_sender(layer, h)]
        recv_node[graph.mlp_receiver(layer)] = node[graph.mlp_sender(layer)]
    scores = torch.minimum(node[:, None], recv_node[None, :])
    finite = scores[torch.isfinite(scores)]
    scores[torch.isinf(scores)] = (finite.max() if finite.numel() else 1.0) * 2  # input -> logits: the top edge
    return torch.where(graph.valid, scores, torch.zeros(()))


def eap_scores_from(sender_delta: Tensor, receiver_grad: Tensor, valid: Tensor) -> Tensor:
    """The library's EAP score (the exercise `eap_scores`): sum over batch, positions and d_model of
    (corrupted - clean sender output) x (gradient at the receiver input); 0 off the graph."""
    scores = torch.einsum("bpsd,bprd->sr", sender_delta.double(), receiver_grad.double()).float()
    return torch.where(valid, scores, torch.zeros(()))


def receiver_grads(task: EdgeTask, alpha: float = 0.0) -> Tensor:
    """Gradient of the metric wrt every receiver's input, [batch, pos, R, d_model], on the clean run
    whose input embeddings are moved a fraction `alpha` of the way to the corrupted ones."""
    model, graph = task.model, task.graph
    tokens = task.pairs["clean"]
    shape = (*tokens.shape, len(graph.receivers), model.cfg.d_model)
    probe = torch.zeros(shape, device=model.cfg.device, requires_grad=True)
    mix = None if alpha == 0.0 else (task.corrupted_embed, alpha)
    with torch.enable_grad():
        logits = run_circuit(model, graph, tokens, task.corrupted_out, None, probe=probe, embed_mix=mix)
        (grad,) = torch.autograd.grad(task.metric(logits), [probe])
    return grad


def ig_alphas(steps: int) -> list[float]:
    """The interpolation points of EAP-IG: the midpoints (k + 1/2) / steps, k = 0 .. steps - 1."""
    return [(k + 0.5) / steps for k in range(steps)]


def eap(task: EdgeTask) -> Tensor:
    """EAP scores of every edge [S, R] (estimated change of the metric when the edge is patched)."""
    return eap_scores_from(task.corrupted_out - task.clean_out, receiver_grads(task, 0.0), task.graph.valid)


def eap_ig(task: EdgeTask, steps: int = 5) -> Tensor:
    """EAP-IG scores of every edge [S, R]: EAP with the gradient averaged over `steps` inputs on the
    straight line between the clean and corrupted input embeddings (MIB's "EAP-IG-inputs")."""
    grad = sum(receiver_grads(task, a) for a in ig_alphas(steps)) / steps
    return eap_scores_from(task.corrupted_out - task.clean_out, grad, task.graph.valid)


def random_scores(task: EdgeTask, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.where(task.graph.valid, torch.rand(task.graph.valid.shape, generator=g), torch.zeros(()))


def acdc(
    task: EdgeTask, threshold: float | None = None, n_prompts: int | None = 8, progress: Callable | None = None
) -> Tensor:
    """ACDC-style greedy pruning with exact edge patching (Conmy et al. 2023), as an edge ranking.

    Receivers are visited from the logits backwards; each incoming edge is removed (patched from
    the corrupted run) on top of the edges removed so far, and stays removed if the metric moves
    by less than `threshold` (default: 1% of |clean - corrupted|). The metric is the task's
    logit difference (ACDC's paper uses the KL divergence by default). Returns [S, R] scores:
    kept edges score 1 + |change|, removed edges |change| (< threshold), so the kept circuit
    ranks first. The search runs on the first `n_prompts` pairs only (one forward pass per edge,
    one after another: the slow reference); score its circuits on the whole task.
    """
    if n_prompts is not None and n_prompts < len(task.pairs["clean"]):
        task = EdgeTask(task.model, {k: v[:n_prompts] for k, v in task.pairs.items()}, task.graph)
    graph = task.graph
    threshold = 0.01 * abs(task.m_clean - task.m_corrupted) if threshold is None else threshold
    keep = graph.valid.clone()
    current = task.m_clean
    scores = torch.zeros(graph.valid.shape)
    order = range(len(graph.receivers) - 1, -1, -1)
    for r in progress(order, desc="ACDC") if progress else order:
        for s in range(graph.n_upstream(r) - 1, -1, -1):
            keep[s, r] = False
            value = task.circuit_metric(keep)
            change = abs(value - current)
            if change < threshold:
                current = value
                scores[s, r] = change / max(threshold, 1e-12)
            else:
                keep[s, r] = True
                scores[s, r] = 1.0 + change
    return scores


# --- faithfulness curves, CPR and CMD (the library's copies of the exercises) ------------------------------


def top_edge_mask(scores: Tensor, k: int) -> Tensor:
    """Bool mask of the k entries of `scores` (1-D) with the largest |score| (ties: the lower index first)."""
    order = sorted(range(len(scores)), key=lambda i: (-abs(float(scores[i])), i))
    mask = torch.zeros(len(scores), dtype=torch.bool)
    mask[order[:k]] = True
    return mask


def faithfulness_curve_of(
    circuit_metric: Callable[[Tensor], float], scores: Tensor, fractions: Sequence[float] = FRACTIONS
) -> Tensor:
    """f(k) = (m(top-k edges) - m(no edge)) / (m(all edges) - m(no edge)) for k = int(fraction * n_edges)."""
    n = len(scores)
    m_full = circuit_metric(torch.ones(n, dtype=torch.bool))
    m_empty = circuit_metric(torch.zeros(n, dtype=torch.bool))
    out = [(circuit_metric(top_edge_mask(scores, int(f * n))) - m_empty) / (m_full - m_empty) for f in fractions]
    return torch.tensor(out, dtype=torch.float64)


def cpr_cmd_of(fractions: Sequence[float], faithfulness: Sequence[float]) -> tuple[float, float]:
    """CPR (trapezoid area under f over the fractions) and CMD (area under |1 - f|), as MIB computes them."""
    cpr = cmd = 0.0
    for i in range(len(fractions) - 1):
        width = fractions[i + 1] - fractions[i]
        cpr += width * (faithfulness[i] + faithfulness[i + 1]) / 2
        cmd += width * (abs(1 - faithfulness[i]) + abs(1 - faithfulness[i + 1])) / 2
    return float(cpr), float(cmd)


def curve(task: EdgeTask, scores: Tensor, fractions: Sequence[float] = FRACTIONS) -> Tensor:
    """The faithfulness curve of the edge ranking `scores` ([S, R]) on `task`."""
    flat = scores[task.graph.valid]
    return faithfulness_curve_of(lambda m: task.circuit_metric(task.edge_keep(m)), flat, fractions)


METHODS = ("EAP-IG", "EAP", "node patching", "random", "ACDC")


def score_method(task: EdgeTask, method: str, seed: int = 0, ig_steps: int = 5) -> Tensor:
    if method == "EAP":
        return eap(task)
    if method == "EAP-IG":
        return eap_ig(task, ig_steps)
    if method == "node patching":
        return node_patch_scores(task)
    if method == "random":
        return random_scores(task, seed)
    if method == "ACDC":
        return acdc(task)
    if method == "exact":
        return exact_edge_scores(task)
    raise ValueError(f"unknown method {method!r}; choose one of {METHODS + ('exact',)}")


def method_table(
    tasks: dict[str, EdgeTask],
    methods: Sequence[str] = ("EAP-IG", "EAP", "node patching", "random"),
    acdc_tasks: Sequence[str] = ("ioi",),
    random_seeds: int = 3,
    fractions: Sequence[float] = FRACTIONS,
    progress: Callable | None = None,
) -> list[dict]:
    """One row per (task, method): CPR, CMD, the curve and the seconds the scoring took (random:
    the mean over `random_seeds` seeds)."""
    jobs = [(t, m) for t in tasks for m in methods] + [(t, "ACDC") for t in acdc_tasks if t in tasks]
    rows = []
    for t, m in progress(jobs, desc="methods x tasks") if progress else jobs:
        task = tasks[t]
        seeds = range(random_seeds) if m == "random" else [0]
        curves, seconds = [], 0.0
        for seed in seeds:
            start = time.perf_counter()
            scores = score_method(task, m, seed)
            seconds += time.perf_counter() - start
            curves.append(curve(task, scores, fractions))
        f = torch.stack(curves).mean(0)
        cprs = [cpr_cmd_of(fractions, c.tolist()) for c in curves]
        rows.append(
            dict(
                task=t,
                method=m,
                cpr=sum(c for c, _ in cprs) / len(cprs),
                cmd=sum(d for _, d in cprs) / len(cprs),
                curve=f,
                seconds=seconds / len(seeds),
            )
        )
    return rows


def spearman(x: Tensor, y: Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors (average ranks for ties)."""

    def ranks(v: Tensor) -> Tensor:
        v = v.double()
        order = torch.argsort(v)
        r = torch.empty_like(v)
        r[order] = torch.arange(len(v), dtype=torch.float64)
        for value in torch.unique(v):  # average the ranks of ties
            tie = v == value
            if tie.sum() > 1:
                r[tie] = r[tie].mean()
        return r

    a, b = ranks(x), ranks(y)
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / math.sqrt(float((a @ a) * (b @ b))))


# --- uncertainty over prompts ---------------------------------------------------------------------------------


def per_prompt_curve(task: EdgeTask, scores: Tensor, fractions: Sequence[float] = FRACTIONS) -> dict[str, Tensor]:
    """Each prompt's logit difference under each circuit of the curve: {"circuits": [n_fractions, batch],
    "full": [batch], "empty": [batch]} (the faithfulness curve is built from their means)."""
    flat = scores[task.graph.valid]
    answer, wrong = task.pairs["answer"], task.pairs["wrong"]

    def values(mask: Tensor) -> Tensor:
        keep = task.edge_keep(mask)
        with torch.no_grad():
            logits = run_circuit(task.model, task.graph, task.pairs["clean"], task.corrupted_out, keep)
        return logit_diff(logits, answer.to(logits.device), wrong.to(logits.device)).double().cpu()

    n = len(flat)
    circuits = torch.stack([values(top_edge_mask(flat, int(f * n))) for f in fractions])
    return {
        "circuits": circuits,
        "full": values(torch.ones(n, dtype=torch.bool)),
        "empty": values(torch.zeros(n, dtype=torch.bool)),
    }


def _cpr_from_means(fractions: Tensor, f: Tensor) -> Tensor:
    widths = fractions[1:] - fractions[:-1]
    return (widths * (f[..., 1:] + f[..., :-1]) / 2).sum(-1)


def paired_cpr_interval(
    a: dict[str, Tensor],
    b: dict[str, Tensor],
    fractions: Sequence[float] = FRACTIONS,
    n_boot: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """CPR(a) - CPR(b) for two methods' `per_prompt_curve`s on the same prompts, and a 95% percentile-bootstrap
    interval resampling the prompts (the same resample for both methods: a paired comparison)."""
    x = torch.tensor(list(fractions), dtype=torch.float64)
    batch = a["full"].shape[0]
    draw = torch.randint(0, batch, (n_boot, batch), generator=torch.Generator().manual_seed(seed))

    def cprs(c: dict[str, Tensor], idx: Tensor) -> Tensor:
        full, empty = c["full"][idx].mean(-1), c["empty"][idx].mean(-1)
        circuits = c["circuits"][:, idx].mean(-1)  # [n_fractions, ...]
        f = (circuits - empty) / (full - empty)
        return _cpr_from_means(x, f.movedim(0, -1))

    point = float(cprs(a, torch.arange(batch)) - cprs(b, torch.arange(batch)))
    diffs = cprs(a, draw) - cprs(b, draw)
    lo, hi = torch.quantile(diffs, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return point, lo, hi
