"""Chapter 00: correct implementations written differently from the answer key (each must pass its checks)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from interplab.hooks import act_name

# --- per_token_loss ---------------------------------------------------------------------


def loss_cross_entropy(logits, tokens):
    """F.cross_entropy on the flattened predictions, reduction='none'."""
    b, p, v = logits.shape
    flat = F.cross_entropy(logits[:, :-1].reshape(-1, v), tokens[:, 1:].reshape(-1), reduction="none")
    return flat.reshape(b, p - 1)


def loss_logsumexp_float64(logits, tokens):
    """logsumexp minus the target logit, computed in float64."""
    x = logits[:, :-1].double()
    target = torch.take_along_dim(x, tokens[:, 1:, None], dim=-1)[..., 0]
    return x.logsumexp(-1) - target


# --- answer_logit_diff ------------------------------------------------------------------


def diff_indexing(logits, answer_ids, wrong_ids):
    """Advanced indexing with a row index."""
    if len(answer_ids) != len(logits) or len(wrong_ids) != len(logits) or answer_ids.dim() != 1 or wrong_ids.dim() != 1:
        raise ValueError("one answer id and one wrong id per prompt")
    rows = torch.arange(len(logits))
    return logits[rows, -1, answer_ids] - logits[rows, -1, wrong_ids]


def diff_loop_float64(logits, answer_ids, wrong_ids):
    """A Python loop over prompts, in float64."""
    n = logits.shape[0]
    if tuple(answer_ids.shape) != (n,) or tuple(wrong_ids.shape) != (n,):
        raise ValueError(f"expected {n} ids")
    last = logits[:, -1].double()
    return torch.stack([last[b, int(answer_ids[b])] - last[b, int(wrong_ids[b])] for b in range(n)])


def diff_one_hot(logits, answer_ids, wrong_ids):
    """A signed one-hot direction dotted with the final logits."""
    n, _, v = logits.shape
    if answer_ids.shape != (n,) or wrong_ids.shape != (n,):
        raise ValueError("ids must have one entry per prompt")
    direction = F.one_hot(answer_ids, v).to(logits.dtype) - F.one_hot(wrong_ids, v).to(logits.dtype)
    return (logits[:, -1] * direction).sum(-1)


# --- previous_token_score ---------------------------------------------------------------


def prev_loop(pattern):
    """A loop over query positions."""
    n = pattern.shape[-1]
    if n < 2:
        raise ValueError("need two positions")
    total = torch.zeros(pattern.shape[0], dtype=pattern.dtype)
    for q in range(1, n):
        total = total + pattern[:, q, q - 1]
    return total / (n - 1)


def prev_mask(pattern):
    """A sub-diagonal mask, summed and divided by the number of queries that have a previous token."""
    n = pattern.shape[-1]
    if n <= 1:
        raise ValueError("a single position has no previous token")
    mask = torch.diag(torch.ones(n - 1, dtype=pattern.dtype), diagonal=-1)
    return (pattern * mask).sum((-2, -1)) / (n - 1)


# --- ablate_head ------------------------------------------------------------------------


def ablate_where(z, head):
    """torch.where with a head mask."""
    if head < 0 or head >= z.shape[2]:
        raise IndexError(f"no head {head}")
    keep = torch.arange(z.shape[2]) != head
    return torch.where(keep[None, None, :, None], z, torch.zeros((), dtype=z.dtype))


def ablate_cat(z, head):
    """The heads before and after, with zeros put back between them."""
    if head not in range(z.shape[2]):
        raise IndexError(head)
    return torch.cat([z[:, :, :head], torch.zeros_like(z[:, :, head : head + 1]), z[:, :, head + 1 :]], dim=2)


# --- head_ablation_loss -----------------------------------------------------------------


def ablation_loss_weights(model, tokens, layer, head, loss_mask=None):
    """The hook multiplies by a 0/1 head mask; the mean is a weighted sum."""
    keep = torch.ones(model.cfg.n_heads)
    keep[head] = 0.0
    logits = model.run_with_hooks(tokens, fwd_hooks=[(act_name("z", layer), lambda z, hook: z * keep[:, None])])
    loss = loss_cross_entropy(logits, tokens)
    w = torch.ones_like(loss) if loss_mask is None else loss_mask[:, 1:].to(loss.dtype)
    return float(((loss * w).sum() / w.sum()).detach())


def ablation_loss_hook_context(model, tokens, layer, head, loss_mask=None):
    """model.hooks() as a context manager; float64 sum over a list of kept losses."""

    def zero(z, hook):
        z = z.clone()
        z[..., head, :] = 0
        return z

    with model.hooks(fwd_hooks=[(act_name("z", layer), zero)]):
        logits = model(tokens)
    loss = loss_logsumexp_float64(logits, tokens)
    kept = [
        loss[b, p]
        for b in range(loss.shape[0])
        for p in range(loss.shape[1])
        if loss_mask is None or bool(loss_mask[b, p + 1])
    ]
    return torch.stack(kept).mean().item()


# --- head_ablation_effects --------------------------------------------------------------


def effects_loop(model, tokens, loss_mask=None, replacements=None):
    """One forward pass per head through the checked head-removal idea, prompt means in float64."""
    counted = (torch.ones_like(tokens, dtype=torch.bool) if loss_mask is None else loss_mask)[:, 1:]
    if not counted.any(1).all():
        raise ValueError("a prompt counts no prediction")
    w = counted.double()

    def prompt_means(logits):
        return (loss_logsumexp_float64(logits, tokens) * w).sum(1) / w.sum(1)

    clean = prompt_means(model(tokens))
    rows = []
    for layer in range(model.cfg.n_layers):
        row = []
        for head in range(model.cfg.n_heads):

            def swap(z, hook, layer=layer, head=head):
                if replacements is None:
                    new = torch.zeros_like(z[:, :, head])
                else:
                    new = replacements[layer][:, :, head].expand_as(z[:, :, head])
                return torch.cat([z[:, :, :head], new[:, :, None], z[:, :, head + 1 :]], dim=2)

            row.append(prompt_means(model.run_with_hooks(tokens, fwd_hooks=[(act_name("z", layer), swap)])) - clean)
        rows.append(torch.stack(row))
    return torch.stack(rows)


def effects_per_prompt(model, tokens, loss_mask=None, replacements=None):
    """Prompt by prompt (batch of one), with a boolean-indexed mean."""
    mask = torch.ones_like(tokens, dtype=torch.bool) if loss_mask is None else loss_mask
    if (mask[:, 1:].sum(1) == 0).any():
        raise ValueError("every prompt must count a prediction")
    out = torch.zeros(model.cfg.n_layers, model.cfg.n_heads, len(tokens))
    for b in range(len(tokens)):
        one = tokens[b : b + 1]
        m = mask[b, 1:]
        clean = loss_cross_entropy(model(one), one)[0][m].mean()
        for layer in range(model.cfg.n_layers):
            for head in range(model.cfg.n_heads):
                if replacements is None:
                    value = 0.0
                else:
                    rep = replacements[layer]
                    value = rep[b if rep.shape[0] > 1 else 0][:, head]

                def hook(z, hook, head=head, value=value):
                    z = z.clone()
                    z[0, :, head] = value
                    return z

                logits = model.run_with_hooks(one, fwd_hooks=[(act_name("z", layer), hook)])
                out[layer, head, b] = loss_cross_entropy(logits, one)[0][m].mean() - clean
    return out


ALTERNATIVES = {
    "per_token_loss": [loss_cross_entropy, loss_logsumexp_float64],
    "answer_logit_diff": [diff_indexing, diff_loop_float64, diff_one_hot],
    "previous_token_score": [prev_loop, prev_mask],
    "ablate_head": [ablate_where, ablate_cat],
    "head_ablation_loss": [ablation_loss_weights, ablation_loss_hook_context],
    "head_ablation_effects": [effects_loop, effects_per_prompt],
}
