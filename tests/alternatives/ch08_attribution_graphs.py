"""Correct implementations of chapter 08's exercises, written differently from the answer key."""

from __future__ import annotations

import math

import torch

# --- clt_loss ---------------------------------------------------------------------------------------


def clt_loss_loops(acts, W_dec, b_dec, target):
    """Token by token, layer by layer, in float64."""
    n_layers = b_dec.shape[0]
    total = torch.zeros((), dtype=torch.float64)
    for L in range(n_layers):
        layer_total = torch.zeros((), dtype=torch.float64)
        for t in range(acts.shape[0]):
            recon = b_dec[L].double().clone()
            for src in range(L + 1):
                recon = recon + acts[t, src].double() @ W_dec[src][:, L - src].double()
            layer_total = layer_total + ((recon - target[t, L].double()) ** 2).sum()
        total = total + layer_total / acts.shape[0]
    return total.to(acts.dtype)


def clt_loss_stacked(acts, W_dec, b_dec, target):
    """All layers at once: a causal mask over (source, target) layer pairs."""
    n, d_sae = acts.shape[1], acts.shape[2]
    d = b_dec.shape[1]
    full = acts.new_zeros(n, d_sae, n, d)  # [src, feature, tgt, d]
    for src in range(n):
        full[src, :, src:] = W_dec[src]
    recon = torch.einsum("bsf,sftd->btd", acts, full) + b_dec
    return (recon - target).pow(2).sum(-1).mean(0).sum()


# --- direct_effect ---------------------------------------------------------------------------------


def direct_effect_matrices(act, decoder, pattern, W_OV, scale_src, scale_tgt, encoder, src_pos, tgt_pos):
    """Centring as a matrix; all heads' OV maps weighted and summed first."""
    d = decoder.shape[0]
    C = torch.eye(d, dtype=torch.float64) - 1.0 / d
    M = torch.einsum("h,hij->ij", pattern[:, tgt_pos, src_pos].double(), W_OV.double())
    path = C @ M / scale_src + (torch.eye(d, dtype=torch.float64) if src_pos == tgt_pos else 0.0)
    return float(act * (decoder.double() @ path @ C @ encoder.double()) / scale_tgt)


def direct_effect_autograd(act, decoder, pattern, W_OV, scale_src, scale_tgt, encoder, src_pos, tgt_pos):
    """Build the whole frozen layer over every position and read the gradient times the activation."""
    pos, d = pattern.shape[1], decoder.shape[0]
    a = torch.tensor(float(act), dtype=torch.float64, requires_grad=True)
    resid = torch.zeros(pos, d, dtype=torch.float64)
    resid = resid.index_put((torch.tensor([src_pos]),), (a * decoder.double())[None], accumulate=True)
    normed = (resid - resid.mean(-1, keepdim=True)) / scale_src
    heads = torch.einsum("hqk,kd,hde->qe", pattern.double(), normed, W_OV.double())
    mid = resid + heads
    target = ((mid[tgt_pos] - mid[tgt_pos].mean()) / scale_tgt) @ encoder.double()
    (grad,) = torch.autograd.grad(target, a)
    return float(grad * act)


# --- influence_matrix ------------------------------------------------------------------------------


def influence_matrix_series(A):
    """The Neumann series summed until the terms vanish (the graph is acyclic)."""
    N = A.abs().double()
    sums = N.sum(1, keepdim=True)
    N = torch.where(sums > 0, N / torch.where(sums > 0, sums, 1.0), 0.0)
    out, term = torch.zeros_like(N), N.clone()
    for _ in range(N.shape[0] + 1):
        out = out + term
        term = term @ N
    return out.to(A.dtype)


def influence_matrix_solve(A):
    """Solve (I - N) X = N: X = (I - N)^-1 N = (I - N)^-1 - I."""
    a = A.abs().double()
    rows = a.sum(dim=-1)
    N = a / rows.clamp_min(1e-10).unsqueeze(-1)
    eye = torch.eye(len(N), dtype=torch.float64)
    return torch.linalg.solve(eye - N, N).to(A.dtype)


# --- prune_by_influence ----------------------------------------------------------------------------


def prune_by_influence_loop(influence, threshold):
    """Walk the nodes from the strongest, adding them until the threshold is reached."""
    if threshold < 0 or threshold > 1:
        raise ValueError("threshold must be in [0, 1]")
    values = influence.tolist()
    total = sum(values)
    keep = [False] * len(values)
    if total <= 0:
        return torch.tensor(keep, dtype=torch.bool)
    order = sorted(range(len(values)), key=lambda i: -values[i])
    acc, cut = 0.0, values[order[0]]
    for i in order:
        acc += values[i]
        cut = values[i]
        if acc / total >= threshold - 1e-12 * 0:
            break
    return torch.tensor([v >= cut and v > 0 for v in values], dtype=torch.bool)


def prune_by_influence_library(influence, threshold):
    """The course library's version (searchsorted on the cumulative shares, in float64)."""
    from interplab.attribution import cumulative_mask

    return cumulative_mask(influence, threshold)


# --- intervention_check ----------------------------------------------------------------------------


def intervention_check_plain(items, predict, intervene, tolerance=0.5):
    """Plain Python lists and statistics by hand."""
    pred = [float(predict(i)) for i in items]
    obs = [float(intervene(i)) for i in items]

    def corr(x, y):
        mx, my = sum(x) / len(x), sum(y) / len(y)
        sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
        sxx = math.sqrt(sum((a - mx) ** 2 for a in x))
        syy = math.sqrt(sum((b - my) ** 2 for b in y))
        return sxy / max(sxx * syy, 1e-12)

    def ranks(x):
        order = sorted(range(len(x)), key=lambda i: (x[i], i))
        r = [0.0] * len(x)
        for rank, i in enumerate(order):
            r[i] = float(rank)
        return r

    sign = lambda v: (v > 0) - (v < 0)  # noqa: E731
    failures = [
        i
        for i, (p, o) in enumerate(zip(pred, obs))
        if sign(p) != sign(o) or abs(o - p) > tolerance * max(abs(p), abs(o))
    ]
    enough = len(items) >= 3
    return {
        "predicted": torch.tensor(pred, dtype=torch.float64),
        "observed": torch.tensor(obs, dtype=torch.float64),
        "pearson": corr(pred, obs) if enough else None,
        "spearman": corr(ranks(pred), ranks(obs)) if enough else None,
        "failures": failures,
    }


def intervention_check_library(items, predict, intervene, tolerance=0.5):
    """The course library's copy."""
    from interplab.attribution import intervention_check

    return intervention_check(items, predict, intervene, tolerance)


ALTERNATIVES = {
    "clt_loss": [clt_loss_loops, clt_loss_stacked],
    "direct_effect": [direct_effect_matrices, direct_effect_autograd],
    "influence_matrix": [influence_matrix_series, influence_matrix_solve],
    "prune_by_influence": [prune_by_influence_loop, prune_by_influence_library],
    "intervention_check": [intervention_check_plain, intervention_check_library],
}
