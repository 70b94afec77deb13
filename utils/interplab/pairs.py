"""Clean and corrupted prompt pairs for patching: indirect objects (IOI) and induction.

A patching experiment compares two runs whose prompts differ in exactly one detail, token
for token. The builders here return dicts of tensors, "clean" and "corrupted" [batch, pos]
token ids, "answer" and "wrong" [batch] (the two next tokens a logit-difference metric
compares); the samplers draw the words (from TinyWorld's generator for a TinyWorld model,
from the model's own single-token vocabulary otherwise).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from torch import Tensor

from . import tinyworld
from .models import is_tinyworld
from .tinyworld import language as L

IOI_CORRUPTIONS = ("swap_names", "swap_template", "third_name")
INDUCTION_CORRUPTIONS = ("answer", "match")


def name_token_id(model, name: str) -> int:
    """The id of `name` as the next word of a sentence (with a leading space, as GPT-2 needs)."""
    try:
        return int(model.to_single_token(" " + name))
    except Exception:
        raise ValueError(f"{name!r} is not a single token for this model's tokenizer; use names that are "
                         f"(sample_ioi_prompts(..., model=model) picks only such names)") from None


def ioi_pairs(model, prompts: list[dict], corruption: str = "third_name") -> dict[str, Tensor]:
    """Clean and corrupted indirect-object prompts, tokenized by the model's tokenizer.

    Each prompt is a dict with the template "template" (a format string in the model's
    own text format, e.g. ``tinyworld.IOI_TEMPLATES[0]``), the names "A" and "B" of the
    first clause, the subject "S" (A or B), the indirect object "IO" (the other one), a
    third name "C" (neither A nor B), and the words "place" and "obj". The clean text is
    ``template.format(A=A, B=B, S=S, place=place, obj=obj)``.

    Corruptions (each changes as little as possible):
        "swap_names": A and B exchanged everywhere (the template stays; the answer flips
            to the clean S).
        "swap_template": the subject of the final clause becomes the IO, so the other name
            is repeated (ABBA <-> BABA; only the final clause's subject changes; the
            answer flips to the clean S).
        "third_name": the IO, in the first clause, is replaced by C (only that word
            changes; the answer becomes C, a name the clean prompt never mentions).

    Args:
        model: a HookedTransformer; its tokenizer turns the texts into ids.
        prompts: the prompts, all of the same template length.
        corruption: one of "swap_names", "swap_template", "third_name".

    Returns:
        A dict of tensors: "clean" and "corrupted" [batch, pos] token ids (from
        `model.to_tokens`, which prepends <bos>), "answer" [batch] (the id of the IO) and
        "wrong" [batch] (the id of S), names as the next word of a sentence
        (`model.to_single_token(" " + name)`). The answer and wrong ids are the clean
        prompt's: the metric compares the same two names on both runs.
    """
    if corruption not in IOI_CORRUPTIONS:
        raise ValueError(f"corruption must be one of {IOI_CORRUPTIONS}, not {corruption!r}")
    clean, corrupted, answer, wrong = [], [], [], []
    for p in prompts:
        template = p["template"]
        words = dict(A=p["A"], B=p["B"], S=p["S"], place=p["place"], obj=p["obj"])
        if corruption == "swap_names":
            other = {p["A"]: p["B"], p["B"]: p["A"]}
            bad = dict(words, A=p["B"], B=p["A"], S=other[p["S"]])
        elif corruption == "swap_template":
            bad = dict(words, S=p["IO"])
        else:
            io_slot = "A" if p["IO"] == p["A"] else "B"
            bad = dict(words, **{io_slot: p["C"]})
        clean.append(model.to_tokens(template.format(**words))[0].cpu())
        corrupted.append(model.to_tokens(template.format(**bad))[0].cpu())
        answer.append(name_token_id(model, p["IO"]))
        wrong.append(name_token_id(model, p["S"]))
    lengths = {len(t) for t in clean + corrupted}
    if len(lengths) != 1:
        raise ValueError(f"the prompts tokenize to different lengths {sorted(lengths)}; patching needs aligned "
                         f"positions: use one template and single-token names")
    return {"clean": torch.stack(clean), "corrupted": torch.stack(corrupted),
            "answer": torch.tensor(answer), "wrong": torch.tensor(wrong)}


def induction_pairs(model, sequences: list[list[str]], cut: int, replacements: list[str],
                    corruption: str = "answer") -> dict[str, Tensor]:
    """Repeated sequences for induction, clean and corrupted.

    The clean prompt is <bos>, the sequence x_0 .. x_{n-1}, then its first `cut` words
    again, x_0 .. x_{cut-1}: an induction head predicts x_cut next (it was what followed
    x_{cut-1} the first time). The corrupted prompt changes one word of the FIRST copy
    to the replacement word r:
        "answer": x_cut becomes r, so induction now predicts r.
        "match": x_{cut-1} becomes r, so the current word x_{cut-1} never appeared
            before and there is nothing to copy.

    Each word is one token, with a leading space (``model.to_single_token(" " + word)``),
    after the model's <bos> token (``model.tokenizer.bos_token_id``).

    Args:
        model: a HookedTransformer (for its tokenizer).
        sequences: the word sequences, all of the same length n > cut.
        cut: how many words of the sequence are repeated (1 <= cut < n).
        replacements: one replacement word per sequence (not in the sequence).
        corruption: "answer" or "match".

    Returns:
        A dict of tensors: "clean", "corrupted" [batch, 1 + n + cut] token ids, "answer"
        [batch] (the id of x_cut) and "wrong" [batch] (the id of r).
    """
    if corruption not in INDUCTION_CORRUPTIONS:
        raise ValueError(f"corruption must be one of {INDUCTION_CORRUPTIONS}, not {corruption!r}")
    if len({len(s) for s in sequences}) != 1 or not 1 <= cut < len(sequences[0]):
        raise ValueError("all sequences must have the same length n, and 1 <= cut < n")
    bos = model.tokenizer.bos_token_id
    clean, corrupted, answer, wrong = [], [], [], []
    for seq, r in zip(sequences, replacements, strict=True):
        ids = [name_token_id(model, w) for w in seq]
        r_id = name_token_id(model, r)
        first = list(ids)
        first[cut if corruption == "answer" else cut - 1] = r_id
        clean.append([bos] + ids + ids[:cut])
        corrupted.append([bos] + first + ids[:cut])
        answer.append(ids[cut])
        wrong.append(r_id)
    return {"clean": torch.tensor(clean), "corrupted": torch.tensor(corrupted),
            "answer": torch.tensor(answer), "wrong": torch.tensor(wrong)}


def _single_token_names(model, names: Sequence[str]) -> list[str]:
    """The words of `names` that are one token for the model's tokenizer as the next word of a sentence (" word")."""
    keep = []
    for n in names:
        try:
            model.to_single_token(" " + n)
            keep.append(n)
        except Exception:
            pass
    return keep


def _uses_tinyworld_text(model) -> bool:
    return model is None or is_tinyworld(model)


# TinyWorld's indirect-object templates (`tinyworld.IOI_TEMPLATES`, same order) written as ordinary
# English text, for models trained on real text (gpt2-small...): capitalised sentences, punctuation
# attached to the word before it, and every name after a space (so " Name" is its token).
TEXT_IOI_TEMPLATES = [
    "When {A} and {B} went to the {place}, {S} gave a {obj} to",
    "After {A} and {B} arrived at the {place}, {S} handed a {obj} to",
    "Then, {A} and {B} were at the {place}. {S} passed a {obj} to",
    "While {A} and {B} were walking to the {place}, {S} showed a {obj} to",
    "Then {A} and {B} had a long day at the {place}. {S} gave a {obj} to",
    "Today {A} and {B} met at the {place}, and {S} sent a {obj} to",
    "At the {place}, {A} and {B} talked. Later {S} threw a {obj} to",
    "Yesterday {A} and {B} visited the {place}. {S} brought a {obj} to",
    "When {A} met {B} at the {place}, {S} offered a {obj} to",
    "Then, {A} and {B} walked into the {place}. Then {S} lent a {obj} to",
    "Because {A} and {B} liked the {place}, {S} sold a {obj} to",
    "Once {A} and {B} left the {place}, {S} tossed a {obj} to",
]


def ioi_templates(model=None) -> list[str]:
    """The indirect-object templates in the model's text format.

    TinyWorld's own (`tinyworld.IOI_TEMPLATES`: lower case, punctuation as separate words)
    for a TinyWorld model or none; `TEXT_IOI_TEMPLATES` (the same sentences as ordinary
    English text) for any other model.
    """
    return list(tinyworld.IOI_TEMPLATES) if _uses_tinyworld_text(model) else list(TEXT_IOI_TEMPLATES)


def sample_ioi_prompts(n: int, seed: int = 0, template: int = 0, split: str = "test", model=None) -> list[dict]:
    """`n` indirect-object prompts of one template, with a third name each (dicts for `ioi_pairs`).

    For a TinyWorld model (or ``model=None``) the prompts are drawn from TinyWorld's generator,
    so that they are sentences of the model's training distribution (``split`` "test" or
    "heldout": names the model never saw in an indirect-object sentence). For another model
    (gpt2-small...) the template is written as ordinary English text (`ioi_templates`), and
    names, places and objects are drawn at random among TinyWorld's words that are one token
    for its tokenizer (with a leading space), so that every prompt has the same length.
    """
    pool = L.IOI_TRAIN_NAMES if split != "heldout" else L.HELDOUT_IOI_NAMES
    places, objects = L.PLACES, L.OBJECTS
    if model is not None:  # keep words that are one token for this model (all of them for TinyWorld)
        pool = _single_token_names(model, pool)
        places, objects = _single_token_names(model, places), _single_token_names(model, objects)
    if len(pool) < 3 or not places or not objects:
        raise ValueError(f"too few single-token names ({len(pool)}), places ({len(places)}) or objects "
                         f"({len(objects)}) for this tokenizer")
    text = ioi_templates(model)[template]
    rng = random.Random(f"ioi-third-{seed}")
    out: list[dict] = []
    if not _uses_tinyworld_text(model):
        while len(out) < n:
            a, b, c = rng.sample(pool, 3)
            s = rng.choice([a, b])
            out.append(dict(template=text, A=a, B=b, S=s, IO=b if s == a else a, C=c, place=rng.choice(places),
                            obj=rng.choice(objects), order="ABBA" if s == b else "BABA"))
        return out
    chunk = 0
    while len(out) < n:
        for d in tinyworld.generate(40 * n, seed=1000 * seed + chunk, split=split, families=["ioi"]):
            m = d.meta
            if m["template"] != template or m["A"] not in pool or m["B"] not in pool:
                continue
            place = next(w for w in d.tokens if w in L.PLACES)
            obj = next(w for w in d.tokens if w in L.OBJECTS)
            if place not in places or obj not in objects:
                continue
            c = rng.choice([x for x in pool if x not in (m["A"], m["B"])])
            out.append(dict(template=text, A=m["A"], B=m["B"], S=m["S"], IO=m["IO"], C=c, place=place,
                            obj=obj, order=m["order"]))
            if len(out) == n:
                break
        chunk += 1
        if chunk > 50:
            raise RuntimeError("could not find enough prompts; check the template and the names")
    return out


def vocabulary_words(model, min_length: int = 3) -> list[str]:
    """Words of at least `min_length` letters that are one token of the model's vocabulary as " word".

    Returned without the leading space, in the order of their token ids. For gpt2-small these
    are thousands of ordinary words (and some odd ones): random sequences of them are the
    classic test of induction.
    """
    tok = model.tokenizer
    by_id = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    words, ids = [], []
    for piece, i in by_id:
        text = tok.convert_tokens_to_string([piece])
        word = text[1:]
        if text.startswith(" ") and len(word) >= min_length and word.isascii() and word.isalpha():
            words.append(word)
            ids.append(i)
    if not words:
        return []
    encoded = tok([" " + w for w in words], add_special_tokens=False)["input_ids"]
    return [w for w, i, e in zip(words, ids, encoded) if list(e) == [i]]  # and back to the same single token


def sample_induction_prompts(n: int, length: int = 10, seed: int = 0, model=None) -> tuple[list[list[str]], list[str]]:
    """`n` random sequences of `length` distinct words for induction, and a replacement word each.

    For a TinyWorld model (or ``model=None``) the words come from TinyWorld's vocabulary
    (`tinyworld.language.induction_pool`); for another model, from its own vocabulary:
    words that are one token with a leading space (`vocabulary_words`).
    """
    if _uses_tinyworld_text(model):
        pool = L.induction_pool()
        if model is not None:
            pool = _single_token_names(model, pool)
    else:
        pool = vocabulary_words(model)
    if len(pool) <= length:
        raise ValueError(f"only {len(pool)} single-token words for this tokenizer; sequences of {length} need more")
    rng = random.Random(f"induction-{seed}")
    seqs, reps = [], []
    for _ in range(n):
        words = rng.sample(pool, length + 1)
        seqs.append(words[:length])
        reps.append(words[length])
    return seqs, reps


def ioi_positions(pairs: dict[str, Tensor]) -> dict[str, Tensor]:
    """Positions [batch] of the IO, the first and second mention of S (S1, S2) and the end, in the clean prompts."""
    tokens = pairs["clean"]
    io = (tokens == pairs["answer"][:, None]).int().argmax(1)
    is_s = tokens == pairs["wrong"][:, None]
    s1 = is_s.int().argmax(1)
    s2 = tokens.shape[1] - 1 - is_s.flip(1).int().argmax(1)
    end = torch.full_like(io, tokens.shape[1] - 1)
    return {"IO": io, "S1": s1, "S1+1": s1 + 1, "S2": s2, "END": end}
