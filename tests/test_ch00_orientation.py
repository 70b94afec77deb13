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


def _induction_docs():
    return [d for d in tinyworld.generate(400, seed=12, families=["induction"]) if d.meta["length"] == 12]


def test_induction_batch_on_tinyworld_marks_the_second_copy(model):
    docs = _induction_docs()
    tokens, repeated, kept = P.induction_batch(model, docs, n=32)
    assert tokens.shape == repeated.shape and len(kept) == tokens.shape[0] <= 32
    for row, i in enumerate(kept):
        start = docs[i].meta["repeat_start"]
        assert repeated[row].tolist() == [t >= start for t in range(tokens.shape[1])]
        assert tokens[row, start:].tolist() == tokens[row, 1:start].tolist()  # the second copy repeats the first


def test_induction_batch_with_a_subword_tokenizer(standin):
    """The mask starts at the first token of the second copy's first word, whatever the word's length."""
    docs = _induction_docs()
    tokens, repeated, kept = P.induction_batch(standin, docs, n=8)
    tok = standin.tokenizer
    assert (tokens != tok.pad_token_id)[:, 1:].all(), "no padding inside a sequence"
    for row, i in enumerate(kept):
        second = tokens[row][repeated[row]].tolist()
        assert tok.decode(second) == " " + " ".join(docs[i].meta["sequence"])


def test_induction_batch_refuses_other_documents(model):
    with pytest.raises(ValueError, match="induction documents"):
        P.induction_batch(model, tinyworld.generate(4, seed=1, families=["ioi"]))


# --- what the chapter finds on the bundled model (a retrained model that changes these fails here) ---


@pytest.fixture(scope="module")
def ablations(model):
    """The chapter's head-ablation experiment: four ways of removing each head, measured on the repeated half."""
    from interplab.grading import reference
    from interplab.hooks import act_name

    effects = reference("head_ablation_effects")
    tokens, repeated, _ = P.induction_batch(model, _induction_docs(), n=32)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("attn.hook_z"))
        z = torch.stack([cache[act_name("z", layer)] for layer in range(model.cfg.n_layers)])
        out = {
            "zero": effects(model, tokens, repeated),
            "zero, every prediction": effects(model, tokens, None),
            "mean (all positions)": effects(model, tokens, repeated, z.mean(dim=(1, 2), keepdim=True)),
            "mean (per position)": effects(model, tokens, repeated, z.mean(dim=1, keepdim=True)),
            "resample": effects(model, tokens, repeated, z.roll(1, dims=1)),
        }
    return {k: (v.mean(-1), v.std(-1) / v.shape[-1] ** 0.5) for k, v in out.items()}


def test_three_layer_0_heads_carry_induction_whatever_the_ablation(ablations):
    layer0 = [(0, 1), (0, 2), (0, 3)]
    for method in ["zero", "mean (per position)", "resample"]:
        mean, se = ablations[method]
        for lh in layer0:
            assert mean[lh] > 1.5 and mean[lh] > 5 * se[lh], (method, lh, float(mean[lh]), float(se[lh]))
        others = [
            (layer, h) for layer in range(mean.shape[0]) for h in range(mean.shape[1]) if (layer, h) not in layer0
        ]
        assert max(float(mean[lh]) for lh in others) < 0.5, (method, mean)


def test_averaging_over_the_random_half_dilutes_the_effects(ablations):
    """About half the predictions are in the random half, where no head helps: the effect there halves."""
    rep, _ = ablations["zero"]
    every, _ = ablations["zero, every prediction"]
    for lh in [(0, 1), (0, 2), (0, 3)]:
        assert 0.4 < float(every[lh] / rep[lh]) < 0.6, (lh, float(every[lh]), float(rep[lh]))


def test_a_position_averaged_mean_makes_l3h0_look_important(ablations):
    """L3H0 is not needed (zero and per-position mean cost nothing) but its all-position mean is off-distribution."""
    mean_all, se_all = ablations["mean (all positions)"]
    assert mean_all[3, 0] > 1.0 and mean_all[3, 0] > 10 * se_all[3, 0]
    for method in ["zero", "mean (per position)"]:
        assert abs(float(ablations[method][0][3, 0])) < 0.2, method


def test_resampling_l0h3_hurts_more_than_zeroing_it(ablations):
    (zero, zse), (res, rse) = ablations["zero"], ablations["resample"]
    assert res[0, 3] - zero[0, 3] > 3 * (zse[0, 3] ** 2 + rse[0, 3] ** 2) ** 0.5
