"""Batches of TinyWorld prompts in any model's tokens, stacked without padding.

A subword tokenizer (GPT-2's) turns documents of the same number of words into different
numbers of tokens. The helpers here keep the rows of one token length, so that a loss
averaged over every position, or a prediction read at position -1, means the same for
every row, whichever model reads them (chapter 00 builds its batches with them). `induction_batch`
also marks the tokens of the repeated half, where an induction circuit can predict.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from .tinyworld import tokens_for


def same_length_rows(lengths: Int[Tensor, " n"], limit: int | None = None) -> Int[Tensor, " k"]:
    """Indices, in order, of the rows whose length is the most common one (at most `limit` of them).

    Rows of one length stack into a batch with no padding. With one token per word every
    row is kept. Among equally common lengths the shortest wins.
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

    Raises:
        ValueError: no document has an IO and an S that are single tokens for this model.
    """
    mt = tokens_for(model, docs)
    candidates, lengths, io_ids, s_ids = [], [], [], []
    for i, d in enumerate(docs):
        answer = d.meta["answer_position"]  # the last word of the prompt; the IO follows it
        io_word = answer + 1
        s_word = max(j for j in range(answer) if d.tokens[j] == d.meta["S"])
        if d.tokens[io_word] != d.meta["IO"] or any(
            int(mt.first[i, w]) != int(mt.last[i, w]) for w in (io_word, s_word)
        ):
            continue
        candidates.append(i)
        lengths.append(int(mt.last[i, answer]) + 1)
        io_ids.append(int(mt.ids[i, mt.first[i, io_word]]))
        s_ids.append(int(mt.ids[i, mt.first[i, s_word]]))
    if not candidates:
        raise ValueError(
            "no document has an IO and an S that are single tokens for this model; pass indirect-object "
            "documents (tinyworld.generate(..., families=['ioi'])) whose names this tokenizer keeps whole"
        )
    rows = same_length_rows(torch.tensor(lengths), n).tolist()
    kept = [candidates[r] for r in rows]
    width = lengths[rows[0]]
    device = model.cfg.device
    prompts = mt.ids[kept, :width].to(device)
    return (
        prompts,
        torch.tensor([io_ids[r] for r in rows], device=device),
        torch.tensor([s_ids[r] for r in rows], device=device),
        kept,
    )


def induction_batch(model, docs, n: int = 32) -> tuple[Int[Tensor, "k pos"], Bool[Tensor, "k pos"], list[int]]:
    """Repeated sequences as `model`'s tokens, with a mask of the tokens in their second copy.

    A TinyWorld induction document is random words followed by the same words again
    (`meta["repeat_start"]` is the word where the copy begins). Keeps the documents of the
    most common token length (see `same_length_rows`), at most n, so the batch has no padding.

    Returns:
        (tokens [k, pos] on the model's device; repeated [k, pos], True on every token of the
        second copy, the tokens an induction circuit can predict, on the same device; the
        indices in `docs` of the k documents used).

    Raises:
        ValueError: a document is not an induction document (no `repeat_start`), or there are none.
    """
    if not docs or any("repeat_start" not in d.meta for d in docs):
        raise ValueError(
            "pass induction documents: tinyworld.generate(..., families=['induction']) (each has meta['repeat_start'])"
        )
    mt = tokens_for(model, docs)
    rows = same_length_rows(mt.mask.sum(1), n).tolist()
    width = int(mt.mask[rows[0]].sum())
    starts = torch.tensor([int(mt.first[r, docs[r].meta["repeat_start"]]) for r in rows])
    repeated = torch.arange(width)[None, :] >= starts[:, None]
    device = model.cfg.device
    return mt.ids[rows, :width].to(device), repeated.to(device), rows
