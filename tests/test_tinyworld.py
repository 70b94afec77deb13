"""The TinyWorld language: determinism, vocabulary, annotations and held-out splits."""

from collections import Counter

import pytest

from interplab import tinyworld
from interplab.tinyworld import language as L
from interplab.weights import WEIGHTS_DIR


def test_generation_is_deterministic_and_seed_dependent():
    a = [d.text for d in tinyworld.generate(50, seed=3)]
    assert a == [d.text for d in tinyworld.generate(50, seed=3)]
    assert a != [d.text for d in tinyworld.generate(50, seed=4)]


def test_every_token_is_in_the_vocabulary_and_annotations_align():
    vocab = set(tinyworld.vocabulary())
    docs = tinyworld.generate(2000, seed=1) + tinyworld.generate(500, seed=1, split="heldout")
    for d in docs:
        assert d.tokens[0] == L.BOS
        assert set(d.tokens) <= vocab, set(d.tokens) - vocab
        n = len(d)
        assert len(d.entity) == len(d.sentiment) == len(d.truth) == len(d.rooms) == len(d.answer) == n
        for pos in d.answer_positions:
            assert d.tokens[pos + 1] == d.answer[pos]
    assert max(len(d) for d in docs) <= 128
    assert set(Counter(d.family for d in docs)) == set(tinyworld.FAMILIES)


def test_vocabulary_has_no_duplicates_and_enough_names():
    v = tinyworld.vocabulary()
    assert len(v) == len(set(v))
    assert len(L.NAMES) >= 40 and len(L.CAST) >= 40 and len(L.ROOMS) >= 6
    assert len(L.RELATIONS) >= 3


def test_ioi_answer_is_the_name_that_appears_once():
    for d in tinyworld.generate(300, seed=2, families=["ioi"]):
        io, s = d.meta["IO"], d.meta["S"]
        prompt = d.tokens[: d.meta["answer_position"] + 1]
        assert prompt.count(io) == 1 and prompt.count(s) == 2
        assert d.answer[d.meta["answer_position"]] == io


def test_room_annotations_track_the_world_state():
    for d in tinyworld.generate(300, seed=5, families=["rooms"]):
        for pos in d.answer_positions:
            person = d.tokens[pos]  # "where is X" -> room
            assert d.tokens[pos - 2 : pos] == ["where", "is"]
            assert d.rooms[pos][person] == d.answer[pos]


def test_review_and_truth_labels():
    for d in tinyworld.generate(200, seed=6, families=["reviews", "truth"]):
        pos = d.answer_positions[-1]
        if d.family == "reviews":
            assert d.answer[pos] == L.SENTIMENT_WORDS[d.meta["sentiment"]]
            assert set(d.sentiment[1:]) == {d.meta["sentiment"]}
        else:
            assert (d.meta["value"] == L.WORLD.value(d.meta["person"], d.meta["relation"])) == bool(d.meta["truth"])


def test_training_split_never_shows_held_out_material():
    for d in tinyworld.generate(5000, seed=7, split="train"):
        if d.family == "ioi":
            assert d.meta["A"] not in L.HELDOUT_IOI_NAMES and d.meta["B"] not in L.HELDOUT_IOI_NAMES
            assert not L.ioi_combo_heldout(d.meta["template"], d.meta["IO"])
        if d.family == "facts":
            for person, rel, form in d.meta["facts"]:
                assert not (form == "question" and (person, rel) in L.WORLD.heldout_queries)


def test_heldout_split_only_has_held_out_material():
    for d in tinyworld.generate(500, seed=8, split="heldout", families=["ioi", "facts"]):
        if d.family == "ioi":
            if d.meta["heldout"] == "names":
                assert {d.meta["A"], d.meta["B"]} <= set(L.HELDOUT_IOI_NAMES)
            else:
                assert L.ioi_combo_heldout(d.meta["template"], d.meta["IO"])
        else:
            assert all(f == "question" and (p, r) in L.WORLD.heldout_queries for p, r, f in d.meta["facts"])


def test_bad_arguments_say_what_is_wrong():
    with pytest.raises(ValueError, match="split must be one of"):
        tinyworld.generate(1, split="validation")
    with pytest.raises(ValueError, match="unknown families"):
        tinyworld.generate(1, families=["poetry"])
    with pytest.raises(KeyError, match="not a TinyWorld word"):
        tinyworld.token_id("banana")
    with pytest.raises(KeyError, match="not in the TinyWorld cast"):
        L.WORLD.value("Gandalf", "city")


def test_tokenizer_round_trip_and_bundled_tokenizer_matches_the_language():
    tok = tinyworld.hf_tokenizer(WEIGHTS_DIR / "tinyworld")
    d = tinyworld.generate(1, seed=0, families=["rooms"])[0]
    text = " ".join(d.tokens[1:])
    ids = tok.encode(text)
    assert ids == tinyworld.encode(d.tokens)  # <bos> is prepended by the tokenizer
    assert tok.decode(ids[1:]) == text
    assert tok.get_vocab() == {w: i for i, w in enumerate(tinyworld.vocabulary())}
