"""A seeded generator of TinyWorld documents, with per-token annotations.

A document is one short text of one task family, starting with ``<bos>``. Every token
carries the generator's ground truth, so a probe, an SAE feature or a transcoder
feature can be scored against what is really there:

>>> from interplab import tinyworld
>>> doc = tinyworld.generate(1, seed=0, families=["rooms"])[0]
>>> doc.text                                    # doctest: +SKIP
'<bos> Alice kitchen . Bob hall . then Alice attic . where is Alice attic .'
>>> doc.rooms[-3]                               # doctest: +SKIP
{'Alice': 'attic', 'Bob': 'hall'}

Families (``FAMILIES``):

- ``ioi``: indirect-object sentences ("... , Bob gave a ball to" -> Alice).
- ``induction``: a random sequence of words, then the same sequence again.
- ``facts``: statements and questions about the cast's home city, job and pet.
- ``rooms``: a log of people moving between rooms ("Alice kitchen . then Alice attic ."),
  with questions "where is X" answered by X's room.
- ``reviews``: short reviews with (possibly negated) adjectives and an overall label.
- ``truth``: a claim about the cast, then whether it is true or false.

``split="train"`` never produces held-out names in indirect-object sentences,
held-out (template, name) combinations or held-out fact questions.
``split="test"`` has the same distribution as "train" from an independent random
stream: new documents of the kinds the model was trained on.
``split="heldout"`` draws only what training never saw, where a family has
held-out material: indirect-object sentences with held-out names (``meta["heldout"]
== "names"``) or held-out template/name combinations (``"combo"``), and fact
questions never asked in training. Other families fall back to "test".
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from . import language as L

FAMILIES = ["ioi", "induction", "facts", "rooms", "reviews", "truth"]
# How often each family appears in training text.
TRAIN_MIX = {"ioi": 0.25, "induction": 0.13, "facts": 0.2, "rooms": 0.22, "reviews": 0.1, "truth": 0.1}
SPLITS = ("train", "test", "heldout")


@dataclass
class Doc:
    """One document and its ground truth, one entry per token.

    Attributes:
        family: the task family (one of ``FAMILIES``).
        tokens: the words, starting with ``<bos>``.
        entity: index into ``NAMES`` of the person a token names, else -1.
        sentiment: +1 / -1 for every token of a positive / negative review, else 0.
        truth: 1 / 0 for every token of a true / false claim from "claim" on, else -1.
        rooms: for ``rooms`` documents, each person's room as stated so far, else ``{}``.
        answer: the next token when the task determines it (an "answer position"), else None.
        meta: family-specific facts about the whole document (names, template, ...).
    """

    family: str
    tokens: list[str] = field(default_factory=lambda: [L.BOS])
    entity: list[int] = field(default_factory=lambda: [-1])
    sentiment: list[int] = field(default_factory=lambda: [0])
    truth: list[int] = field(default_factory=lambda: [-1])
    rooms: list[dict[str, str]] = field(default_factory=lambda: [{}])
    answer: list[str | None] = field(default_factory=lambda: [None])
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def text(self) -> str:
        return " ".join(self.tokens)

    @property
    def answer_positions(self) -> list[int]:
        """Positions whose next token is determined by the task."""
        return [i for i, a in enumerate(self.answer) if a is not None]

    def add(
        self, words: str | Iterable[str], *, sentiment: int = 0, truth: int = -1, answer_first: bool = False
    ) -> None:
        """Append words. With ``answer_first`` the token before them becomes an answer position."""
        words = words.split() if isinstance(words, str) else list(words)
        for j, w in enumerate(words):
            if j == 0 and answer_first:
                self.answer[-1] = w
            self.tokens.append(w)
            self.entity.append(L.NAMES.index(w) if w in L.NAMES else -1)
            self.sentiment.append(sentiment)
            self.truth.append(truth)
            self.rooms.append(dict(self.rooms[-1]))
            self.answer.append(None)


def _ioi(rng: random.Random, split: str) -> Doc:
    mode = None
    if split == "heldout":
        mode = rng.choice(["names", "combo"])
    names = L.HELDOUT_IOI_NAMES if mode == "names" else L.IOI_TRAIN_NAMES
    while True:
        t = rng.randrange(len(L.IOI_TEMPLATES))
        a, b = rng.sample(names, 2)
        s_first = rng.random() < 0.5  # ABBA (S = B) or BABA (S = A)
        subject, io = (a, b) if s_first else (b, a)
        held = L.ioi_combo_heldout(t, io)
        if held != (mode == "combo"):
            continue
        break
    prompt = L.IOI_TEMPLATES[t].format(A=a, B=b, S=subject, place=rng.choice(L.PLACES), obj=rng.choice(L.OBJECTS))
    doc = Doc(
        "ioi",
        meta={
            "template": t,
            "A": a,
            "B": b,
            "S": subject,
            "IO": io,
            "order": "BABA" if s_first else "ABBA",
            "heldout": mode,
        },
    )
    doc.add(prompt)
    doc.meta["answer_position"] = len(doc) - 1
    doc.add(f"{io} .", answer_first=True)
    return doc


def _induction(rng: random.Random, split: str) -> Doc:
    length = rng.randint(6, 20)
    seq = rng.sample(L.induction_pool(), length)
    doc = Doc("induction", meta={"length": length, "sequence": seq})
    doc.add(seq)
    doc.add(seq[0])
    for w in seq[1:]:
        doc.add(w, answer_first=True)
    doc.meta["repeat_start"] = 1 + length
    return doc


def _fact_sentence(doc: Doc, person: str, relation: str, question: bool) -> None:
    statement, query, _ = L.RELATIONS[relation]
    value = L.WORLD.value(person, relation)
    template = query if question else statement
    before, after = template.split("{V}")
    doc.add(before.format(P=person))
    doc.add([value] + after.split(), answer_first=True)


def _facts(rng: random.Random, split: str) -> Doc:
    doc = Doc("facts", meta={"facts": []})
    for _ in range(rng.randint(2, 5)):
        while True:
            person, relation = rng.choice(L.CAST), rng.choice(list(L.RELATIONS))
            question = rng.random() < 0.5
            held = (person, relation) in L.WORLD.heldout_queries
            if split in ("train", "test") and held and question:
                continue
            if split == "heldout" and not (held and question):
                continue
            break
        doc.meta["facts"].append((person, relation, "question" if question else "statement"))
        _fact_sentence(doc, person, relation, question)
    return doc


def _rooms(rng: random.Random, split: str) -> Doc:
    # One to three people (one in four documents has a single person: the easy case that
    # teaches a small model to copy a room at all); questions come at the end and, half
    # the time, also right after a log line.
    people = rng.sample(L.NAMES, 1 if rng.random() < 0.25 else rng.randint(2, 3))
    doc = Doc("rooms", meta={"people": people, "questions": []})
    where: dict[str, str] = {}

    def place(person: str, template: str, room: str) -> None:
        before, after = template.split("{R}")
        doc.add(before.format(P=person))
        where[person] = room
        doc.add([room] + after.split())
        doc.rooms[-2] = dict(where)  # the state changes at the room token
        doc.rooms[-1] = dict(where)

    def ask(person: str) -> None:
        doc.meta["questions"].append((person, where[person]))
        before, after = L.ROOM_QUESTION.split("{R}")
        doc.add(before.format(P=person))
        doc.add([where[person]] + after.split(), answer_first=True)

    for p in people:
        place(p, L.ROOM_INTRO, rng.choice(L.ROOMS))
        if rng.random() < 0.5:
            ask(rng.choice(list(where)))
    for _ in range(rng.randint(1, 5)):
        p = rng.choice(people)
        place(p, rng.choice(L.ROOM_MOVES), rng.choice([r for r in L.ROOMS if r != where[p]]))
        if rng.random() < 0.5:
            ask(rng.choice(people))
    for p in rng.sample(people, rng.randint(1, len(people))):
        ask(p)
    return doc


def _reviews(rng: random.Random, split: str) -> Doc:
    label = rng.choice([1, -1])
    doc = Doc("reviews", meta={"sentiment": label, "negated": []})
    doc.add("review :", sentiment=label)
    for aspect in rng.sample(L.ASPECTS, rng.randint(1, 3)):
        negate = rng.random() < 0.4
        polarity = -label if negate else label
        adj = rng.choice(L.POSITIVE_ADJ if polarity > 0 else L.NEGATIVE_ADJ)
        doc.meta["negated"].append(negate)
        doc.add(L.REVIEW_SENTENCE.format(aspect=aspect, neg="not " if negate else "", adj=adj), sentiment=label)
    doc.add("overall :", sentiment=label)
    doc.add(f"{L.SENTIMENT_WORDS[label]} .", sentiment=label, answer_first=True)
    return doc


def _truth(rng: random.Random, split: str) -> Doc:
    person, relation = rng.choice(L.CAST), rng.choice(list(L.RELATIONS))
    statement, _, values = L.RELATIONS[relation]
    true_value = L.WORLD.value(person, relation)
    is_true = rng.random() < 0.5
    value = true_value if is_true else rng.choice([v for v in values if v != true_value])
    doc = Doc("truth", meta={"person": person, "relation": relation, "value": value, "truth": int(is_true)})
    doc.add("claim :", truth=int(is_true))
    doc.add(statement.format(P=person, V=value), truth=int(is_true))
    doc.add("this is", truth=int(is_true))
    doc.add(f"{L.TRUTH_WORDS[int(is_true)]} .", truth=int(is_true), answer_first=True)
    return doc


GENERATORS: dict[str, Callable[[random.Random, str], Doc]] = {
    "ioi": _ioi,
    "induction": _induction,
    "facts": _facts,
    "rooms": _rooms,
    "reviews": _reviews,
    "truth": _truth,
}


def generate(
    n: int,
    seed: int = 0,
    split: str = "train",
    families: Sequence[str] | None = None,
    mix: dict[str, float] | None = None,
) -> list[Doc]:
    """Generate ``n`` documents, deterministically for a given seed.

    Args:
        n: number of documents.
        seed: random seed; the same seed always gives the same documents.
        split: "train", "test" or "heldout" (see the module docstring).
        families: families to draw from (uniformly); default: the training mix.
        mix: {family: weight} to draw from instead (used by the trainer's second phase).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    unknown = [f for f in (families or []) if f not in GENERATORS]
    if unknown:
        raise ValueError(f"unknown families {unknown}; TinyWorld has {FAMILIES}")
    rng = random.Random(f"tinyworld-{split}-{seed}")
    if families:
        names, weights = list(families), [1.0] * len(families)
    elif mix:
        names, weights = list(mix), list(mix.values())
    else:
        names, weights = list(TRAIN_MIX), list(TRAIN_MIX.values())
    return [GENERATORS[rng.choices(names, weights)[0]](rng, split) for _ in range(n)]
