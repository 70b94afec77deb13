"""The closed vocabulary and the fixed world of TinyWorld.

Everything here is a constant: the words of the language, the cast of people with
their facts, and which names, template/name combinations and fact queries are held
out of training. Changing anything here changes the language, so the bundled model
would have to be retrained (`python -m interplab.tinyworld.train`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

PAD, BOS, UNK = "<pad>", "<bos>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, UNK]
PUNCTUATION = [".", ",", "?", ":"]

# 56 one-token names. The first 40 form the cast (people with facts); the last 8
# never appear in indirect-object sentences during training (held-out names).
NAMES = [
    "Alice",
    "Bob",
    "Carol",
    "Dave",
    "Eve",
    "Frank",
    "Grace",
    "Heidi",
    "Ivan",
    "Judy",
    "Karl",
    "Liam",
    "Mia",
    "Nina",
    "Oscar",
    "Paul",
    "Quinn",
    "Rose",
    "Sam",
    "Tina",
    "Uma",
    "Victor",
    "Wendy",
    "Xena",
    "Yara",
    "Zack",
    "Anna",
    "Ben",
    "Clara",
    "Dan",
    "Ella",
    "Finn",
    "Gina",
    "Hugo",
    "Iris",
    "Jack",
    "Kate",
    "Leo",
    "Lucy",
    "Max",
    "Nora",
    "Owen",
    "Pia",
    "Ray",
    "Sara",
    "Tom",
    "Vera",
    "Will",
    "Zoe",
    "Adam",
    "Beth",
    "Carl",
    "Dora",
    "Emil",
    "Fay",
    "Gus",
]
CAST = NAMES[:40]
HELDOUT_IOI_NAMES = NAMES[48:]
IOI_TRAIN_NAMES = NAMES[:48]

CITIES = ["Paris", "Rome", "Berlin", "Madrid", "Tokyo", "Cairo", "Lima", "Oslo", "Delhi", "Sydney"]
JOBS = ["doctor", "teacher", "baker", "farmer", "pilot", "painter", "lawyer", "nurse", "chef", "singer"]
PETS = ["cat", "dog", "parrot", "rabbit", "horse", "turtle", "goat", "hamster"]
ROOMS = ["kitchen", "garden", "hall", "bedroom", "library", "attic", "cellar", "office"]

PLACES = ["store", "park", "school", "beach", "market", "cafe", "zoo", "museum"]
OBJECTS = ["ball", "book", "drink", "gift", "letter", "key", "apple", "flower"]

ASPECTS = ["food", "staff", "service", "music", "price", "view", "coffee", "bed"]
POSITIVE_ADJ = ["good", "great", "tasty", "friendly", "clean", "lovely", "nice", "fresh"]
NEGATIVE_ADJ = ["bad", "awful", "bland", "rude", "dirty", "terrible", "poor", "stale"]
SENTIMENT_WORDS = {1: "positive", -1: "negative"}
TRUTH_WORDS = {1: "true", 0: "false"}

# Indirect-object templates: {A} and {B} are introduced, {S} (one of them) does
# something, and the sentence ends with "to", after which the other name (the
# indirect object) follows.
IOI_TEMPLATES = [
    "when {A} and {B} went to the {place} , {S} gave a {obj} to",
    "after {A} and {B} arrived at the {place} , {S} handed a {obj} to",
    "{A} and {B} were at the {place} . {S} passed a {obj} to",
    "while {A} and {B} were walking to the {place} , {S} showed a {obj} to",
    "then {A} and {B} had a long day at the {place} . {S} gave a {obj} to",
    "{A} and {B} met at the {place} , and {S} sent a {obj} to",
    "at the {place} , {A} and {B} talked . later {S} threw a {obj} to",
    "yesterday {A} and {B} visited the {place} . {S} brought a {obj} to",
    "when {A} met {B} at the {place} , {S} offered a {obj} to",
    "{A} and {B} walked into the {place} . then {S} lent a {obj} to",
    "because {A} and {B} liked the {place} , {S} sold a {obj} to",
    "once {A} and {B} left the {place} , {S} tossed a {obj} to",
]

# Fact relations: statement template, question template and the value list.
RELATIONS = {
    "city": ("{P} lives in {V} .", "where does {P} live ? {V} .", CITIES),
    "job": ("{P} works as a {V} .", "what is the job of {P} ? {V} .", JOBS),
    "pet": ("{P} has a pet {V} .", "which pet does {P} have ? {V} .", PETS),
}

# The rooms family is a terse log: a name, then the room that person is now in. The
# question ends with the name, so the answer slot follows the name exactly as in the log
# lines (see MODEL_CARD.md, "How the rooms family got its shape", for why).
ROOM_INTRO = "{P} {R} ."
ROOM_MOVES = ["then {P} {R} .", "later {P} {R} ."]
ROOM_QUESTION = "where is {P} {R} ."

REVIEW_SENTENCE = "the {aspect} was {neg}{adj} ."
REVIEW_END = "overall : {label} ."

TRUTH_TEMPLATE = "claim : {statement} this is {label} ."

_GRAMMAR = (
    "when and went to the gave a after arrived at handed were passed while walking showed "
    "then had long day met sent talked later threw yesterday visited brought offered lent "
    "walked into because liked sold once left tossed lives in works as has pet where does "
    "live what is job of which have goes walks runs review was not overall claim this"
).split()

WORLD_SEED = 1234


@dataclass(frozen=True)
class World:
    """The fixed facts of TinyWorld: each cast member's home city, job and pet."""

    facts: dict[str, dict[str, str]]
    heldout_queries: frozenset[tuple[str, str]]

    def value(self, person: str, relation: str) -> str:
        """The true value of `relation` ("city", "job" or "pet") for `person`."""
        if person not in self.facts:
            raise KeyError(f"{person!r} is not in the TinyWorld cast; the cast is interplab.tinyworld.CAST")
        if relation not in RELATIONS:
            raise KeyError(f"unknown relation {relation!r}; choose one of {sorted(RELATIONS)}")
        return self.facts[person][relation]


def build_world(seed: int = WORLD_SEED) -> World:
    """Draw the cast's facts. Deterministic for a seed; the bundled model knows seed 1234."""
    rng = random.Random(seed)
    facts = {person: {rel: rng.choice(values) for rel, (_, _, values) in RELATIONS.items()} for person in CAST}
    pairs = [(p, r) for p in CAST for r in RELATIONS]
    rng.shuffle(pairs)
    heldout = frozenset(pairs[: len(pairs) // 10])  # 12 questions never asked in training
    return World(facts=facts, heldout_queries=heldout)


WORLD = build_world()


def ioi_combo_heldout(template: int, io_name: str) -> bool:
    """Whether a (template, indirect-object name) pair is held out of training."""
    return (template * 7 + NAMES.index(io_name)) % 9 == 4


def induction_pool() -> list[str]:
    """Words that random sequences for induction are drawn from (names included)."""
    words = NAMES + CITIES + JOBS + PETS + ROOMS + PLACES + OBJECTS + ASPECTS + POSITIVE_ADJ + NEGATIVE_ADJ
    return list(dict.fromkeys(words))


def vocabulary() -> list[str]:
    """Every token of the language, specials first, in a fixed order."""
    words = (
        SPECIAL_TOKENS
        + PUNCTUATION
        + _GRAMMAR
        + NAMES
        + CITIES
        + JOBS
        + PETS
        + ROOMS
        + PLACES
        + OBJECTS
        + ASPECTS
        + POSITIVE_ADJ
        + NEGATIVE_ADJ
        + list(SENTIMENT_WORDS.values())
        + list(TRUTH_WORDS.values())
    )
    return list(dict.fromkeys(words))
