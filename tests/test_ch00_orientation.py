"""Chapter 00 (orientation): `interplab.prompts`, the helpers that build batches of TinyWorld text in any model's tokens."""

from __future__ import annotations

import pytest
import torch

from interplab import prompts as P
from interplab import tinyworld


@pytest.fixture(scope="module")
def standin():
    """A small random model of GPT-2's architecture with a byte-level BPE tokenizer (the gpt2-small route)."""
    from interplab.standin import standin_model

    return standin_model("gpt2-small", device="cpu")


def _ioi_docs():
    return [d for d in tinyworld.generate(400, seed=7, split="test", families=["ioi"]) if d.meta["template"] == 0]


def test_same_length_rows_keeps_the_most_common_length_in_order():
    lengths = torch.tensor([5, 7, 7, 5, 7, 9])
    assert P.same_length_rows(lengths).tolist() == [1, 2, 4]
    assert P.same_length_rows(lengths, limit=2).tolist() == [1, 2]
    assert P.same_length_rows(torch.tensor([4, 3, 4, 3])).tolist() == [1, 3]  # a tie: the shorter length
    assert P.same_length_rows(torch.tensor([6, 6, 6])).tolist() == [0, 1, 2]
    assert P.same_length_rows(torch.zeros(0, dtype=torch.long)).tolist() == []


def test_ioi_batch_on_tinyworld_is_the_word_level_batch(model):
    """One token per word: every document is kept, and the ids are TinyWorld's own."""
    docs = _ioi_docs()
    prompts, io, s, kept = P.ioi_batch(model, docs, n=32)
    assert kept == list(range(32))
    expected = torch.stack(
        [torch.tensor(tinyworld.encode(d.tokens[: d.meta["answer_position"] + 1])) for d in docs[:32]]
    )
    assert torch.equal(prompts.cpu(), expected)
    assert io.tolist() == [tinyworld.token_id(d.meta["IO"]) for d in docs[:32]]
    assert s.tolist() == [tinyworld.token_id(d.meta["S"]) for d in docs[:32]]


def test_ioi_batch_with_a_subword_tokenizer(standin):
    """Prompts end at " to", stack without padding, and the names are the single tokens " IO" and " S"."""
    docs = _ioi_docs()
    prompts, io, s, kept = P.ioi_batch(standin, docs, n=32)
    tok = standin.tokenizer
    assert 0 < len(kept) <= 32 and prompts.shape[0] == len(kept) == len(io) == len(s)
    assert (prompts != tok.pad_token_id)[:, 1:].all(), "no padding inside a prompt"
    for row, i in enumerate(kept):
        d = docs[i]
        assert tok.decode(prompts[row, 1:].tolist()) == " ".join(d.tokens[1 : d.meta["answer_position"] + 1])
        assert tok.decode([int(io[row])]) == " " + d.meta["IO"]
        assert tok.decode([int(s[row])]) == " " + d.meta["S"]


def test_ioi_batch_explains_when_no_document_fits(model):
    docs = tinyworld.generate(20, seed=8, split="test", families=["ioi"])
    for d in docs:  # an IO that is not where the prompt says: no document qualifies
        d.meta = {**d.meta, "IO": "nobody"}
    with pytest.raises(ValueError, match="single tokens"):
        P.ioi_batch(model, docs)
