"""Chapter 00 (orientation): reference solutions of the warm-up exercises."""

from __future__ import annotations

from jaxtyping import Float, Int
from torch import Tensor


def per_token_loss(logits: Float[Tensor, "batch pos vocab"], tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos-1"]:
    """Cross-entropy of each next-token prediction.

    The logits at position p predict the token at position p + 1, so the last position
    has nothing to predict and the first token is never predicted.

    Args:
        logits: the model's output logits.
        tokens: the input token ids.

    Returns:
        loss[b, p] = -log softmax(logits[b, p])[tokens[b, p + 1]].
    """
    log_probs = logits.log_softmax(dim=-1)[:, :-1]
    return -log_probs.gather(dim=-1, index=tokens[:, 1:, None])[..., 0]


def answer_logit_diff(
    logits: Float[Tensor, "batch pos vocab"],
    answer_ids: Int[Tensor, " batch"],
    wrong_ids: Int[Tensor, " batch"],
) -> Float[Tensor, " batch"]:
    """Logit of the right answer minus logit of the wrong one, at the final position.

    Args:
        logits: the model's output logits; the answer is predicted at the last position.
        answer_ids: the correct next token of each prompt.
        wrong_ids: the competing wrong token of each prompt.

    Returns:
        logits[b, -1, answer_ids[b]] - logits[b, -1, wrong_ids[b]] for each prompt b.
    """
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
        For each head, the mean of pattern[h, q, q - 1] over query positions q = 1 .. n-1
        (position 0 has no previous token).
    """
    return pattern.diagonal(offset=-1, dim1=-2, dim2=-1).mean(dim=-1)


def ablate_head(z: Float[Tensor, "batch pos head d_head"], head: int) -> Float[Tensor, "batch pos head d_head"]:
    """Zero one head's output (TransformerLens's `hook_z`), leaving the input unchanged.

    Args:
        z: the per-head attention outputs of one layer (before W_O).
        head: which head to zero.

    Returns:
        A copy of z with z[:, :, head, :] set to zero.
    """
    out = z.clone()
    out[:, :, head, :] = 0.0
    return out


def head_ablation_loss(model, tokens: Int[Tensor, "batch pos"], layer: int, head: int) -> float:
    """Mean next-token loss of the model when one attention head's output is zeroed.

    Use a hook on `blocks.{layer}.attn.hook_z` that zeroes the head, run with
    `model.run_with_hooks` (which removes the hook afterwards), and average the
    per-token loss over all positions and prompts.

    Args:
        model: a HookedTransformer.
        tokens: input token ids.
        layer: the layer of the head.
        head: the head to zero.

    Returns:
        The mean per-token cross-entropy loss, as a Python float.
    """

    def hook(z, hook):
        return ablate_head(z, head)

    logits = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", hook)])
    return per_token_loss(logits, tokens).mean().item()
