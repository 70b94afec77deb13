"""Chapter 00 (orientation): reference solutions of the warm-up exercises."""

from __future__ import annotations

import torch
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


# === helpers used by the notebook (not graded) ========================================================


def same_length_rows(lengths: Int[Tensor, " n"], limit: int | None = None) -> Int[Tensor, " k"]:
    """Indices, in order, of the rows whose length is the most common one (at most `limit` of them).

    A subword tokenizer (GPT-2's) turns documents of the same number of words into
    different numbers of tokens. Rows of one length stack into a batch with no padding,
    so that a loss averaged over every position, or a prediction read at position -1,
    means the same for every row. With one token per word every row is kept. Among
    equally common lengths the shortest wins.
    """
    lengths = torch.as_tensor(lengths).cpu()
    if len(lengths) == 0:
        return torch.zeros(0, dtype=torch.long)
    modal = int(torch.bincount(lengths).argmax())
    return (lengths == modal).nonzero()[:limit, 0]


def ioi_batch(model, docs, n: int = 32) -> tuple[Int[Tensor, "k pos"], Int[Tensor, " k"], Int[Tensor, " k"], list[int]]:
    """Indirect-object prompts, cut right before the answer, as `model`'s tokens, with the ids of the two names.

    Works with any tokenizer, through `interplab.tinyworld.tokens_for`. Keeps the documents
    whose indirect object (IO, the answer) and subject (S, its second mention) are one
    token each for this model, so that a name's logit stands for the whole name; then
    those of the most common prompt length (see `same_length_rows`), so that the answer
    is predicted at the last position of every row; at most n of them. Both names are
    taken as they appear mid-sentence (after a space), as the answer would.

    Returns:
        (prompts [k, pos] on the model's device, io_ids [k], s_ids [k] on the same device,
        the indices in `docs` of the k documents used).
    """
    from interplab.tinyworld import tokens_for

    mt = tokens_for(model, docs)
    candidates, lengths, io_ids, s_ids = [], [], [], []
    for i, d in enumerate(docs):
        answer = d.meta["answer_position"]  # the last word of the prompt; the IO follows it
        io_word = answer + 1
        s_word = max(j for j in range(answer) if d.tokens[j] == d.meta["S"])
        if d.tokens[io_word] != d.meta["IO"] or any(int(mt.first[i, w]) != int(mt.last[i, w]) for w in (io_word, s_word)):
            continue
        candidates.append(i)
        lengths.append(int(mt.last[i, answer]) + 1)
        io_ids.append(int(mt.ids[i, mt.first[i, io_word]]))
        s_ids.append(int(mt.ids[i, mt.first[i, s_word]]))
    if not candidates:
        raise ValueError("no document has an IO and an S that are single tokens for this model")
    rows = same_length_rows(torch.tensor(lengths), n).tolist()
    kept = [candidates[r] for r in rows]
    width = lengths[rows[0]]
    device = model.cfg.device
    prompts = mt.ids[kept, :width].to(device)
    return (prompts, torch.tensor([io_ids[r] for r in rows], device=device),
            torch.tensor([s_ids[r] for r in rows], device=device), kept)
