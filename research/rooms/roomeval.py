import sys, os, json, torch
sys.path.insert(0, "/tmp/exp")
from transformers import GPT2LMHeadModel
from interplab.tinyworld import generator as G, language as L
from interplab.tinyworld.evaluate import answer_logits
import variants
orig = G._rooms
def breakdown(model, docs):
    rows = answer_logits(model, docs)
    stats = {}
    for lg, ans, di, pos in rows:
        d = docs[di]; ok = int(lg.argmax()) == ans
        toks = d.tokens[: pos + 1]
        rooms_seen = [t for t in toks if t in L.ROOMS]
        last = rooms_seen[-1] if rooms_seen else None
        k = ("n%d" % len(d.meta["people"]), "last" if last == d.answer[pos] else "notlast")
        for key in ["all", k[0], k[1]]:
            s = stats.setdefault(key, [0, 0]); s[0] += ok; s[1] += 1
    return {k: (round(a / b, 3), b) for k, (a, b) in sorted(stats.items())}
m = GPT2LMHeadModel.from_pretrained(sys.argv[1]).eval()
G.GENERATORS["rooms"] = orig
print("original test docs:", breakdown(m, G.generate(600, seed=11, split="test", families=["rooms"])))
G.GENERATORS["rooms"] = variants.rooms_interleaved
print("interleaved docs:", breakdown(m, G.generate(600, seed=11, split="test", families=["rooms"])))
