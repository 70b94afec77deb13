"""Correct implementations of chapter 03's exercises, written differently from the answer key.

Each must pass its exercise's check (tests/test_alternatives.py): loops over instances, float64 inside,
bmm instead of einsum, another order of random draws, another optimiser loop.
"""

from __future__ import annotations

import math

import torch

# --- sparse_features -----------------------------------------------------------------------------------------


def batch_values_first(n_instances, batch_size, n_features, feature_probability, generator=None):
    values = torch.rand(n_instances, batch_size, n_features, generator=generator)
    keep = torch.rand(n_instances, batch_size, n_features, generator=generator) <= feature_probability[:, None, None]
    keep &= feature_probability[:, None, None] > 0
    return values * keep


def batch_per_instance(n_instances, batch_size, n_features, feature_probability, generator=None):
    out = []
    for i in range(n_instances):
        mask = torch.bernoulli(torch.full((batch_size, n_features), float(feature_probability[i])), generator=generator)
        out.append(mask * torch.rand(batch_size, n_features, generator=generator))
    return torch.stack(out)


# --- toy_forward ---------------------------------------------------------------------------------------------


def forward_bmm(W, b, x, hidden_relu=False):
    h = torch.bmm(x, W.transpose(1, 2))
    if hidden_relu:
        h = h.clamp(min=0)
    return (torch.bmm(h, W) + b.unsqueeze(1)).clamp(min=0)


def forward_loop(W, b, x, hidden_relu=False):
    outs = []
    for Wi, bi, xi in zip(W, b, x):
        h = xi.double() @ Wi.double().T
        h = torch.relu(h) if hidden_relu else h
        outs.append(torch.relu(h @ Wi.double() + bi.double()))
    return torch.stack(outs)


# --- importance_loss -----------------------------------------------------------------------------------------


def loss_einsum(x, x_hat, importance):
    imp = importance.expand(x.shape[0], -1) if importance.dim() == 1 else importance
    return torch.einsum("ibn,in->i", (x - x_hat) ** 2, imp) / x.shape[1]


def loss_loop(x, x_hat, importance):
    rows = []
    for i in range(x.shape[0]):
        imp = importance if importance.dim() == 1 else importance[i]
        rows.append(((x[i] - x_hat[i]).pow(2) * imp).sum(1).mean())
    return torch.stack(rows)


# --- train_toy_models ----------------------------------------------------------------------------------------


def _batch(n_instances, batch_size, n_features, p, g):
    present = torch.rand(n_instances, batch_size, n_features, generator=g) < p[:, None, None]
    return present * torch.rand(n_instances, batch_size, n_features, generator=g)


def _forward(W, b, x, hidden_relu):
    h = torch.einsum("imn,ibn->ibm", W, x)
    h = torch.relu(h) if hidden_relu else h
    return torch.relu(torch.einsum("imn,ibm->ibn", W, h) + b[:, None])


def train_params_list(
    n_features,
    n_hidden,
    feature_probability,
    importance,
    steps=1500,
    batch_size=512,
    lr=3e-3,
    seed=0,
    hidden_relu=False,
):
    g = torch.Generator().manual_seed(seed)
    n_inst = len(feature_probability)
    W = torch.nn.Parameter(
        torch.randn(n_inst, n_hidden, n_features, generator=g) * math.sqrt(2 / (n_features + n_hidden))
    )
    b = torch.nn.Parameter(torch.zeros(n_inst, n_features))
    opt = torch.optim.Adam([W, b], lr=lr)
    imp = importance if importance.dim() == 2 else importance.expand(n_inst, -1)
    with torch.enable_grad():
        for _ in range(steps):
            x = _batch(n_inst, batch_size, n_features, feature_probability, g)
            err = (x - _forward(W, b, x, hidden_relu)) ** 2
            loss = (err * imp[:, None]).sum(-1).mean(-1).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return W.detach().clone(), b.detach().clone()


def train_mean_over_instances(
    n_features,
    n_hidden,
    feature_probability,
    importance,
    steps=1500,
    batch_size=512,
    lr=3e-3,
    seed=0,
    hidden_relu=False,
):
    # The mean over instances only rescales the gradient, which Adam ignores; the batch is drawn in one call.
    torch_gen = torch.Generator().manual_seed(seed)
    n_inst = len(feature_probability)
    std = (2 / (n_features + n_hidden)) ** 0.5
    W = torch.empty(n_inst, n_hidden, n_features).normal_(0, std, generator=torch_gen).requires_grad_()
    b = torch.zeros(n_inst, n_features).requires_grad_()
    opt = torch.optim.Adam([W, b], lr=lr)
    imp = importance if importance.dim() == 2 else importance[None]
    with torch.enable_grad():
        for _ in range(steps):
            u = torch.rand(2, n_inst, batch_size, n_features, generator=torch_gen)
            x = torch.where(u[0] < feature_probability[:, None, None], u[1], 0.0)
            loss = (imp[:, None] * (x - _forward(W, b, x, hidden_relu)).square()).sum(-1).mean(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return W.detach(), b.detach()


# --- feature_dimensionality ----------------------------------------------------------------------------------


def dims_loop(W):
    W = W.double()
    n = W.shape[1]
    out = torch.zeros(n, dtype=torch.float64)
    for i in range(n):
        wi = W[:, i]
        norm2 = float(wi @ wi)
        if norm2 == 0:
            continue
        out[i] = norm2 / sum(float(wi @ W[:, j]) ** 2 / norm2 for j in range(n))
    return out


def dims_gram(W):
    G = W.T.double() @ W.double()
    sq = G.diagonal()
    safe = torch.where(sq > 0, sq, torch.ones_like(sq))
    d = sq / ((G**2).sum(1) / safe)
    return torch.where(sq > 0, d, torch.zeros_like(d))


# --- recovery_score ------------------------------------------------------------------------------------------


def recovery_loop(true_directions, decoder, threshold=0.9):
    best = []
    for t in true_directions.double():
        cos = [float(t @ d / (t.norm() * d.norm())) for d in decoder.double()]
        best.append(max(cos))
    return sum(best) / len(best), sum(b > threshold for b in best)


def recovery_cosine_similarity(true_directions, decoder, threshold=0.9):
    cos = torch.nn.functional.cosine_similarity(true_directions[:, None, :], decoder[None, :, :], dim=-1)
    best = cos.amax(1)
    return best.mean().item(), int(best.gt(threshold).sum().item())


ALTERNATIVES = {
    "sparse_features": [batch_values_first, batch_per_instance],
    "toy_forward": [forward_bmm, forward_loop],
    "importance_loss": [loss_einsum, loss_loop],
    "train_toy_models": [train_params_list, train_mean_over_instances],
    "feature_dimensionality": [dims_loop, dims_gram],
    "recovery_score": [recovery_loop, recovery_cosine_similarity],
}
