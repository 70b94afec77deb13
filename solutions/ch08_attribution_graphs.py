"""Chapter 08 (attribution graphs): the reference solution of every exercise.

The cross-layer transcoder, the local replacement model, graphs, pruning, validation and the
circuit-tracer export live in the course's library: `interplab.dictionaries.clt` and
`interplab.attribution`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor


def clt_loss(
    acts: Float[Tensor, "batch n_layers d_sae"],
    W_dec: Sequence[Float[Tensor, "d_sae n_out d_model"]],
    b_dec: Float[Tensor, "n_layers d_model"],
    target: Float[Tensor, "batch n_layers d_model"],
) -> Float[Tensor, ""]:
    """The reconstruction loss of a cross-layer transcoder.

    Features of layer l write into the MLP output of layer l and of every later layer:
    W_dec[l] has one decoder per layer it writes to, W_dec[l][:, j] being the decoder into
    layer l + j (so W_dec[l] has n_layers - l of them). The reconstruction of layer L's MLP
    output is b_dec[L] plus the decoded features of every layer l <= L (never of a later
    layer: the MLP of layer L cannot see features that read the residual stream after it).

    Args:
        acts: feature activations of every layer, one row per token.
        W_dec: the decoders, one tensor per source layer.
        b_dec: one output bias per layer.
        target: the true MLP outputs of every layer.

    Returns:
        A scalar float tensor: for each layer, the squared error summed over the model
        dimension and averaged over tokens; then summed (not averaged) over layers, so that
        each MLP counts fully. Gradients reach acts and every decoder.
    """
    n_layers = b_dec.shape[0]
    loss = acts.new_zeros(())
    for L in range(n_layers):
        recon = b_dec[L] + sum(acts[:, l] @ W_dec[l][:, L - l] for l in range(L + 1))  # noqa: E741
        loss = loss + (recon - target[:, L]).pow(2).sum(-1).mean()
    return loss


def direct_effect(
    act: float,
    decoder: Float[Tensor, " d_model"],
    pattern: Float[Tensor, "n_heads pos pos"],
    W_OV: Float[Tensor, "n_heads d_model d_model"],
    scale_src: float,
    scale_tgt: float,
    encoder: Float[Tensor, " d_model"],
    src_pos: int,
    tgt_pos: int,
) -> float:
    """The direct effect of one feature on a feature one attention layer later, attention frozen.

    The source feature (activation ``act``) writes ``act * decoder`` into the residual stream
    at ``src_pos``. Between it and the target there is one attention layer whose patterns
    (``pattern[h, query, key]``), LayerNorm scales and weights are held fixed: each head h
    reads the source's write through its LayerNorm (centred over the model dimension, divided
    by ``scale_src``, the frozen scale at the source's position) and moves it to ``tgt_pos``
    with the weight its pattern gives query ``tgt_pos`` on key ``src_pos``, through its OV matrix ``W_OV[h]`` (row vector
    times matrix). The residual stream also carries the write itself when the two positions are
    the same. The target feature reads its position's residual stream through its own
    LayerNorm (centred, divided by ``scale_tgt``) with ``encoder``. Biases are not part of a
    direct effect.

    Returns:
        A Python float: the change of the target's pre-activation caused by the source's write,
        proportional to ``act``; zero when the target position is before the source position.
    """
    write = act * decoder
    moved = torch.zeros_like(write)
    for h in range(pattern.shape[0]):
        read = (write - write.mean()) / scale_src
        moved = moved + pattern[h, tgt_pos, src_pos] * (read @ W_OV[h])
    if tgt_pos == src_pos:
        moved = moved + write
    return float(((moved - moved.mean()) / scale_tgt) @ encoder)


def influence_matrix(A: Float[Tensor, "n n"]) -> Float[Tensor, "n n"]:
    """Every node's total influence on every other, through paths of any length (circuit-tracer's rule).

    ``A[t, s]`` is the direct effect of source s on target t (signed). First each row is made
    a distribution of shares: the absolute values, divided by the row's total (a row without
    any input stays zero). Call that N; N^k[t, s] is the share of t's input that comes from s
    through paths of exactly k edges.

    Returns:
        [n, n] float tensor (A's dtype) B = N + N^2 + N^3 + ..., which for an acyclic graph
        equals (I - N)^-1 - I: B[t, s] is s's influence on t over all paths with at least one
        edge (so B's diagonal is zero when the graph has no loops). Non-negative.
    """
    N = A.abs().double()
    N = N / N.sum(dim=1, keepdim=True).clamp_min(1e-10)
    eye = torch.eye(N.shape[0], dtype=N.dtype)
    return (torch.linalg.inv(eye - N) - eye).to(A.dtype)


def prune_by_influence(influence: Float[Tensor, " n"], threshold: float) -> Tensor:
    """Which nodes to keep: the strongest ones, until they hold ``threshold`` of the total influence.

    Args:
        influence: each node's influence on the output, non-negative.
        threshold: the share of the total influence to keep, between 0 and 1.

    Returns:
        A bool tensor [n]: True for the smallest set of highest-influence nodes whose summed
        influence reaches at least ``threshold`` of the total (a node tied with the weakest kept
        node is kept too). A node with zero influence is never kept; with zero total nothing is.
        A threshold outside [0, 1] raises a ValueError.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be between 0 and 1, got {threshold}")
    total = influence.sum()
    if total <= 0:
        return torch.zeros(influence.shape, dtype=torch.bool)
    ranked = influence.sort(descending=True).values
    share = ranked.cumsum(0) / total
    k = int((share < threshold).sum())  # nodes before the one that reaches the threshold
    k = min(k, len(ranked) - 1)
    return (influence >= ranked[k]) & (influence > 0)


def intervention_check(
    items: Sequence,
    predict: Callable[[object], float],
    intervene: Callable[[object], float],
    tolerance: float = 0.5,
) -> dict:
    """Check a graph against the model: predicted versus observed effects of interventions, item by item.

    Args:
        items: what to intervene on (graph nodes, prompts, ...), in order.
        predict: item -> the change of the output the graph predicts.
        intervene: item -> the change observed when intervening in the model.
        tolerance: how far off an observation may be, relative to the larger magnitude of the two.

    Returns:
        A dict: "predicted" and "observed", float64 tensors [len(items)] (each function called once
        per item, in order); "pearson" (linear correlation) and "spearman" (correlation of the
        ranks, ties broken by order) as Python floats, None with fewer than 3 items; "failures":
        the list of indices where the observed change has another sign than the prediction or
        differs from it by more than ``tolerance`` times the larger of their magnitudes.
    """
    predicted = torch.tensor([float(predict(item)) for item in items], dtype=torch.float64)
    observed = torch.tensor([float(intervene(item)) for item in items], dtype=torch.float64)

    def corr(x: Tensor, y: Tensor) -> float:
        x, y = x - x.mean(), y - y.mean()
        return float((x * y).sum() / (x.norm() * y.norm()).clamp_min(1e-12))

    def ranks(x: Tensor) -> Tensor:
        return x.argsort(stable=True).argsort().double()

    failures = []
    for i, (p, o) in enumerate(zip(predicted.tolist(), observed.tolist())):
        wrong_sign = (p > 0) != (o > 0) or (p < 0) != (o < 0)
        if wrong_sign or abs(o - p) > tolerance * max(abs(p), abs(o)):
            failures.append(i)
    enough = len(items) >= 3
    return {
        "predicted": predicted,
        "observed": observed,
        "pearson": corr(predicted, observed) if enough else None,
        "spearman": corr(ranks(predicted), ranks(observed)) if enough else None,
        "failures": failures,
    }
