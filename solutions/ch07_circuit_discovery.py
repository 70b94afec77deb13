"""Answer key for chapter 07: finding circuits automatically, scoring methods, locating a variable."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor


def edge_patched_input(
    clean_out: Float[Tensor, "batch pos sender d_model"],
    corrupted_out: Float[Tensor, "batch pos sender d_model"],
    n_upstream: int,
    sender: int,
) -> Float[Tensor, "batch pos d_model"]:
    """A receiver's input with exactly one edge patched.

    The receiver reads the sum of the outputs of its upstream senders, which are the first
    `n_upstream` senders (indices 0 .. n_upstream - 1). Patching the edge from `sender`
    replaces that one sender's contribution by its output on the corrupted run; every other
    upstream sender keeps its clean output. Senders that are not upstream contribute nothing.
    (The constant biases are left out: they are equal in both runs.)

    Args:
        clean_out: every sender's output on the clean run.
        corrupted_out: every sender's output on the corrupted run (same shape).
        n_upstream: how many senders feed the receiver.
        sender: the index of the patched sender.

    Returns:
        The patched input, [batch, pos, d_model], in the dtype of `clean_out`.

    Raises:
        ValueError: if `sender` is not upstream of the receiver (an edge that does not exist).
    """
    if not 0 <= sender < n_upstream:
        raise ValueError(f"sender {sender} is not upstream of this receiver (it reads senders 0..{n_upstream - 1})")
    total = clean_out[:, :, :n_upstream].sum(dim=2)
    return total - clean_out[:, :, sender] + corrupted_out[:, :, sender]


def eap_scores(
    sender_delta: Float[Tensor, "batch pos sender d_model"],
    receiver_grad: Float[Tensor, "batch pos receiver d_model"],
    valid: Bool[Tensor, "sender receiver"],
) -> Float[Tensor, "sender receiver"]:
    """Edge attribution patching: the first-order estimate of every edge's patching effect.

    Patching edge (s, r) changes receiver r's input by sender_delta (corrupted minus clean
    output of s); to first order the metric changes by that change dotted with the gradient
    of the metric with respect to r's input. The estimate of one edge is that dot product
    summed over d_model, over positions (the edge is patched at every position) and over the
    batch (the metric's gradient already carries its 1 / batch for a mean).

    Args:
        sender_delta: corrupted minus clean output of every sender.
        receiver_grad: gradient of the metric with respect to every receiver's input, on the clean run.
        valid: True where s is upstream of r (an edge of the graph).

    Returns:
        A float32 tensor [sender, receiver]: the estimated change of the metric for each
        edge (signed), and 0.0 where there is no edge.
    """
    scores = torch.einsum("bpsd,bprd->sr", sender_delta, receiver_grad)
    return torch.where(valid, scores, torch.zeros_like(scores)).float()


def eap_ig_scores(
    sender_delta: Float[Tensor, "batch pos sender d_model"],
    grad_at: Callable[[float], Tensor],
    valid: Bool[Tensor, "sender receiver"],
    steps: int = 5,
) -> Float[Tensor, "sender receiver"]:
    """EAP with integrated gradients: EAP's score with the gradient averaged along the path.

    `grad_at(alpha)` returns the gradient of the metric with respect to every receiver's
    input ([batch, pos, receiver, d_model]) when the input embeddings are moved a fraction
    alpha of the way from the clean to the corrupted prompt. Average it over the `steps`
    midpoints alpha = (k + 1/2) / steps of [0, 1] (each point evaluated once), then score
    every edge as `eap_scores` does with that averaged gradient.

    Args:
        sender_delta: corrupted minus clean output of every sender.
        grad_at: alpha -> receiver gradients at that point of the path.
        valid: True where s is upstream of r.
        steps: how many points on the path (>= 1).

    Returns:
        A float32 tensor [sender, receiver], 0.0 where there is no edge.

    Raises:
        ValueError: if steps < 1.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, not {steps}")
    mean_grad = sum(grad_at((k + 0.5) / steps) for k in range(steps)) / steps
    return eap_scores(sender_delta, mean_grad, valid)


def faithfulness_curve(
    circuit_metric: Callable[[Tensor], float],
    scores: Float[Tensor, " edge"],
    fractions: Sequence[float],
) -> Float[Tensor, " fraction"]:
    """The faithfulness of the top-scoring circuits, one per circuit size (MIB's curve).

    A circuit is a bool mask over the edges; `circuit_metric(mask)` runs the model with the
    edges outside the mask ablated and returns the task metric. For each fraction, the
    circuit is the k = int(fraction * n_edges) edges with the largest |score| (a method may
    score an important edge negative: it is important either way; among equal |score| the
    edge with the lower index comes first), and its faithfulness is
    (m(circuit) - m(empty)) / (m(full) - m(empty)), where the full circuit keeps every edge
    and the empty one none. Call `circuit_metric` once for the full and once for the empty
    circuit.

    Args:
        circuit_metric: bool mask [edge] -> the metric of that circuit (a float).
        scores: one score per edge.
        fractions: circuit sizes as fractions of all edges, each in [0, 1].

    Returns:
        A float64 tensor [len(fractions)]: the faithfulness at each size (1.0: the circuit
        does what the whole model does; it may be negative or above 1).
    """
    n = len(scores)
    order = sorted(range(n), key=lambda i: (-abs(float(scores[i])), i))
    m_full = circuit_metric(torch.ones(n, dtype=torch.bool))
    m_empty = circuit_metric(torch.zeros(n, dtype=torch.bool))
    out = []
    for fraction in fractions:
        mask = torch.zeros(n, dtype=torch.bool)
        mask[order[: int(fraction * n)]] = True
        out.append((circuit_metric(mask) - m_empty) / (m_full - m_empty))
    return torch.tensor(out, dtype=torch.float64)


def cpr_cmd(fractions: Sequence[float], faithfulness: Sequence[float]) -> tuple[float, float]:
    """MIB's two summaries of a faithfulness curve.

    CPR (circuit performance ratio): the area under the curve of faithfulness against the
    circuit size (the fractions, on a linear axis), by the trapezoidal rule between
    consecutive points. Higher is better. CMD (circuit-model distance): the area under
    |1 - faithfulness| the same way. Lower is better; a circuit that overshoots the model
    (faithfulness above 1) is as far from it as one that falls short.

    Args:
        fractions: increasing circuit sizes (at least two).
        faithfulness: the faithfulness at each size.

    Returns:
        (cpr, cmd) as Python floats.
    """
    x = torch.tensor(fractions, dtype=torch.float64)
    f = torch.tensor(faithfulness, dtype=torch.float64)
    widths = x[1:] - x[:-1]
    cpr = (widths * (f[1:] + f[:-1]) / 2).sum()
    gap = (1 - f).abs()
    cmd = (widths * (gap[1:] + gap[:-1]) / 2).sum()
    return float(cpr), float(cmd)


def interchange_subspace(
    base: Float[Tensor, "batch d_model"],
    source: Float[Tensor, "batch d_model"],
    basis: Float[Tensor, "k d_model"],
) -> Float[Tensor, "batch d_model"]:
    """An interchange intervention on a subspace: the base vector with the source's subspace part.

    The subspace is spanned by the rows of `basis`, which are orthonormal. The result has
    the source's component inside the subspace and the base's component outside it: its
    projection onto the subspace equals the source's, and its part orthogonal to the
    subspace equals the base's.

    Args:
        base: the activations that receive the intervention.
        source: the activations the subspace is taken from (same shape).
        basis: k orthonormal rows spanning the subspace.

    Returns:
        A tensor shaped like `base`.
    """
    base_coords = base @ basis.T
    source_coords = source @ basis.T
    return base + (source_coords - base_coords) @ basis


def interchange_accuracy(
    logits: Float[Tensor, "batch vocab"],
    source_answer: Int[Tensor, " batch"],
    base_answer: Int[Tensor, " batch"],
    candidates: Int[Tensor, " n_candidates"],
) -> float:
    """Interchange-intervention accuracy (IIA) of a batch of intervened runs.

    Row b is the model's output after the variable was swapped in from a source prompt whose
    value of the variable differs from the base's wherever source_answer[b] !=
    base_answer[b]. The model's prediction is the candidate token (a token id of
    `candidates`, e.g. the rooms) with the largest logit. IIA is the fraction of the pairs
    whose two answers differ in which the prediction is the source's answer (pairs whose
    answers agree cannot tell a swapped variable from an untouched one and are left out).

    Args:
        logits: the final-position logits of the intervened runs.
        source_answer: the token id the source's value would produce.
        base_answer: the token id the base's own value would produce.
        candidates: the token ids the prediction is chosen among.

    Returns:
        A Python float in [0, 1].

    Raises:
        ValueError: if no pair has different answers.
    """
    differ = source_answer != base_answer
    if not differ.any():
        raise ValueError("no pair has different source and base answers: IIA is undefined")
    prediction = candidates[logits[:, candidates].argmax(dim=-1)]
    return (prediction == source_answer)[differ].float().mean().item()
