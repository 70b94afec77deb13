"""Correct implementations of chapter 07's exercises written differently from the answer key.

Each must pass `interplab.grading.run(name, fn)`: loops instead of einsum, float64 inside, numpy, other
ways to sort or integrate.
"""

from __future__ import annotations

import numpy as np
import torch

# --- edge_patched_input ---------------------------------------------------------------------------


def edge_patched_input_loop(clean_out, corrupted_out, n_upstream, sender):
    """Add the senders one by one, choosing each one's run."""
    if sender < 0 or sender >= n_upstream:
        raise ValueError("sender is not upstream")
    total = torch.zeros_like(clean_out[:, :, 0])
    for s in range(n_upstream):
        total = total + (corrupted_out[:, :, s] if s == sender else clean_out[:, :, s])
    return total


def edge_patched_input_mask(clean_out, corrupted_out, n_upstream, sender):
    """A per-sender weight vector picks which run each sender comes from (float64 inside)."""
    if sender not in range(n_upstream):
        raise ValueError("sender is not upstream")
    s_count = clean_out.shape[2]
    use_corrupted = torch.zeros(s_count, dtype=torch.float64)
    use_corrupted[sender] = 1.0
    upstream = (torch.arange(s_count) < n_upstream).double()
    mixed = clean_out.double() * (1 - use_corrupted)[:, None] + corrupted_out.double() * use_corrupted[:, None]
    return (mixed * upstream[:, None]).sum(dim=2).to(clean_out.dtype)


# --- eap_scores -------------------------------------------------------------------------------------


def eap_scores_loops(sender_delta, receiver_grad, valid):
    """One dot product per edge, in float64."""
    n_s, n_r = valid.shape
    out = torch.zeros(n_s, n_r, dtype=torch.float32)
    d, g = sender_delta.double(), receiver_grad.double()
    for s in range(n_s):
        for r in range(n_r):
            if valid[s, r]:
                out[s, r] = float((d[:, :, s] * g[:, :, r]).sum())
    return out


def eap_scores_matmul(sender_delta, receiver_grad, valid):
    """Flatten batch, positions and d_model into one axis and multiply matrices."""
    b, p, s, d = sender_delta.shape
    left = sender_delta.permute(2, 0, 1, 3).reshape(s, -1)
    right = receiver_grad.permute(2, 0, 1, 3).reshape(receiver_grad.shape[2], -1)
    return ((left @ right.T) * valid).float()


# --- eap_ig_scores ------------------------------------------------------------------------------------


def eap_ig_scores_running_mean(sender_delta, grad_at, valid, steps=5):
    """A running mean of the gradients, then a float64 einsum."""
    if steps < 1:
        raise ValueError("steps must be positive")
    mean = None
    for k in range(steps):
        g = grad_at((2 * k + 1) / (2 * steps)).double()
        mean = g / steps if mean is None else mean + g / steps
    scores = torch.einsum("bpsd,bprd->sr", sender_delta.double(), mean)
    return (scores * valid).float()


def eap_ig_scores_per_step(sender_delta, grad_at, valid, steps=5):
    """Score every step with plain EAP and average the scores (EAP is linear in the gradient)."""
    if steps < 1:
        raise ValueError("steps must be positive")
    alphas = np.linspace(0, 1, steps + 1)
    total = torch.zeros(valid.shape, dtype=torch.float64)
    for lo, hi in zip(alphas[:-1], alphas[1:]):
        g = grad_at(float((lo + hi) / 2))
        total += torch.einsum("bpsd,bprd->sr", sender_delta.double(), g.double())
    return torch.where(valid, total / steps, torch.zeros((), dtype=torch.float64)).float()


# --- faithfulness_curve ---------------------------------------------------------------------------------


def faithfulness_curve_stable_sort(circuit_metric, scores, fractions):
    """A stable sort on -|score| keeps the lower index first among ties."""
    n = len(scores)
    order = torch.sort(-scores.double().abs(), stable=True).indices
    full = circuit_metric(torch.ones(n, dtype=torch.bool))
    empty = circuit_metric(torch.zeros(n, dtype=torch.bool))
    values = []
    for f in fractions:
        k = int(f * n)
        mask = torch.zeros(n, dtype=torch.bool)
        mask[order[:k]] = True
        values.append((circuit_metric(mask) - empty) / (full - empty))
    return torch.tensor(values, dtype=torch.float64)


def faithfulness_curve_numpy(circuit_metric, scores, fractions):
    """numpy's lexsort on (index, -|score|)."""
    s = np.abs(np.asarray([float(x) for x in scores]))
    n = len(s)
    order = np.lexsort((np.arange(n), -s))
    ends = {}
    ends["full"] = circuit_metric(torch.ones(n, dtype=torch.bool))
    ends["empty"] = circuit_metric(torch.zeros(n, dtype=torch.bool))
    out = np.zeros(len(fractions))
    for i, f in enumerate(fractions):
        keep = np.zeros(n, dtype=bool)
        keep[order[: int(f * n)]] = True
        out[i] = (circuit_metric(torch.from_numpy(keep)) - ends["empty"]) / (ends["full"] - ends["empty"])
    return torch.from_numpy(out)


# --- cpr_cmd ----------------------------------------------------------------------------------------------


def cpr_cmd_numpy(fractions, faithfulness):
    x, f = np.asarray(fractions, dtype=float), np.asarray(faithfulness, dtype=float)
    return float(np.trapezoid(f, x)), float(np.trapezoid(np.abs(1 - f), x))


def cpr_cmd_loop(fractions, faithfulness):
    cpr = cmd = 0.0
    for (x0, f0), (x1, f1) in zip(zip(fractions, faithfulness), zip(fractions[1:], faithfulness[1:])):
        cpr += (x1 - x0) * (f0 + f1) / 2
        cmd += (x1 - x0) * (abs(1 - f0) + abs(1 - f1)) / 2
    return cpr, cmd


# --- interchange_subspace -------------------------------------------------------------------------------------


def interchange_subspace_projector(base, source, basis):
    """With the projector P = B^T B: (I - P) base + P source, in float64."""
    p = basis.double().T @ basis.double()
    eye = torch.eye(p.shape[0], dtype=torch.float64)
    return (base.double() @ (eye - p) + source.double() @ p).to(base.dtype)


def interchange_subspace_rotation(base, source, basis):
    """Complete the basis to a full orthonormal one, swap the first k coordinates, rotate back."""
    k, d = basis.shape
    q, _ = torch.linalg.qr(torch.cat([basis.double().T, torch.eye(d, dtype=torch.float64)], dim=1))
    rot = torch.cat([basis.double(), q[:, k:d].T], dim=0)  # [d, d]; first k rows = the basis
    rb, rs = base.double() @ rot.T, source.double() @ rot.T
    rb[:, :k] = rs[:, :k]
    return (rb @ rot).to(base.dtype)


# --- interchange_accuracy ----------------------------------------------------------------------------------------


def interchange_accuracy_loop(logits, source_answer, base_answer, candidates):
    hits = total = 0
    for b in range(len(logits)):
        if source_answer[b] == base_answer[b]:
            continue
        best = max(candidates.tolist(), key=lambda t: float(logits[b, t]))
        hits += int(best == int(source_answer[b]))
        total += 1
    if total == 0:
        raise ValueError("no differing pair")
    return hits / total


def interchange_accuracy_masked(logits, source_answer, base_answer, candidates):
    masked = torch.full_like(logits, float("-inf"))
    masked[:, candidates] = logits[:, candidates]
    keep = source_answer.ne(base_answer)
    if int(keep.sum()) == 0:
        raise ValueError("no differing pair")
    return float((masked.argmax(-1).eq(source_answer) & keep).sum() / keep.sum())


ALTERNATIVES = {
    "edge_patched_input": [edge_patched_input_loop, edge_patched_input_mask],
    "eap_scores": [eap_scores_loops, eap_scores_matmul],
    "eap_ig_scores": [eap_ig_scores_running_mean, eap_ig_scores_per_step],
    "faithfulness_curve": [faithfulness_curve_stable_sort, faithfulness_curve_numpy],
    "cpr_cmd": [cpr_cmd_numpy, cpr_cmd_loop],
    "interchange_subspace": [interchange_subspace_projector, interchange_subspace_rotation],
    "interchange_accuracy": [interchange_accuracy_loop, interchange_accuracy_masked],
}
