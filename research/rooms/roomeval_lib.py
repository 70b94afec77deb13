from interplab.tinyworld import generator as G, language as L
from interplab.tinyworld.evaluate import answer_logits
ORIG = G._rooms
def orig_docs(n, seed=11):
    cur = G.GENERATORS["rooms"]; G.GENERATORS["rooms"] = ORIG
    try: return G.generate(n, seed=seed, split="test", families=["rooms"])
    finally: G.GENERATORS["rooms"] = cur
def breakdown(model, docs):
    rows = answer_logits(model, docs); stats = {}
    for lg, ans, di, pos in rows:
        d = docs[di]; ok = int(lg.argmax()) == ans
        seen = [t for t in d.tokens[: pos + 1] if t in L.ROOMS]
        for key in ["all", "n%d" % len(d.meta["people"]), "last" if seen and seen[-1] == d.answer[pos] else "notlast"]:
            s = stats.setdefault(key, [0, 0]); s[0] += ok; s[1] += 1
    return {k: (round(a / b, 3), b) for k, (a, b) in sorted(stats.items())}
