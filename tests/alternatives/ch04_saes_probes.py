"""Right answers to chapter 4's probing exercise written differently from the reference (see tests/test_alternatives.py)."""

from __future__ import annotations

import torch


def _checked(acts, labels, k):
    labels = labels.bool()
    n_pos = int(labels.sum())
    if k < 1 or k > acts.shape[1]:
        raise ValueError(f"k must be between 1 and {acts.shape[1]}")
    if n_pos == 0 or n_pos == len(labels):
        raise ValueError("both classes are needed")
    return labels


def sparse_probe_newton(acts, labels, k):
    """Latents chosen with a Python sort; the probe fitted by Newton's method (IRLS) in float64, ridge 1e-4."""
    labels = _checked(acts, labels, k)
    x = acts.detach().double()
    pos_mean, neg_mean = x[labels].mean(0), x[~labels].mean(0)
    gaps = [(abs(float(pos_mean[i] - neg_mean[i])), i) for i in range(x.shape[1])]
    features = torch.tensor([i for _, i in sorted(gaps, key=lambda t: -t[0])[:k]])
    cols = x[:, features]
    scale = cols.std(0)
    scale[scale == 0] = 1.0
    z = torch.cat([cols / scale, torch.ones(len(cols), 1, dtype=torch.float64)], 1)
    theta = torch.zeros(k + 1, dtype=torch.float64)
    ridge = torch.diag(torch.tensor([1e-4] * k + [0.0], dtype=torch.float64)) * len(z)
    y = labels.double()
    for _ in range(50):
        p = torch.sigmoid(z @ theta)
        grad = z.T @ (p - y) + ridge @ theta
        hess = (z * (p * (1 - p))[:, None]).T @ z + ridge + 1e-9 * torch.eye(k + 1, dtype=torch.float64)
        step = torch.linalg.solve(hess, grad)
        theta = theta - step
        if float(step.abs().max()) < 1e-10:
            break
    return features, (theta[:k] / scale).float(), theta[k].float()


def sparse_probe_adam(acts, labels, k):
    """Latents chosen by argsort of the gap; the probe fitted with Adam on min-max scaled columns, gradients forced on."""
    labels = _checked(acts, labels, k)
    gap = (acts[labels].mean(0) - acts[~labels].mean(0)).abs()
    features = torch.argsort(gap, descending=True)[:k]
    x = acts[:, features].detach().float()
    lo, hi = x.min(0).values, x.max(0).values
    span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    z = (x - lo) / span
    with torch.enable_grad():
        w = torch.zeros(k, requires_grad=True)
        b = torch.zeros((), requires_grad=True)
        opt = torch.optim.Adam([w, b], lr=0.1)
        for _ in range(1500):
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, labels.float())
            (loss + 1e-5 * w.pow(2).sum()).backward()
            opt.step()
    w_raw = w.detach() / span
    return features, w_raw, b.detach() - (lo * w_raw).sum()


ALTERNATIVES = {"sparse_probe": [sparse_probe_newton, sparse_probe_adam]}
