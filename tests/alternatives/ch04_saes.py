"""Chapter 4: correct implementations written differently from the answer key.

Each must pass its exercise's checks (tests/test_alternatives.py runs them): other algorithms, float64
inside, loops instead of vectorised code, another valid choice among ties, another batch order.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from interplab.dictionaries import SAE

# --- sae_encode ---------------------------------------------------------------------------------


def sae_encode_einsum(x, W_enc, b_enc, b_dec):
    pre = torch.einsum("...i,is->...s", x, W_enc) - b_dec @ W_enc + b_enc
    return pre.clamp_min(0.0)


def sae_encode_float64(x, W_enc, b_enc, b_dec):
    centred = x.double() - b_dec.double()
    return F.relu(centred @ W_enc.double() + b_enc.double())


# --- sae_loss ------------------------------------------------------------------------------------


def sae_loss_float64(x, x_hat, acts, W_dec, l1_coeff):
    err = x_hat.double() - x.double()
    mse = (err * err).sum(-1).mean()
    norms = torch.linalg.vector_norm(W_dec.double(), dim=-1)
    l1 = (acts.double().abs() @ norms).mean()
    return mse + l1_coeff * l1, mse, l1


def sae_loss_einsum(x, x_hat, acts, W_dec, l1_coeff):
    n = x.shape[0]
    mse = torch.einsum("bd,bd->", x_hat - x, x_hat - x) / n
    l1 = torch.einsum("bs,s->", acts.abs(), W_dec.pow(2).sum(-1).sqrt()) / n
    return l1_coeff * l1 + mse, mse, l1


# --- remove_parallel_grad -------------------------------------------------------------------------


def remove_parallel_grad_loop(W_dec, grad):
    rows = []
    for w, g in zip(W_dec.double(), grad.double()):
        u = w / w.norm()
        rows.append(g - torch.dot(g, u) * u)
    return torch.stack(rows)


def remove_parallel_grad_gram(W_dec, grad):
    coeff = (grad * W_dec).sum(-1, keepdim=True) / (W_dec * W_dec).sum(-1, keepdim=True)
    return grad - coeff * W_dec


# --- topk_activation ------------------------------------------------------------------------------


def topk_activation_sort(pre_acts, k):
    order = pre_acts.argsort(dim=-1, descending=True, stable=True)[..., :k]
    keep = torch.zeros_like(pre_acts, dtype=torch.bool).scatter(-1, order, True)
    return torch.where(keep, pre_acts.clamp_min(0), torch.zeros_like(pre_acts))


def topk_activation_loop(pre_acts, k):
    out = torch.zeros(pre_acts.shape, dtype=torch.float64)
    for r, row in enumerate(pre_acts.double()):
        # last tied entries first: a different (equally valid) choice among ties than torch.topk's
        ranked = sorted(range(len(row)), key=lambda i: (-float(row[i]), -i))
        for i in ranked[:k]:
            out[r, i] = max(float(row[i]), 0.0)
    return out


# --- batchtopk_activation ------------------------------------------------------------------------------


def batchtopk_activation_sort(pre_acts, k):
    acts = pre_acts.relu()
    n_keep = min(k * pre_acts.shape[0], acts.numel())
    order = acts.flatten().argsort(descending=True, stable=True)[:n_keep]
    mask = torch.zeros(acts.numel(), dtype=torch.bool)
    mask[order] = True
    return acts * mask.reshape(acts.shape)


def batchtopk_activation_loop(pre_acts, k):
    entries = [(float(v), r, c) for r, row in enumerate(pre_acts.tolist()) for c, v in enumerate(row) if v > 0]
    entries.sort(key=lambda e: (-e[0], -e[1], -e[2]))  # ties: the later entries win (still a valid choice)
    out = torch.zeros(pre_acts.shape, dtype=torch.float64)
    for v, r, c in entries[: k * pre_acts.shape[0]]:
        out[r, c] = v
    return out


# --- resample_dead_features -----------------------------------------------------------------------------


def resample_dead_features_loop(W_enc, b_enc, W_dec, dead, x, x_hat, encoder_scale=0.2):
    W_enc, b_enc, W_dec = W_enc.double().clone(), b_enc.double().clone(), W_dec.double().clone()
    residual = (x - x_hat).double()
    errors = [float(r @ r) for r in residual]
    worst = sorted(range(len(errors)), key=lambda i: -errors[i])
    live = [i for i in range(len(dead)) if not dead[i]]
    scale = sum(float(W_enc[:, i].norm()) for i in live) / len(live) if live else 1.0
    j = 0
    for feature in range(len(dead)):
        if not dead[feature]:
            continue
        r = residual[worst[j % len(worst)]]
        r = r / max(float(r.norm()), 1e-8)
        W_dec[feature] = r
        W_enc[:, feature] = r * encoder_scale * scale
        b_enc[feature] = 0.0
        j += 1
    return W_enc, b_enc, W_dec


def resample_dead_features_masked(W_enc, b_enc, W_dec, dead, x, x_hat, encoder_scale=0.2):
    idx = dead.nonzero().flatten()
    if len(idx) == 0:
        return W_enc.clone(), b_enc.clone(), W_dec.clone()
    residual = x - x_hat
    order = residual.norm(dim=-1).argsort(descending=True)  # the same order as by squared error
    rows = order[torch.arange(len(idx)) % len(order)]
    directions = F.normalize(residual[rows], dim=-1)
    live_cols = W_enc[:, ~dead]
    enc_norm = live_cols.norm(dim=0).mean() if live_cols.shape[1] else torch.tensor(1.0)
    new_enc = W_enc.index_copy(1, idx, (directions * encoder_scale * enc_norm).T)
    new_dec = W_dec.index_copy(0, idx, directions)
    new_b = b_enc.index_fill(0, idx, 0.0)
    return new_enc, new_b, new_dec


# --- train_sae -----------------------------------------------------------------------------------------


def _train(acts, cfg, *, target, steps, batch_size, lr, seed, dead_after, resample_every, double, scheduler):
    """A training loop written independently of the answer key (LambdaLR or manual decay, own resampling)."""
    target = acts if target is None else target
    dtype = torch.float64 if double else torch.float32
    acts, target = acts.to(dtype), target.to(dtype)
    torch.manual_seed(seed)
    # the float64 loop draws its initial weights as the reference does; the other from its own generator (another
    # valid draw: the contract fixes that the seed decides, not how)
    sae = SAE(cfg, generator=None if double else torch.Generator().manual_seed(7 * seed + 3)).to(dtype)
    with torch.no_grad():
        sae.b_dec.copy_(target.mean(0))
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    decay_steps = steps - int(0.8 * steps)
    sched = None
    if scheduler:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (steps - t) / max(1, decay_steps)))
    rng = torch.Generator().manual_seed(seed + 12345)
    batches: list[torch.Tensor] = []
    silent = torch.zeros(cfg.d_sae, dtype=torch.long)
    resampled = 0
    sae.train()
    for step in range(steps):
        if not batches:
            perm = torch.randperm(len(acts), generator=rng)
            batches = list(perm[: len(perm) // batch_size * batch_size].split(batch_size)) or [perm]
        idx = batches.pop()
        x, y = acts[idx], target[idx]
        if not scheduler:
            for group in opt.param_groups:
                group["lr"] = lr * min(1.0, (steps - step) / max(1, decay_steps))
        out = sae.loss(x, y)
        for p in sae.parameters():
            p.grad = None
        out.loss.backward()
        with torch.no_grad():
            u = F.normalize(sae.W_dec, dim=-1)
            sae.W_dec.grad -= (sae.W_dec.grad * u).sum(-1, keepdim=True) * u
        opt.step()
        if sched is not None:
            sched.step()
        with torch.no_grad():
            sae.W_dec.copy_(F.normalize(sae.W_dec, dim=-1))
            silent = torch.where((out.acts != 0).any(0), torch.zeros_like(silent), silent + 1)
            if (step + 1) % resample_every == 0 and step < int(0.8 * steps):
                dead = silent >= dead_after
                if dead.any():
                    feats = dead.nonzero().flatten()
                    residual = y - out.x_hat
                    worst = residual.pow(2).sum(-1).argsort(descending=True)
                    dirs = F.normalize(residual[worst[torch.arange(len(feats)) % len(worst)]], dim=-1)
                    live = ~dead
                    scale = 0.2 if cfg.architecture == "standard" else 1.0
                    norm = sae.W_enc[:, live].norm(dim=0).mean() if live.any() else torch.tensor(1.0)
                    sae.W_dec[feats] = dirs
                    sae.W_enc[:, feats] = dirs.T * scale * norm
                    sae.b_enc[feats] = 0.0
                    for p, where in ((sae.W_dec, (feats,)), (sae.W_enc, (slice(None), feats)), (sae.b_enc, (feats,))):
                        for key in ("exp_avg", "exp_avg_sq"):
                            if key in opt.state[p]:
                                opt.state[p][key][where] = 0
                    silent[feats] = 0
                    resampled += len(feats)
    sae.eval()
    sae.info = {"resampled": resampled, "steps": steps}
    return sae


def train_sae_float64_scheduler(
    acts,
    cfg,
    *,
    target=None,
    steps=1000,
    batch_size=1024,
    lr=1e-3,
    seed=0,
    dead_after=200,
    resample_every=250,
    progress=True,
):
    return _train(
        acts,
        cfg,
        target=target,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        dead_after=dead_after,
        resample_every=resample_every,
        double=True,
        scheduler=True,
    )


def train_sae_other_order(
    acts,
    cfg,
    *,
    target=None,
    steps=1000,
    batch_size=1024,
    lr=1e-3,
    seed=0,
    dead_after=200,
    resample_every=250,
    progress=True,
):
    return _train(
        acts,
        cfg,
        target=target,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        dead_after=dead_after,
        resample_every=resample_every,
        double=False,
        scheduler=False,
    )


# --- explained_variance -------------------------------------------------------------------------------------


def explained_variance_welford(x, x_hat):
    mean = torch.zeros(x.shape[1], dtype=torch.float64)
    for i, row in enumerate(x.double()):
        mean += (row - mean) / (i + 1)
    total = sum(float((row - mean).pow(2).sum()) for row in x.double())
    err = sum(float((a - b).pow(2).sum()) for a, b in zip(x.double(), x_hat.double()))
    return 1.0 - err / total


def explained_variance_var(x, x_hat):
    total = x.double().var(dim=0, unbiased=False).sum() * x.shape[0]
    return float(1 - F.mse_loss(x_hat.double(), x.double(), reduction="sum") / total)


# --- reconstruction_metrics ------------------------------------------------------------------------------------


def reconstruction_metrics_float64(x, x_hat, acts):
    x, x_hat = x.double(), x_hat.double()
    dots = (x * x_hat).sum(-1)
    nx, nh = x.norm(dim=-1), x_hat.norm(dim=-1)
    cos = torch.where(nh > 0, dots / (nx * nh).clamp_min(1e-300), torch.zeros_like(dots))
    return {
        "l0": float(acts.ne(0).sum(-1).double().mean()),
        "mse": float((x - x_hat).square().sum(-1).mean()),
        "cosine_sim": float(cos.mean()),
        "l2_ratio": float((nh / nx).mean()),
    }


def reconstruction_metrics_loop(x, x_hat, acts):
    n = x.shape[0]
    totals = {"l0": 0.0, "mse": 0.0, "cosine_sim": 0.0, "l2_ratio": 0.0}
    for a, b, f in zip(x.tolist(), x_hat.tolist(), acts.tolist()):
        na, nb = math.sqrt(sum(v * v for v in a)), math.sqrt(sum(v * v for v in b))
        totals["l0"] += sum(v != 0 for v in f)
        totals["mse"] += sum((u - v) ** 2 for u, v in zip(a, b))
        totals["cosine_sim"] += sum(u * v for u, v in zip(a, b)) / (na * nb) if nb > 0 else 0.0
        totals["l2_ratio"] += nb / na
    return {key: value / n for key, value in totals.items()}


# --- feature_density ------------------------------------------------------------------------------------------------


def feature_density_count_nonzero(acts):
    return torch.count_nonzero(acts, dim=0).double() / acts.shape[0]


def feature_density_loop(acts):
    n, d = acts.shape
    return torch.tensor([sum(1 for r in range(n) if acts[r, i] != 0) / n for i in range(d)], dtype=torch.float64)


# --- spliced_loss ----------------------------------------------------------------------------------------------------


def _spliced(model, sae, tokens, mask, use_hooks_context):
    hook = sae.cfg.hook_name
    m = mask.bool()

    def splice(act, hook):
        out = act.clone()
        out[m] = sae(act[m])
        return out

    with torch.inference_mode():
        clean = model(tokens).double()
        if use_hooks_context:
            with model.hooks(fwd_hooks=[(hook, splice)]):
                spliced = model(tokens).double()
            with model.hooks(fwd_hooks=[(hook, lambda act, hook: act * 0)]):
                zeroed = model(tokens).double()
        else:
            spliced = model.run_with_hooks(tokens, fwd_hooks=[(hook, splice)]).double()
            zeroed = model.run_with_hooks(tokens, fwd_hooks=[(hook, lambda act, hook: torch.zeros_like(act))]).double()
    scored = (m[:, :-1] & m[:, 1:]).flatten()
    targets = tokens[:, 1:].flatten()[scored]

    def ce(logits):
        return float(F.cross_entropy(logits[:, :-1].flatten(0, 1)[scored], targets))

    c, s, z = ce(clean), ce(spliced), ce(zeroed)
    p_log = F.log_softmax(clean[:, :-1].flatten(0, 1)[scored], -1)
    q_log = F.log_softmax(spliced[:, :-1].flatten(0, 1)[scored], -1)
    kl = float(F.kl_div(q_log, p_log, log_target=True, reduction="batchmean"))
    return {"ce_clean": c, "ce_sae": s, "ce_zero": z, "loss_recovered": 1 - (s - c) / (z - c), "kl_sae": kl}


def spliced_loss_inference_mode(model, sae, tokens, mask):
    return _spliced(model, sae, tokens, mask, use_hooks_context=False)


def spliced_loss_hooks_context(model, sae, tokens, mask):
    return _spliced(model, sae, tokens, mask, use_hooks_context=True)


# --- top_activating_contexts ------------------------------------------------------------------------------------------


def top_activating_contexts_sort(feature_acts, mask, k):
    seq, pos = mask.nonzero(as_tuple=True)
    values = feature_acts[seq, pos]
    order = values.argsort(descending=True, stable=True)[:k]
    return values[order], seq[order], pos[order]


def top_activating_contexts_loop(feature_acts, mask, k):
    entries = [
        (float(feature_acts[s, p]), s, p)
        for s in range(feature_acts.shape[0])
        for p in range(feature_acts.shape[1])
        if mask[s, p]
    ]
    entries.sort(key=lambda e: (-e[0], -e[1], -e[2]))  # among ties, later tokens first
    top = entries[:k]
    return (
        torch.tensor([e[0] for e in top], dtype=torch.float64),
        torch.tensor([e[1] for e in top], dtype=torch.int32),
        torch.tensor([e[2] for e in top], dtype=torch.int32),
    )


# --- feature_logit_weights --------------------------------------------------------------------------------------------


def feature_logit_weights_einsum(sae, model, feature):
    return torch.einsum("d,dv->v", sae.W_dec[feature].detach().double(), model.W_U.detach().double())


def feature_logit_weights_onehot(sae, model, feature):
    one = torch.zeros(sae.cfg.d_sae)
    one[feature] = 1.0
    with torch.no_grad():
        return (one @ sae.W_dec) @ model.W_U


# --- steer_with_feature -----------------------------------------------------------------------------------------------


def steer_with_feature_hooks_context(model, sae, tokens, feature, scale):
    vec = scale * sae.W_dec[feature].detach().clone()
    with torch.inference_mode(), model.hooks(fwd_hooks=[(sae.cfg.hook_name, lambda act, hook: act + vec)]):
        return model(tokens).clone()


def steer_with_feature_inplace_clone(model, sae, tokens, feature, scale):
    vec = sae.W_dec[feature].detach().double()

    def add(act, hook):
        out = act.clone()
        out += (scale * vec).to(act.dtype)
        return out

    with torch.no_grad():
        return model.run_with_hooks(tokens, fwd_hooks=[(sae.cfg.hook_name, add)])


# --- feature_aurocs -------------------------------------------------------------------------------------------------------


def feature_aurocs_pairwise(acts, labels):
    labels = labels.bool()
    if labels.all() or not labels.any():
        raise ValueError("AUROC needs at least one positive and one negative token")
    pos, neg = acts[labels].double(), acts[~labels].double()
    diff = pos[:, None, :] - neg[None, :, :]
    return ((diff > 0).double() + 0.5 * (diff == 0).double()).mean((0, 1))


def feature_aurocs_loop(acts, labels):
    labels = [bool(v) for v in labels]
    n_pos = sum(labels)
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("labels must contain both classes")
    out = []
    for column in acts.T.tolist():
        # Mann-Whitney U with average ranks for ties
        order = sorted(range(len(column)), key=lambda i: column[i])
        ranks = [0.0] * len(column)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and column[order[j + 1]] == column[order[i]]:
                j += 1
            for t in range(i, j + 1):
                ranks[order[t]] = (i + j) / 2 + 1
            i = j + 1
        rank_sum = sum(r for r, y in zip(ranks, labels) if y)
        out.append((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return torch.tensor(out, dtype=torch.float64)


# --- max_f1 ------------------------------------------------------------------------------------------------------------


def max_f1_unique_thresholds(scores, labels):
    labels = labels.bool()
    if not labels.any():
        raise ValueError("F1 needs at least one positive token")
    best = 0.0
    for t in scores.unique():
        pred = scores >= t
        tp = int((pred & labels).sum())
        best = max(best, 2 * tp / (int(pred.sum()) + int(labels.sum())))
    return best


def max_f1_grouped(scores, labels):
    if int(labels.sum()) == 0:
        raise ValueError("no positive token")
    values, inverse = scores.double().unique(return_inverse=True)  # ascending
    pos = torch.zeros(len(values), dtype=torch.float64).index_add_(0, inverse, labels.double())
    cnt = torch.zeros(len(values), dtype=torch.float64).index_add_(
        0, inverse, torch.ones(len(scores), dtype=torch.float64)
    )
    tp = pos.flip(0).cumsum(0)
    predicted = cnt.flip(0).cumsum(0)
    return float((2 * tp / (predicted + labels.sum())).max())


ALTERNATIVES = {
    "sae_encode": [sae_encode_einsum, sae_encode_float64],
    "sae_loss": [sae_loss_float64, sae_loss_einsum],
    "remove_parallel_grad": [remove_parallel_grad_loop, remove_parallel_grad_gram],
    "topk_activation": [topk_activation_sort, topk_activation_loop],
    "batchtopk_activation": [batchtopk_activation_sort, batchtopk_activation_loop],
    "resample_dead_features": [resample_dead_features_loop, resample_dead_features_masked],
    "train_sae": [train_sae_float64_scheduler, train_sae_other_order],
    "explained_variance": [explained_variance_welford, explained_variance_var],
    "reconstruction_metrics": [reconstruction_metrics_float64, reconstruction_metrics_loop],
    "feature_density": [feature_density_count_nonzero, feature_density_loop],
    "spliced_loss": [spliced_loss_inference_mode, spliced_loss_hooks_context],
    "top_activating_contexts": [top_activating_contexts_sort, top_activating_contexts_loop],
    "feature_logit_weights": [feature_logit_weights_einsum, feature_logit_weights_onehot],
    "steer_with_feature": [steer_with_feature_hooks_context, steer_with_feature_inplace_clone],
    "feature_aurocs": [feature_aurocs_pairwise, feature_aurocs_loop],
    "max_f1": [max_f1_unique_thresholds, max_f1_grouped],
}
