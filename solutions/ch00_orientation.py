"""Chapter 00 (orientation): reference solutions of the warm-up exercises."""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from interplab import hooks


def per_token_loss(
    logits: Float[Tensor, "batch pos vocab"], tokens: Int[Tensor, "batch pos"]
) -> Float[Tensor, "batch pos-1"]:
    """Cross-entropy of each next-token prediction, in nats.

    The logits at position p are the model's prediction of the token at position p + 1,
    so the last position has nothing to predict and the first token is never predicted.

    Args:
        logits: the model's output logits (unnormalised scores over the vocabulary).
        tokens: the input token ids.

    Returns:
        A float tensor [batch, pos-1] whose entry [b, p] is minus the natural log of the
        probability the model gives to the token that really comes next, at position p + 1.
        Every entry is at least 0; uniform logits over a vocabulary of V give log V. It must
        stay finite for logits of any size (a logit of 1000 is no reason for inf or NaN), and
        it must be differentiable: later chapters train on this loss, so the gradient has
        to reach the logits.
    """
    log_probs = logits.log_softmax(dim=-1)[:, :-1]
    return -log_probs.gather(dim=-1, index=tokens[:, 1:, None])[..., 0]


def answer_logit_diff(
    logits: Float[Tensor, "batch pos vocab"],
    answer_ids: Int[Tensor, " batch"],
    wrong_ids: Int[Tensor, " batch"],
) -> Float[Tensor, " batch"]:
    """How strongly each prompt's final prediction prefers the right answer to a wrong one.

    Args:
        logits: the model's output logits; each prompt's answer is predicted at its last position.
        answer_ids: the correct next token of each prompt.
        wrong_ids: the competing wrong token of each prompt.

    Returns:
        A float tensor [batch]: for each prompt, the logit the final position gives the
        right answer minus the logit it gives the wrong one. Positive means the right answer
        is preferred; 0 when both ids are the same token. One value per prompt (not an
        average), and differentiable in the logits: chapter 6 takes gradients of it.

    Raises:
        ValueError: answer_ids or wrong_ids does not have exactly one id per prompt (ids of
            another batch would otherwise be broadcast or silently truncated).
    """
    batch = logits.shape[0]
    if answer_ids.shape != (batch,) or wrong_ids.shape != (batch,):
        raise ValueError(
            f"expected one answer id and one wrong id per prompt ({batch} prompts), got answer_ids of shape "
            f"{tuple(answer_ids.shape)} and wrong_ids of shape {tuple(wrong_ids.shape)}"
        )
    final = logits[:, -1]
    right = final.gather(-1, answer_ids[:, None])[:, 0]
    wrong = final.gather(-1, wrong_ids[:, None])[:, 0]
    return right - wrong


def previous_token_score(pattern: Float[Tensor, "head query key"]) -> Float[Tensor, " head"]:
    """How much each head attends from each token to the token just before it.

    Args:
        pattern: attention probabilities of one layer for one prompt; pattern[h, q, k] is
            how much head h at query position q attends to key position k.

    Returns:
        A float tensor [head]: for each head, the average over every query position that
        has a previous token of the attention it pays to that previous token. The first
        position has none and does not count. A head that always attends to the previous
        token scores 1, one that never does scores 0.

    Raises:
        ValueError: the prompt has fewer than two positions, so no position has a previous token.
    """
    if pattern.shape[-1] < 2:
        raise ValueError(
            f"a previous-token score needs at least 2 positions, got a pattern of shape {tuple(pattern.shape)}"
        )
    return pattern.diagonal(offset=-1, dim1=-2, dim2=-1).mean(dim=-1)


def ablate_head(z: Float[Tensor, "batch pos head d_head"], head: int) -> Float[Tensor, "batch pos head d_head"]:
    """One attention head's output removed (TransformerLens's `hook_z`), the input left unchanged.

    Args:
        z: the per-head attention outputs of one layer (before W_O).
        head: which head to remove, 0 .. n_heads - 1.

    Returns:
        A new float tensor shaped like z: zero for every entry of that head, at every batch
        row and position, and equal to z everywhere else. z itself must not change (other
        hooks and the cache may still hold it). Gradients must flow through it: later
        chapters differentiate through hooks that use it, so the other heads keep z's
        gradient and the removed head gets none.

    Raises:
        IndexError: head is not one of z's heads (negative numbers included: -1 is a typo
            here, not "the last head").
    """
    if not 0 <= head < z.shape[2]:
        raise IndexError(f"head {head} is not a head of z, which has {z.shape[2]} heads (0 .. {z.shape[2] - 1})")
    out = z.clone()
    out[:, :, head, :] = 0.0
    return out


def head_ablation_loss(
    model, tokens: Int[Tensor, "batch pos"], layer: int, head: int, loss_mask: Bool[Tensor, "batch pos"] | None = None
) -> float:
    """Mean next-token loss of the model when one attention head's output is zeroed.

    Args:
        model: a HookedTransformer.
        tokens: input token ids.
        layer: the layer of the head.
        head: the head to zero (its output before W_O, at every position).
        loss_mask: which tokens' predictions count, aligned with tokens: loss_mask[b, t] is
            True when the model's prediction OF token t (made at position t - 1) enters the
            mean. Position 0 is never predicted, so loss_mask[:, 0] is ignored. None counts
            every prediction. Use it to leave out padding, or to measure a behaviour only
            on the tokens where it happens.

    Returns:
        The per-token cross-entropy averaged over all counted predictions of all prompts
        (every counted token weighs the same), as a Python float. The model is left as it
        was: no hook stays attached.
    """

    def hook(z, hook):
        return ablate_head(z, head)

    logits = model.run_with_hooks(tokens, fwd_hooks=[(hooks.act_name("z", layer), hook)])
    loss = per_token_loss(logits, tokens)
    if loss_mask is None:
        return loss.mean().item()
    counted = loss_mask[:, 1:].to(loss.device)
    return loss[counted].mean().item()


def head_ablation_effects(
    model,
    tokens: Int[Tensor, "batch pos"],
    loss_mask: Bool[Tensor, "batch pos"] | None = None,
    replacements: Float[Tensor, "layer batch pos head d_head"] | None = None,
) -> Float[Tensor, "layer head batch"]:
    """For every head of the model and every prompt, how much the loss rises when that head is removed.

    Each head is removed on its own, with all other heads intact, by
    replacing its output before W_O (`hook_z`) at every position.

    Args:
        model: a HookedTransformer.
        tokens: input token ids.
        loss_mask: which tokens' predictions count, as in `head_ablation_loss` (loss_mask[b, t]:
            the prediction of token t; column 0 ignored; None counts every prediction). Every
            prompt must count at least one prediction.
        replacements: what a removed head outputs instead: when head h of layer l is removed,
            its output becomes replacements[l][:, :, h] (broadcast to [batch, pos, d_head], so a
            size-1 batch or position axis means "the same at every prompt / position").
            None removes heads by zeroing them.

    Returns:
        A float tensor [layer, head, batch]: entry [l, h, b] is prompt b's mean counted
        loss with head h of layer l removed, minus prompt b's mean counted loss of the
        intact model. Each prompt is averaged over its own counted tokens, so a prompt's
        effect does not depend on the others, and the spread over prompts gives the
        uncertainty of the average. The model is left as it was.

    Raises:
        ValueError: a prompt counts no prediction at all (its mean loss would be undefined).
    """
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    counted = torch.ones_like(tokens[:, 1:], dtype=torch.bool) if loss_mask is None else loss_mask[:, 1:]
    counted = counted.to(tokens.device).float()
    if (counted.sum(1) == 0).any():
        raise ValueError("every prompt needs at least one counted prediction; a row of loss_mask[:, 1:] is all False")

    def mean_loss(logits):
        return (per_token_loss(logits, tokens) * counted).sum(1) / counted.sum(1)

    clean = mean_loss(model(tokens))
    effects = torch.zeros(n_layers, n_heads, tokens.shape[0])
    for layer in range(n_layers):
        for head in range(n_heads):

            def hook(z, hook, layer=layer, head=head):
                out = z.clone()
                out[:, :, head] = 0.0 if replacements is None else replacements[layer][:, :, head].to(z.device)
                return out

            logits = model.run_with_hooks(tokens, fwd_hooks=[(hooks.act_name("z", layer), hook)])
            effects[layer, head] = (mean_loss(logits) - clean).cpu()
    return effects
