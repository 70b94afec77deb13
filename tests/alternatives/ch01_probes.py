"""Correct implementations of chapter 01's exercises written differently from the answer key.

Each must pass its exercise's checks (tests/test_alternatives.py): other algorithms, float64 inside,
loops instead of vectorised code, and other random draws where the contract leaves the draw free.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from interplab.hooks import act_name
from interplab.tinyworld import NAMES, ROOMS

# --- room_query_labels ------------------------------------------------------------------------------------


def room_query_labels_rows(docs):
    """One row per question, collected as tuples and transposed at the end."""
    rows = []
    for i, d in enumerate(docs):
        if d.family == "rooms":
            words = d.tokens
            rows += [
                (i, p, ROOMS.index(d.rooms[p][words[p]]), NAMES.index(words[p]))
                for p in range(2, len(words))
                if words[p - 2 : p] == ["where", "is"]
            ]
    if not rows:
        return tuple(torch.zeros(0, dtype=torch.long) for _ in range(4))
    return tuple(torch.tensor(col, dtype=torch.long) for col in zip(*rows))


def room_query_labels_scan(docs):
    """A running window of the last two words; the columns filled one list at a time."""
    cols = {"doc": [], "pos": [], "label": [], "person": []}
    for i, d in enumerate(docs):
        if d.family != "rooms":
            continue
        before, prev = None, None
        for p, word in enumerate(d.tokens):
            if before == "where" and prev == "is":
                cols["doc"].append(i)
                cols["pos"].append(p)
                cols["label"].append(ROOMS.index(d.rooms[p][word]))
                cols["person"].append(NAMES.index(word))
            before, prev = prev, word
    return tuple(torch.as_tensor(v, dtype=torch.int64) for v in cols.values())


# --- document_split ---------------------------------------------------------------------------------------


def _check_fraction(test_fraction):
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie strictly between 0 and 1, not {test_fraction}")


def document_split_python_random(doc, test_fraction=0.25, seed=0):
    """Python's own random module draws the held-out documents (another, equally valid draw)."""
    _check_fraction(test_fraction)
    ids = sorted(set(doc.tolist()))
    held_out = set(random.Random(seed).sample(ids, round(test_fraction * len(ids))))
    return torch.tensor([d in held_out for d in doc.tolist()], dtype=torch.bool)


def document_split_uniform_keys(doc, test_fraction=0.25, seed=0):
    """A uniform key per document; the documents with the smallest keys are held out (rounding half up)."""
    _check_fraction(test_fraction)
    ids, inverse = torch.unique(doc, return_inverse=True)
    keys = torch.rand(len(ids), generator=torch.Generator().manual_seed(1000 + seed), dtype=torch.float64)
    n_test = int(test_fraction * len(ids) + 0.5)
    chosen = torch.zeros(len(ids), dtype=torch.bool)
    chosen[torch.argsort(keys)[:n_test]] = True
    return chosen[inverse]


# --- train_probe ------------------------------------------------------------------------------------------


def train_probe_float64_shuffled(x, y, n_classes, weight_decay=3e-3, steps=200, lr=0.02):
    """torch's Adam in float64, on the rows in another order."""
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(7))
    xs, ys = x.detach().double()[order], y[order]
    W = torch.zeros(x.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([W, b], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            loss = F.cross_entropy(xs @ W + b, ys) + weight_decay * (W * W).sum()
            loss.backward()
            opt.step()
    return W.detach().to(x.dtype), b.detach().to(x.dtype)


def train_probe_manual_adam(x, y, n_classes, weight_decay=3e-3, steps=200, lr=0.02):
    """Adam written out with the gradient in closed form (no autograd, so no_grad cannot stop it)."""
    xd = x.detach().double()
    n, d = xd.shape
    onehot = F.one_hot(y, n_classes).double()
    params = [torch.zeros(d, n_classes, dtype=torch.float64), torch.zeros(n_classes, dtype=torch.float64)]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    for t in range(1, steps + 1):
        W, b = params
        delta = ((xd @ W + b).softmax(-1) - onehot) / n  # d(mean CE)/d(logits)
        grads = [xd.T @ delta + 2 * weight_decay * W, delta.sum(0)]
        for i, g in enumerate(grads):
            m[i] = beta1 * m[i] + (1 - beta1) * g
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
            m_hat, v_hat = m[i] / (1 - beta1**t), v[i] / (1 - beta2**t)
            params[i] = params[i] - lr * m_hat / (v_hat.sqrt() + eps)
    return params[0].to(x.dtype), params[1].to(x.dtype)


# --- mass_mean_probe --------------------------------------------------------------------------------------


def mass_mean_probe_loop(x, y, n_classes):
    """One class at a time, with boolean masks."""
    columns, biases = [], []
    for c in range(n_classes):
        rows = x[y == c]
        if len(rows) == 0:
            raise ValueError(f"class {c} has no example, so it has no mean")
        mu = rows.mean(0)
        columns.append(mu)
        biases.append(-0.5 * (mu @ mu))
    return torch.stack(columns, 1), torch.stack(biases)


def mass_mean_probe_onehot(x, y, n_classes):
    """Class means as a one-hot matrix product, in float64."""
    onehot = F.one_hot(y, n_classes).double()  # [n, k]
    counts = onehot.sum(0)
    if (counts == 0).any():
        raise ValueError(f"classes {(counts == 0).nonzero()[:, 0].tolist()} have no example")
    W = (x.double().T @ onehot) / counts  # [d, k]
    return W.to(x.dtype), (-0.5 * (W * W).sum(0)).to(x.dtype)


# --- auroc ------------------------------------------------------------------------------------------------


def _bool_labels(labels):
    labels = labels.bool() if labels.dtype == torch.bool else labels
    if labels.dtype != torch.bool:
        if not ((labels == 0) | (labels == 1)).all():
            raise ValueError("labels must be 0/1 or booleans")
        labels = labels == 1
    if labels.all() or not labels.any():
        raise ValueError("both classes must occur")
    return labels


def auroc_pairs(scores, labels):
    """Every positive against every negative, a tie counting one half."""
    labels = _bool_labels(labels)
    pos, neg = scores[labels].double(), scores[~labels].double()
    wins = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()
    return float(wins.mean())


def auroc_trapezoid(scores, labels):
    """The ROC curve itself: one point per distinct threshold, the area under it by the trapezoid rule."""
    labels = _bool_labels(labels)
    s = scores.double()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    tpr, fpr = [0.0], [0.0]
    for threshold in torch.unique(s).flip(0).tolist():  # from the highest score down
        above = s >= threshold
        tpr.append(int((above & labels).sum()) / n_pos)
        fpr.append(int((above & ~labels).sum()) / n_neg)
    return sum((fpr[i + 1] - fpr[i]) * (tpr[i + 1] + tpr[i]) / 2 for i in range(len(tpr) - 1))


# --- control_task_labels ----------------------------------------------------------------------------------


def control_task_labels_python_random(types, n_classes, seed=0):
    """A label per type present (in sorted order) from Python's random module: another valid draw."""
    rng = random.Random(seed)
    table = {t: rng.randrange(n_classes) for t in sorted(set(types.tolist()))}
    return torch.tensor([table[t] for t in types.tolist()], dtype=torch.long)


def control_task_labels_per_type_generator(types, n_classes, seed=0):
    """Each type's label from its own generator, seeded by (seed, type): no table at all."""
    out = torch.empty(len(types), dtype=torch.int64)
    for i, t in enumerate(types.tolist()):
        g = torch.Generator().manual_seed(seed * 1_000_003 + t)
        out[i] = torch.randint(0, n_classes, (1,), generator=g)
    return out


# --- edited_logits ----------------------------------------------------------------------------------------


def edited_logits_delta(model, tokens, layer, positions, direction, mode="add", alpha=1.0, read_positions=None):
    """Adds a change tensor that is zero except at the edited positions; the projection in float64."""
    if mode not in ("add", "subtract", "project_out"):
        raise ValueError(f"unknown mode {mode!r}")
    rows = torch.arange(len(tokens))
    read = positions if read_positions is None else read_positions

    def hook(resid, hook):
        v = resid[rows, positions].double()
        d = direction.double()
        if mode == "project_out":
            u = F.normalize(d, dim=0)
            change = -(v @ u)[:, None] * u
        else:
            change = (alpha if mode == "add" else -alpha) * d.expand_as(v)
        delta = torch.zeros_like(resid)
        delta[rows, positions] = change.to(resid.dtype)
        return resid + delta

    with model.hooks(fwd_hooks=[(act_name("resid_post", layer), hook)]):
        logits = model(tokens)
    return logits[rows, read]


def edited_logits_row_by_row(model, tokens, layer, positions, direction, mode="add", alpha=1.0, read_positions=None):
    """One row at a time (a causal model's rows do not interact), each with its own hook."""
    if mode not in ("add", "subtract", "project_out"):
        raise ValueError(f"unknown mode {mode!r}")
    read = positions if read_positions is None else read_positions
    out = []
    for b in range(len(tokens)):
        p = int(positions[b])

        def hook(resid, hook, p=p):
            resid = resid.clone()
            v = resid[0, p]
            if mode == "add":
                resid[0, p] = v + alpha * direction
            elif mode == "subtract":
                resid[0, p] = v - alpha * direction
            else:
                resid[0, p] = v - (v @ direction) / (direction @ direction) * direction
            return resid

        logits = model.run_with_hooks(tokens[b : b + 1], fwd_hooks=[(act_name("resid_post", layer), hook)])
        out.append(logits[0, int(read[b])])
    return torch.stack(out)


ALTERNATIVES = {
    "room_query_labels": [room_query_labels_rows, room_query_labels_scan],
    "document_split": [document_split_python_random, document_split_uniform_keys],
    "train_probe": [train_probe_float64_shuffled, train_probe_manual_adam],
    "mass_mean_probe": [mass_mean_probe_loop, mass_mean_probe_onehot],
    "auroc": [auroc_pairs, auroc_trapezoid],
    "control_task_labels": [control_task_labels_python_random, control_task_labels_per_type_generator],
    "edited_logits": [edited_logits_delta, edited_logits_row_by_row],
}
