"""Variant rooms generators, monkeypatched into GENERATORS."""
import os, random
from interplab.tinyworld import generator as G, language as L
from interplab.tinyworld.generator import Doc

def rooms_interleaved(rng, split, pmin=int(os.environ.get("PMIN", 2)), pmax=int(os.environ.get("PMAX", 3)),
                      q=float(os.environ.get("QPROB", 0.5))):
    people = rng.sample(L.NAMES, rng.randint(pmin, pmax))
    doc = Doc("rooms", meta={"people": people, "questions": []})
    where = {}
    def place(person, template, room):
        before, after = template.split("{R}")
        doc.add(before.format(P=person)); where[person] = room
        doc.add([room] + after.split()); doc.rooms[-2] = dict(where); doc.rooms[-1] = dict(where)
    def ask(p):
        doc.meta["questions"].append((p, where[p])); doc.add(f"where is {p} ?"); doc.add(f"{where[p]} .", answer_first=True)
    for p in people:
        place(p, L.ROOM_INTRO, rng.choice(L.ROOMS))
        if rng.random() < q: ask(rng.choice(list(where)))
    for _ in range(rng.randint(1, 5)):
        p = rng.choice(people)
        place(p, rng.choice(L.ROOM_MOVES), rng.choice([r for r in L.ROOMS if r != where[p]]))
        if rng.random() < q: ask(rng.choice(people))
    for p in rng.sample(people, rng.randint(1, len(people))):
        ask(p)
    return doc

REV_INTRO = "in the {R} is {P} ."
REV_MOVES = ["to the {R} goes {P} .", "to the {R} walks {P} .", "to the {R} runs {P} ."]

def rooms_reversed(rng, split, pmin=int(os.environ.get("PMIN", 2)), pmax=int(os.environ.get("PMAX", 3)),
                   q=float(os.environ.get("QPROB", 0.5))):
    people = rng.sample(L.NAMES, rng.randint(pmin, pmax))
    doc = Doc("rooms", meta={"people": people, "questions": []})
    where = {}
    def place(person, template, room):
        before, after = template.split("{R}")
        doc.add(before.split()); where[person] = room
        doc.add([room] + after.format(P=person).split())
        for k in range(-len(after.split()) - 1, 0): doc.rooms[k] = dict(where)
    def ask(p):
        doc.meta["questions"].append((p, where[p])); doc.add(f"where is {p} ?"); doc.add(f"{where[p]} .", answer_first=True)
    for p in people:
        place(p, REV_INTRO, rng.choice(L.ROOMS))
        if rng.random() < q: ask(rng.choice(list(where)))
    for _ in range(rng.randint(1, 5)):
        p = rng.choice(people)
        place(p, rng.choice(REV_MOVES), rng.choice([r for r in L.ROOMS if r != where[p]]))
        if rng.random() < q: ask(rng.choice(people))
    for p in rng.sample(people, rng.randint(1, len(people))):
        ask(p)
    return doc

SEP = os.environ.get("SEP", "")
def rooms_log(rng, split, pmin=int(os.environ.get("PMIN", 2)), pmax=int(os.environ.get("PMAX", 3)),
              q=float(os.environ.get("QPROB", 0.5))):
    people = rng.sample(L.NAMES, rng.randint(pmin, pmax))
    doc = Doc("rooms", meta={"people": people, "questions": []})
    where = {}
    def place(person, room, move):
        doc.add((["then"] if move else []) + [person] + SEP.split()); where[person] = room
        doc.add([room, "."]); doc.rooms[-2] = dict(where); doc.rooms[-1] = dict(where)
    def ask(p):
        doc.meta["questions"].append((p, where[p])); doc.add(f"where is {p}" + ("" if os.environ.get("NOQ") else " ?")); doc.add(f"{where[p]} .", answer_first=True)
    for p in people:
        place(p, rng.choice(L.ROOMS), False)
        if rng.random() < q: ask(rng.choice(list(where)))
    for _ in range(rng.randint(1, 5)):
        p = rng.choice(people)
        place(p, rng.choice([r for r in L.ROOMS if r != where[p]]), True)
        if rng.random() < q: ask(rng.choice(people))
    for p in rng.sample(people, rng.randint(1, len(people))):
        ask(p)
    return doc

if os.environ.get("ROOMS_VARIANT") == "log":
    G.GENERATORS["rooms"] = rooms_log
    G._rooms = rooms_log
if os.environ.get("ROOMS_VARIANT") == "reversed":
    G.GENERATORS["rooms"] = rooms_reversed
    G._rooms = rooms_reversed
if os.environ.get("ROOMS_VARIANT") == "interleaved":
    G.GENERATORS["rooms"] = rooms_interleaved
