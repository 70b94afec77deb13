"""Correct implementations of chapter 02's exercises written differently from the answer key (another
algorithm, float64 inside, loops instead of vectorised code, another valid draw of batches or learning-rate
schedule). Each must pass its exercise: proof that the checks accept right work that is not a transcription."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from interplab import hooks

# --- logit_lens --------------------------------------------------------------------------------------------


def logit_lens_accumulated(model, tokens, incl_mid=False):
    """TransformerLens's own route: the accumulated residual stream, each vector normalised by itself."""
    _, cache = model.run_with_cache(tokens)
    stack = cache.accumulated_resid(incl_mid=incl_mid)
    return model.unembed(cache.apply_ln_to_stack(stack, recompute_ln=True))


def logit_lens_hooks_float64(model, tokens, incl_mid=False):
    """Hooks that collect the residual stream as the forward pass goes, a read-out in float64."""
    names = [hooks.act_name("resid_pre", 0)]
    for layer in range(model.cfg.n_layers):
        names += ([hooks.act_name("resid_mid", layer)] if incl_mid else []) + [hooks.act_name("resid_post", layer)]
    seen = {}

    def keep(act, hook):
        seen[hook.name] = act.detach()

    model.run_with_hooks(tokens, fwd_hooks=[(n, keep) for n in names])
    out = []
    for name in names:
        normed = model.ln_final(seen[name]).double()
        out.append(normed @ model.W_U.double() + model.b_U.double())
    return torch.stack(out)


# --- kl_to_final -------------------------------------------------------------------------------------------


def kl_to_final_kl_div(lens_logits, final_logits):
    log_p = final_logits.log_softmax(-1).expand_as(lens_logits)
    return F.kl_div(lens_logits.log_softmax(-1), log_p, reduction="none", log_target=True).sum(-1)


def kl_to_final_float64(lens_logits, final_logits):
    x, y = lens_logits.double(), final_logits.double()
    log_q = x - x.logsumexp(-1, keepdim=True)
    log_p = y - y.logsumexp(-1, keepdim=True)
    return (torch.exp(log_p) * (log_p - log_q)).sum(-1)


# --- lens_entropy ------------------------------------------------------------------------------------------


def lens_entropy_logsumexp(logits):
    """H = logsumexp(x) - sum_v p_v x_v, in float64."""
    x = logits.double()
    return x.logsumexp(-1) - (x.softmax(-1) * x).sum(-1)


def lens_entropy_categorical(logits):
    return torch.distributions.Categorical(logits=logits).entropy()


# --- correct_token_rank ------------------------------------------------------------------------------------


def correct_token_rank_loop(logits, targets):
    flat, tflat = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    ranks = [int((row > row[t]).sum()) for row, t in zip(flat, tflat.tolist())]
    return torch.tensor(ranks, dtype=torch.int32).reshape(targets.shape)


def correct_token_rank_searchsorted(logits, targets):
    ascending = logits.sort(-1).values.contiguous()
    value = logits.gather(-1, targets[..., None]).contiguous()
    at_most = torch.searchsorted(ascending, value, right=True)[..., 0]  # tokens with a logit <= the target's
    return logits.shape[-1] - at_most


# --- prediction_depth --------------------------------------------------------------------------------------


def prediction_depth_loop(lens_logits):
    top = lens_logits.argmax(-1).reshape(lens_logits.shape[0], -1)
    depths = []
    for j in range(top.shape[1]):
        d = top.shape[0] - 1
        while d > 0 and top[d - 1, j] == top[-1, j]:
            d -= 1
        depths.append(d)
    return torch.tensor(depths).reshape(lens_logits.shape[1:-1])


def prediction_depth_last_disagreement(lens_logits):
    top = lens_logits.argmax(-1)
    n = top.shape[0]
    idx = torch.arange(n).reshape(n, *([1] * (top.ndim - 1)))
    last_bad = torch.where(top != top[-1], idx, torch.full_like(idx, -1)).amax(0)
    return last_bad + 1


# --- tuned_lens_logits -------------------------------------------------------------------------------------


def tuned_lens_logits_einsum(model, resid, A, b):
    translated = resid + torch.einsum("lij,l...j->l...i", A, resid) + b.reshape(b.shape[0], *[1] * (resid.ndim - 2), -1)
    return model.unembed(model.ln_final(translated))


def tuned_lens_logits_loop_float64(model, resid, A, b):
    out = []
    for layer in range(resid.shape[0]):
        h = resid[layer].double()
        translated = h + h @ A[layer].double().T + b[layer].double()
        out.append(model.unembed(model.ln_final(translated.float())))
    return torch.stack(out)


# --- tuned_lens_loss ---------------------------------------------------------------------------------------


def _translated_logits(model, resid, A, b):
    return model.unembed(model.ln_final(resid + torch.einsum("lij,l...j->l...i", A, resid) + b[:, None]))


def tuned_lens_loss_kl_div(model, resid, A, b, final_logits, mask=None):
    flat = resid.reshape(resid.shape[0], -1, resid.shape[-1])
    logits = _translated_logits(model, flat, A, b)
    target = final_logits.reshape(-1, final_logits.shape[-1]).log_softmax(-1).expand(logits.shape)
    kl = F.kl_div(logits.log_softmax(-1), target, reduction="none", log_target=True).sum(-1)  # [layer, n]
    if mask is not None:
        kl = kl[:, mask.reshape(-1)]
    return kl.mean()


def tuned_lens_loss_weighted_float64(model, resid, A, b, final_logits, mask=None):
    weights = torch.ones(final_logits.shape[:-1], dtype=torch.float64) if mask is None else mask.double()
    total = 0.0
    for layer in range(resid.shape[0]):
        h = resid[layer]
        logits = model.unembed(model.ln_final(h + h @ A[layer].T + b[layer])).double()
        log_q = logits.log_softmax(-1)
        log_p = final_logits.double().log_softmax(-1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
        total = total + torch.where(weights > 0, kl, torch.zeros_like(kl)).sum()
    return total / (weights.sum() * resid.shape[0])


# --- fit_tuned_lens ----------------------------------------------------------------------------------------


def _kl_loss(model, resid, A, b, final_logits):
    logits = _translated_logits(model, resid, A, b)
    log_p, log_q = final_logits.log_softmax(-1), logits.log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def fit_tuned_lens_randperm(model, resid, final_logits, steps, batch_size, lr, seed=0, progress=False):
    """Batches without replacement (a fresh permutation each step), a warm-up that starts at 0, a decay that
    reaches exactly 0 at the last step, the learning rate set by hand each step."""
    n_layers, n, d = resid.shape
    A = torch.zeros(n_layers, d, d, requires_grad=True)
    b = torch.zeros(n_layers, d, requires_grad=True)
    opt = torch.optim.Adam([A, b], lr=lr)
    warmup = max(1, steps // 20)
    gen = torch.Generator().manual_seed(seed)
    losses, lrs = torch.zeros(steps), torch.zeros(steps)
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        with torch.enable_grad():
            for step in range(steps):
                rate = lr * min(step / warmup, (steps - 1 - step) / max(1, steps - 1 - warmup))
                for group in opt.param_groups:
                    group["lr"] = rate
                idx = torch.arange(n) if batch_size >= n else torch.randperm(n, generator=gen)[:batch_size]
                loss = _kl_loss(model, resid[:, idx], A, b, final_logits[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses[step], lrs[step] = loss.item(), rate
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
    return A.detach(), b.detach(), losses, lrs


def fit_tuned_lens_float64(model, resid, final_logits, steps, batch_size, lr, seed=0, progress=False):
    """Translators and their optimiser state in float64 (cast to float32 only for the model's read-out),
    batches drawn with multinomial sampling, a LambdaLR schedule."""
    n_layers, n, d = resid.shape
    A = torch.zeros(n_layers, d, d, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_layers, d, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([A, b], lr=lr)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else (steps - s) / (steps - warmup)
    )
    gen = torch.Generator().manual_seed(seed)
    uniform = torch.ones(n)
    losses, lrs = [], []
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            for _ in range(steps):
                if batch_size >= n:
                    idx = torch.arange(n)
                else:
                    idx = torch.multinomial(uniform, batch_size, replacement=True, generator=gen)
                h = resid[:, idx].double()
                translated = (h + torch.einsum("lij,lnj->lni", A, h) + b[:, None]).float()
                logits = model.unembed(model.ln_final(translated)).double()
                log_p = final_logits[idx].double().log_softmax(-1)
                loss = (log_p.exp() * (log_p - logits.log_softmax(-1))).sum(-1).mean()
                lrs.append(sched.get_last_lr()[0])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.item())
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
    return A.detach(), b.detach(), torch.tensor(losses, dtype=torch.float64), torch.tensor(lrs, dtype=torch.float64)


ALTERNATIVES = {
    "logit_lens": [logit_lens_accumulated, logit_lens_hooks_float64],
    "kl_to_final": [kl_to_final_kl_div, kl_to_final_float64],
    "lens_entropy": [lens_entropy_logsumexp, lens_entropy_categorical],
    "correct_token_rank": [correct_token_rank_loop, correct_token_rank_searchsorted],
    "prediction_depth": [prediction_depth_loop, prediction_depth_last_disagreement],
    "tuned_lens_logits": [tuned_lens_logits_einsum, tuned_lens_logits_loop_float64],
    "tuned_lens_loss": [tuned_lens_loss_kl_div, tuned_lens_loss_weighted_float64],
    "fit_tuned_lens": [fit_tuned_lens_randperm, fit_tuned_lens_float64],
}
