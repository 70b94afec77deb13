"""Chapter 07 (circuit discovery): the edge-patched input, EAP and EAP-IG scores, the faithfulness
curve, CPR and CMD, the interchange intervention on a subspace and its accuracy."""

from __future__ import annotations

import functools

import torch

from .. import discovery
from ..paths import chapter_of
from ..solutions import ch07_circuit_discovery as sol
from . import Case, Mistake, gen, register, shared_model

CHAPTER = chapter_of(__name__)


def _raised(fn, *args, **kwargs):
    """Call fn and return the name of the exception it raised ("" when it returned normally)."""
    try:
        fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - the case asks which error, if any, is raised
        return type(e).__name__
    return ""


@functools.cache
def _ioi_task():
    """The indirect-object task on the bundled model, 4 prompts: sender outputs and receiver gradients."""
    model = shared_model()
    task = discovery.EdgeTask(model, discovery.task_pairs(model, "ioi", n=4, seed=3))
    return task


def _valid(n_senders: int, n_receivers: int) -> torch.Tensor:
    """A small graph's edge mask: receiver r reads the first 1 + r senders (capped)."""
    return torch.tensor([[s <= r for r in range(n_receivers)] for s in range(n_senders)])


# --- edge_patched_input --------------------------------------------------------------------------------


def _outs(seed: int, shape=(2, 3, 5, 4)):
    g = gen(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def _edge_input_cases():
    clean, corrupted = _outs(0)
    c2, k2 = _outs(1, (1, 4, 7, 6))
    task = _ioi_task()
    g = task.graph
    r = g.qkv_receivers(2, "q")[1]
    return [
        Case("first sender of five, all upstream", (clean, corrupted, 5, 0)),
        Case("middle sender, only 3 of 5 upstream", (clean, corrupted, 3, 1)),
        Case("last upstream sender, 4 of 7 upstream", (c2, k2, 4, 3)),
        Case(
            "sender equal to clean except one entry",
            (clean, clean.clone().index_put_((torch.tensor([0]),), clean[0] + 1), 4, 2),
        ),
        Case("behaviour: a sender that is not upstream raises ValueError", (clean, corrupted, 3, 3), call=_raised),
        Case("behaviour: a negative sender raises ValueError", (clean, corrupted, 3, -1), call=_raised),
        Case(
            "bundled model, IOI: L0H1 into the query of L2H1",
            (task.clean_out, task.corrupted_out, g.n_upstream(r), g.head_sender(0, 1)),
        ),
    ]


register(
    "edge_patched_input",
    CHAPTER,
    sol.edge_patched_input,
    _edge_input_cases,
    mistakes=[
        Mistake.edit(
            "every sender summed",
            sol.edge_patched_input,
            "clean_out[:, :, :n_upstream].sum(dim=2)",
            "clean_out.sum(dim=2)",
            "A receiver reads only the senders upstream of it (the first n_upstream); later senders have not "
            "been computed yet when it runs.",
        ),
        Mistake.edit(
            "clean output not removed",
            sol.edge_patched_input,
            "total - clean_out[:, :, sender] + corrupted_out[:, :, sender]",
            "total + corrupted_out[:, :, sender]",
            "Patching replaces the sender's clean contribution: take its clean output out of the sum before "
            "adding the corrupted one.",
        ),
        Mistake(
            "every upstream sender corrupted",
            lambda clean_out, corrupted_out, n_upstream, sender: (
                _check_sender(sender, n_upstream) or corrupted_out[:, :, :n_upstream].sum(dim=2)
            ),
            "That patches every edge into the receiver at once. One edge: only the given sender's output comes "
            "from the corrupted run; all the others keep their clean outputs.",
        ),
        Mistake.edit(
            "one sender too many",
            sol.edge_patched_input,
            "clean_out[:, :, :n_upstream].sum(dim=2)",
            "clean_out[:, :, : n_upstream + 1].sum(dim=2)",
            "The upstream senders are indices 0 .. n_upstream - 1: n_upstream of them, not n_upstream + 1.",
        ),
    ],
    rtol=1e-5,
    atol=1e-5,
)


def _check_sender(sender: int, n_upstream: int):
    if not 0 <= sender < n_upstream:
        raise ValueError("not upstream")
    return None


# --- eap_scores -----------------------------------------------------------------------------------------


def _eap_inputs(seed: int, batch=2, pos=3, s=5, r=6, d=4):
    g = gen(seed)
    delta = torch.randn(batch, pos, s, d, generator=g)
    grad = torch.randn(batch, pos, r, d, generator=g)
    return delta, grad, _valid(s, r)


@functools.cache
def _ioi_grads():
    task = _ioi_task()
    return task.corrupted_out - task.clean_out, discovery.receiver_grads(task, 0.0), task.graph.valid


def _eap_cases():
    delta, grad, valid = _eap_inputs(0)
    d1, g1, v1 = _eap_inputs(1, batch=3, pos=1, s=3, r=3, d=2)
    return [
        Case("random, 5 senders x 6 receivers", (delta, grad, valid)),
        Case("one position, 3 x 3, batch of 3", (d1, g1, v1)),
        Case("no edge at all", (delta, grad, torch.zeros_like(valid))),
        Case("every pair an edge", (delta, grad, torch.ones_like(valid))),
        Case("bundled model, IOI graph", _ioi_grads()),
    ]


register(
    "eap_scores",
    CHAPTER,
    sol.eap_scores,
    _eap_cases,
    mistakes=[
        Mistake.edit(
            "clean minus corrupted",
            sol.eap_scores,
            'scores = torch.einsum("bpsd,bprd->sr", sender_delta, receiver_grad)',
            'scores = -torch.einsum("bpsd,bprd->sr", sender_delta, receiver_grad)',
            "The estimate is the change of the metric when the edge is patched: the input moves by corrupted "
            "minus clean (sender_delta as given), times the gradient. Don't flip the sign.",
        ),
        Mistake.edit(
            "edges not masked",
            sol.eap_scores,
            "return torch.where(valid, scores, torch.zeros_like(scores)).float()",
            "return scores.float()",
            "Only pairs with valid True are edges: a receiver cannot read a sender downstream of it. Put 0.0 "
            "everywhere else.",
        ),
        Mistake.edit(
            "mean over the batch",
            sol.eap_scores,
            'scores = torch.einsum("bpsd,bprd->sr", sender_delta, receiver_grad)',
            'scores = torch.einsum("bpsd,bprd->sr", sender_delta, receiver_grad) / sender_delta.shape[0]',
            "Sum over the batch: the gradient of a mean metric already carries the 1 / batch.",
        ),
        Mistake.edit(
            "absolute values",
            sol.eap_scores,
            'scores = torch.einsum("bpsd,bprd->sr", sender_delta, receiver_grad)',
            'scores = torch.einsum("bpsd,bprd->sr", sender_delta, receiver_grad).abs()',
            "Return the signed estimate: an edge whose patch raises the metric and one that lowers it are "
            "different findings (rank by |score| later, when you pick circuits).",
        ),
    ],
    rtol=1e-4,
    atol=1e-5,
)


# --- eap_ig_scores ----------------------------------------------------------------------------------------


class _QuadraticGrad:
    """grad_at(alpha) = g0 + alpha g1 + alpha^2 g2 + alpha^3 g3: a gradient that changes along the path."""

    def __init__(self, seed: int, batch=2, pos=3, r=6, d=4):
        g = gen(seed)
        self.parts = [torch.randn(batch, pos, r, d, generator=g) for _ in range(4)]

    def __call__(self, alpha: float) -> torch.Tensor:
        return sum(p * alpha**i for i, p in enumerate(self.parts))


class _CountingGrad(_QuadraticGrad):
    """As _QuadraticGrad, but the returned gradient carries how often it was called (each point once)."""

    def __init__(self, seed: int):
        super().__init__(seed)
        self.calls = 0

    def __call__(self, alpha: float) -> torch.Tensor:
        self.calls += 1
        return super().__call__(alpha)


def _count_calls(fn, delta, grad_at, valid, steps):
    counter = _CountingGrad(7)
    fn(delta, counter, valid, steps)
    return counter.calls


def _ig_cases():
    delta, _, valid = _eap_inputs(2)
    return [
        Case("a cubic path, 5 steps", (delta, _QuadraticGrad(3), valid, 5)),
        Case("a cubic path, 1 step (the midpoint)", (delta, _QuadraticGrad(4), valid, 1)),
        Case("a cubic path, 3 steps", (delta, _QuadraticGrad(5), valid, 3)),
        Case("a cubic path, 8 steps", (delta, _QuadraticGrad(6), valid, 8)),
        Case("behaviour: steps=0 raises ValueError", (delta, _QuadraticGrad(3), valid, 0), call=_raised),
        Case("behaviour: each of 4 points is evaluated once", (delta, None, valid, 4), call=_count_calls),
    ]


register(
    "eap_ig_scores",
    CHAPTER,
    sol.eap_ig_scores,
    _ig_cases,
    mistakes=[
        Mistake.edit(
            "the endpoints k / steps",
            sol.eap_ig_scores,
            "grad_at((k + 0.5) / steps)",
            "grad_at(k / steps)",
            "Use the midpoints (k + 1/2) / steps: k / steps starts at the clean run (plain EAP's gradient) and "
            "never reaches the corrupted end, so the average leans to the clean side.",
        ),
        Mistake.edit(
            "summed, not averaged",
            sol.eap_ig_scores,
            "for k in range(steps)) / steps",
            "for k in range(steps))",
            "Average the gradients over the steps (divide the sum by steps), so the score does not grow with "
            "the number of steps.",
        ),
        Mistake.edit(
            "the last point only",
            sol.eap_ig_scores,
            "mean_grad = sum(grad_at((k + 0.5) / steps) for k in range(steps)) / steps",
            "mean_grad = grad_at((steps - 0.5) / steps)",
            "Integrated gradients average the gradient over every point of the path, not one point of it.",
        ),
        Mistake.edit(
            "alpha beyond the path",
            sol.eap_ig_scores,
            "grad_at((k + 0.5) / steps)",
            "grad_at((k + 1) / (steps + 1) * 2)",
            "alpha must stay in [0, 1]: the path runs from the clean input (0) to the corrupted one (1).",
        ),
    ],
    rtol=1e-4,
    atol=1e-5,
)


# --- faithfulness_curve ------------------------------------------------------------------------------------


class _AdditiveMetric:
    """m(mask) = base + sum of the kept edges' weights, plus an interaction between two edges."""

    def __init__(self, weights: torch.Tensor, base: float = 0.5, pair=(0, 1), bonus: float = 0.0):
        self.weights, self.base, self.pair, self.bonus = weights, base, pair, bonus

    def __call__(self, mask: torch.Tensor) -> float:
        value = self.base + float(self.weights[mask].sum())
        if mask[self.pair[0]] and mask[self.pair[1]]:
            value += self.bonus
        return value


class _CountingMetric(_AdditiveMetric):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0

    def __call__(self, mask):
        self.calls += 1
        return super().__call__(mask)


def _count_metric_calls(fn, weights, scores, fractions):
    m = _CountingMetric(weights)
    fn(m, scores, fractions)
    return m.calls


def _curve_cases():
    g = gen(10)
    w = torch.randn(20, generator=g)
    noisy = w + 0.5 * torch.randn(20, generator=g)
    fr = [0.0, 0.05, 0.1, 0.25, 0.5, 1.0]
    neg = torch.tensor([3.0, -5.0, 1.0, 0.5, -0.2, 0.1, 0.0, 2.0])  # an important edge with a negative score
    ties = torch.tensor([1.0, 1.0, -1.0, 0.5, 0.5, 0.0])
    tw = torch.tensor([0.3, -0.1, 0.7, 0.2, 0.4, -0.3])
    task = _ioi_task()
    eap_flat = discovery.eap(task)[task.graph.valid]

    def circuit(mask, task=task):
        return task.circuit_metric(task.edge_keep(mask))

    return [
        Case("additive metric, scores = true weights", (_AdditiveMetric(w), w, fr)),
        Case("additive metric, noisy scores", (_AdditiveMetric(w), noisy, fr)),
        Case("negative scores still count by |score|", (_AdditiveMetric(neg), neg, [0.125, 0.25, 0.5, 1.0])),
        Case("ties: the lower index first", (_AdditiveMetric(tw), ties, [1 / 6, 2 / 6, 0.5, 4 / 6])),
        Case(
            "fractions that do not hit a whole edge", (_AdditiveMetric(w, bonus=2.0), noisy, [0.01, 0.07, 0.33, 0.99])
        ),
        Case("behaviour: the full and empty circuits are run once each", (w, w, fr), call=_count_metric_calls),
        Case("bundled model, IOI, EAP scores", (circuit, eap_flat, [0.01, 0.05, 0.2])),
    ]


register(
    "faithfulness_curve",
    CHAPTER,
    sol.faithfulness_curve,
    _curve_cases,
    mistakes=[
        Mistake.edit(
            "ranked by signed score",
            sol.faithfulness_curve,
            "key=lambda i: (-abs(float(scores[i])), i)",
            "key=lambda i: (-float(scores[i]), i)",
            "Rank edges by |score|: an edge whose patch lowers the metric a lot is as important as one that raises it.",
        ),
        Mistake.edit(
            "not normalised by the empty circuit",
            sol.faithfulness_curve,
            "(circuit_metric(mask) - m_empty) / (m_full - m_empty)",
            "circuit_metric(mask) / m_full",
            "Faithfulness is measured from the empty circuit: (m(circuit) - m(empty)) / (m(full) - m(empty)), "
            "so the empty circuit scores 0 and the full model 1.",
        ),
        Mistake.edit(
            "rounded circuit size",
            sol.faithfulness_curve,
            "order[: int(fraction * n)]",
            "order[: round(fraction * n + 0.49)]",
            "The circuit has k = int(fraction * n_edges) edges (rounded down, as MIB does).",
        ),
        Mistake.edit(
            "ties broken the other way",
            sol.faithfulness_curve,
            "key=lambda i: (-abs(float(scores[i])), i)",
            "key=lambda i: (-abs(float(scores[i])), -i)",
            "Among edges with equal |score|, take the one with the lower index first.",
        ),
    ],
    rtol=1e-6,
    atol=1e-6,
)


# --- cpr_cmd ---------------------------------------------------------------------------------------------------


def _cpr_cases():
    fr = list(discovery.FRACTIONS)
    g = gen(20)
    rand = (torch.rand(len(fr), generator=g) * 1.4 - 0.2).tolist()
    return [
        Case("monotone curve on MIB's fractions", (fr, [0.0, 0.05, 0.1, 0.2, 0.4, 0.7, 0.9, 0.95, 1.0, 1.0])),
        Case("overshoot above 1", (fr, [0.0, 0.0, 0.2, 0.6, 1.3, 1.4, 1.2, 1.1, 1.0, 1.0])),
        Case("negative faithfulness", (fr, [0.0, -0.3, -0.5, -0.2, 0.1, 0.5, 0.8, 1.0, 1.0, 1.0])),
        Case("non-monotone, random", (fr, rand)),
        Case("two points", ([0.0, 1.0], [0.0, 1.0])),
        Case("uneven widths", ([0.1, 0.2, 0.6, 1.0], [0.5, 1.5, 0.5, 1.0])),
    ]


def _cmd_of_cpr(fractions, faithfulness):
    cpr, _ = sol.cpr_cmd(fractions, faithfulness)
    return cpr, abs((fractions[-1] - fractions[0]) - cpr)


register(
    "cpr_cmd",
    CHAPTER,
    sol.cpr_cmd,
    _cpr_cases,
    mistakes=[
        Mistake.edit(
            "unit spacing",
            sol.cpr_cmd,
            "widths = x[1:] - x[:-1]",
            "widths = torch.ones(len(x) - 1, dtype=torch.float64)",
            "Integrate over the circuit size: each trapezoid is as wide as the step between two fractions, not 1.",
        ),
        Mistake(
            "CMD from CPR",
            _cmd_of_cpr,
            "CMD is the area under |1 - f| point by point: where the curve overshoots 1 it adds to the "
            "distance, it does not cancel a shortfall elsewhere.",
        ),
        Mistake.edit(
            "absolute faithfulness in CPR",
            sol.cpr_cmd,
            "cpr = (widths * (f[1:] + f[:-1]) / 2).sum()",
            "cpr = (widths * (f[1:].abs() + f[:-1].abs()) / 2).sum()",
            "A negative faithfulness (the circuit pushes the other way) lowers CPR; don't take its absolute value.",
        ),
        Mistake.edit(
            "left endpoints",
            sol.cpr_cmd,
            "cpr = (widths * (f[1:] + f[:-1]) / 2).sum()",
            "cpr = (widths * f[:-1]).sum()",
            "Use the trapezoidal rule: each step's area is its width times the mean of its two end values.",
        ),
    ],
    rtol=1e-9,
    atol=1e-9,
    output_names=("cpr", "cmd"),
)


# --- interchange_subspace -----------------------------------------------------------------------------------------


def _orthonormal(k: int, d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=gen(seed)))
    return q.T.contiguous()


def _interchange_cases():
    g = gen(30)
    base, source = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    axis = torch.zeros(1, 6)
    axis[0, 2] = 1.0
    return [
        Case("a coordinate axis", (base, source, axis)),
        Case("a random 2-d subspace", (base, source, _orthonormal(2, 6, 31))),
        Case("a random 1-d subspace", (base, source, _orthonormal(1, 6, 32))),
        Case("the whole space", (base, source, _orthonormal(6, 6, 33))),
        Case("base equals source", (base, base.clone(), _orthonormal(3, 6, 34))),
    ]


register(
    "interchange_subspace",
    CHAPTER,
    sol.interchange_subspace,
    _interchange_cases,
    mistakes=[
        Mistake.edit(
            "the source everywhere",
            sol.interchange_subspace,
            "return base + (source_coords - base_coords) @ basis",
            "return source + 0 * base_coords @ basis",
            "Only the subspace comes from the source; outside it the vector keeps the base's component.",
        ),
        Mistake.edit(
            "base's part not removed",
            sol.interchange_subspace,
            "return base + (source_coords - base_coords) @ basis",
            "return base + source_coords @ basis",
            "Replace the base's component in the subspace by the source's; adding it on top doubles the "
            "subspace's content.",
        ),
        Mistake.edit(
            "roles swapped",
            sol.interchange_subspace,
            "return base + (source_coords - base_coords) @ basis",
            "return source + (base_coords - source_coords) @ basis",
            "The result is the BASE run with the source's subspace, not the source with the base's.",
        ),
    ],
    rtol=1e-5,
    atol=1e-5,
)


# --- interchange_accuracy -------------------------------------------------------------------------------------------


def _iia_cases():
    g = gen(40)
    logits = torch.randn(12, 20, generator=g)
    candidates = torch.tensor([3, 5, 7, 11])
    src = candidates[torch.randint(0, 4, (12,), generator=g)]
    base = candidates[torch.randint(0, 4, (12,), generator=g)]
    rigged = logits.clone()
    rigged[:, 0] = 100.0  # a non-candidate token wins over the whole vocabulary
    rigged[torch.arange(12), src] = 50.0
    rigged[:4, 3] = 60.0
    same = src.clone()
    return [
        Case("random logits, four candidates", (logits, src, base, candidates)),
        Case("a non-candidate token has the largest logit", (rigged, src, base, candidates)),
        Case("some pairs agree (left out)", (rigged, src, torch.where(torch.arange(12) < 6, src, base), candidates)),
        Case("behaviour: no differing pair raises ValueError", (logits, src, same, candidates), call=_raised),
    ]


register(
    "interchange_accuracy",
    CHAPTER,
    sol.interchange_accuracy,
    _iia_cases,
    mistakes=[
        Mistake.edit(
            "every pair counted",
            sol.interchange_accuracy,
            "return (prediction == source_answer)[differ].float().mean().item()",
            "return (prediction == source_answer).float().mean().item()",
            "Leave out the pairs whose source and base answers agree: there the untouched model is 'right' "
            "without any swap.",
        ),
        Mistake.edit(
            "argmax over the whole vocabulary",
            sol.interchange_accuracy,
            "prediction = candidates[logits[:, candidates].argmax(dim=-1)]",
            "prediction = logits.argmax(dim=-1)",
            "The prediction is the best of the candidate tokens (e.g. the rooms), not of the whole vocabulary.",
        ),
        Mistake.edit(
            "compared with the base answer",
            sol.interchange_accuracy,
            "return (prediction == source_answer)[differ].float().mean().item()",
            "return (prediction == base_answer)[differ].float().mean().item()",
            "A successful interchange makes the model give the SOURCE's answer.",
        ),
    ],
    rtol=1e-6,
    atol=1e-6,
)
