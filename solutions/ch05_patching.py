"""Chapter 5 (activation patching): reference solutions, and the helpers the chapter uses.

Vocabulary used throughout:

- The **source** run provides activations; the **target** run receives them. Denoising
  patches clean activations into the corrupted run (source = clean, target = corrupted)
  and asks "is this enough to bring the behaviour back?". Noising patches corrupted
  activations into the clean run (source = corrupted, target = clean) and asks "is this
  needed for the behaviour?".
- A **metric** maps the logits of a batch of prompts, [batch, pos, vocab], to one
  number (a 0-dimensional tensor), exactly as TransformerLens's ``patching`` module
  expects. `logit_diff_metric` builds the normalised logit difference (clean = 1,
  corrupted = 0).
- Sweeps return one metric value per patch: [layer, pos] for residual-stream-shaped
  activations, [layer, head] for heads over all positions, [layer, pos, head] for heads
  at one position (for the attention pattern, "pos" is the query position).

The sweeps batch many patches into one forward pass: the target prompts are repeated
once per patch, and each hook edits only its own copy. This gives the same numbers as
one forward pass per patch (as TransformerLens does) in a fraction of the time.
"""

from __future__ import annotations

import random
from typing import Callable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .ch00_orientation import answer_logit_diff

Metric = Callable[[Tensor], Tensor]

LAYER_POS_COMPONENTS = {
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "resid_mid": "blocks.{layer}.hook_resid_mid",
    "resid_post": "blocks.{layer}.hook_resid_post",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
}
HEAD_COMPONENTS = {
    "z": "blocks.{layer}.attn.hook_z",
    "q": "blocks.{layer}.attn.hook_q",
    "k": "blocks.{layer}.attn.hook_k",
    "v": "blocks.{layer}.attn.hook_v",
    "pattern": "blocks.{layer}.attn.hook_pattern",
}
IOI_CORRUPTIONS = ("swap_names", "swap_template", "third_name")
INDUCTION_CORRUPTIONS = ("answer", "match")


# --- datasets -------------------------------------------------------------------------


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
    from interplab.models import is_tinyworld

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
    from interplab.tinyworld import IOI_TEMPLATES

    return list(IOI_TEMPLATES) if _uses_tinyworld_text(model) else list(TEXT_IOI_TEMPLATES)


def sample_ioi_prompts(n: int, seed: int = 0, template: int = 0, split: str = "test", model=None) -> list[dict]:
    """`n` indirect-object prompts of one template, with a third name each (dicts for `ioi_pairs`).

    For a TinyWorld model (or ``model=None``) the prompts are drawn from TinyWorld's generator,
    so that they are sentences of the model's training distribution (``split`` "test" or
    "heldout": names the model never saw in an indirect-object sentence). For another model
    (gpt2-small...) the template is written as ordinary English text (`ioi_templates`), and
    names, places and objects are drawn at random among TinyWorld's words that are one token
    for its tokenizer (with a leading space), so that every prompt has the same length.
    """
    from interplab import tinyworld
    from interplab.tinyworld import language as L

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
    from interplab.tinyworld import language as L

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


# --- the metric -------------------------------------------------------------------------


def normalised_logit_diff(
    logits: Float[Tensor, "batch pos vocab"],
    answer: Int[Tensor, " batch"],
    wrong: Int[Tensor, " batch"],
    clean_ld: float,
    corrupted_ld: float,
) -> Float[Tensor, ""]:
    """The mean logit difference, rescaled so that the clean run gives 1 and the corrupted run 0.

    The logit difference of prompt b is logits[b, -1, answer[b]] - logits[b, -1, wrong[b]]
    (at the final position). Its mean over the batch, ld, becomes
    (ld - corrupted_ld) / (clean_ld - corrupted_ld).

    Args:
        logits: the model's output logits.
        answer: the right next token of each prompt.
        wrong: the competing wrong token of each prompt.
        clean_ld: the mean logit difference of the clean run.
        corrupted_ld: the mean logit difference of the corrupted run.

    Returns:
        A 0-dimensional tensor (keep it a tensor: attribution patching differentiates it).
    """
    ld = answer_logit_diff(logits, answer, wrong).mean()
    return (ld - corrupted_ld) / (clean_ld - corrupted_ld)


def mean_logit_diff(model, tokens: Int[Tensor, "batch pos"], answer: Int[Tensor, " batch"],
                    wrong: Int[Tensor, " batch"]) -> float:
    """The mean logit difference (answer minus wrong, at the final position) of the model on `tokens`."""
    with torch.no_grad():
        return answer_logit_diff(model(tokens), answer, wrong).mean().item()


def logit_diff_metric(model, pairs: dict[str, Tensor]) -> Metric:
    """The normalised logit difference of a dataset from `ioi_pairs` / `induction_pairs`, as a metric."""
    answer, wrong = pairs["answer"], pairs["wrong"]
    clean_ld = mean_logit_diff(model, pairs["clean"], answer, wrong)
    corrupted_ld = mean_logit_diff(model, pairs["corrupted"], answer, wrong)

    def metric(logits: Tensor) -> Tensor:
        return normalised_logit_diff(logits, answer.to(logits.device), wrong.to(logits.device), clean_ld, corrupted_ld)

    metric.clean_ld, metric.corrupted_ld = clean_ld, corrupted_ld
    return metric


# --- the batched patching engine ---------------------------------------------------------


def hook_name(component: str, layer: int) -> str:
    """The TransformerLens hook name of `component` ("resid_pre", "z", "pattern", ...) in block `layer`."""
    table = {**LAYER_POS_COMPONENTS, **HEAD_COMPONENTS}
    if component not in table:
        raise ValueError(f"unknown component {component!r}; choose one of {sorted(table)}")
    return table[component].format(layer=layer)


def cache_activations(model, tokens: Tensor, names: Sequence[str]) -> dict[str, Tensor]:
    """{hook name: activation} of one forward pass on `tokens`, keeping only the hooks `names`."""
    names = set(names)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens.to(model.cfg.device), names_filter=lambda n: n in names)
    return {n: cache[n] for n in names}


def _rows_per_pass(model, batch: int, n_pos: int, max_elements: float = 6e7) -> int:
    """How many patches fit in one forward pass (bounding the largest activation, usually the logits)."""
    widest = max(model.cfg.d_vocab, model.cfg.d_mlp or 0, model.cfg.d_model, model.cfg.n_heads * n_pos)
    return max(1, int(max_elements // (batch * n_pos * widest)))


def _layer_of(name: str) -> int | None:
    """The block a hook point belongs to (None for the embeddings and the final layer norm)."""
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "blocks" else None


def run_patches(
    model,
    target_tokens: Int[Tensor, "batch pos"],
    source: dict[str, Tensor],
    patches: Sequence[tuple[str, tuple]],
    metric: Metric,
    max_patches_per_pass: int | None = None,
) -> Float[Tensor, " patch"]:
    """Run many single-activation patches, many per forward pass; one metric value per patch.

    Each patch is (hook name, index): in the target run, ``act[:, *index]`` of that hook
    is replaced by ``source[hook name][:, *index]`` for every prompt. Two tricks make a
    sweep fast:

    - Batching: the target prompts are repeated once per patch (rows k*batch ..
      (k+1)*batch - 1 belong to patch k), each hook edits only its own patches' rows,
      and the metric is applied to each patch's rows of the logits.
    - A patch in block l cannot change anything before block l, so patches of block l
      start from the target run's cached residual stream at block l
      (``start_at_layer=l``) instead of recomputing the earlier blocks.
    """
    device = model.cfg.device
    target_tokens = target_tokens.to(device)
    batch, n_pos = target_tokens.shape
    per_pass = max_patches_per_pass or _rows_per_pass(model, batch, n_pos)
    layers = sorted({_layer_of(name) for name, _ in patches if _layer_of(name) is not None})
    starts = cache_activations(model, target_tokens, [f"blocks.{layer}.hook_resid_pre" for layer in layers])
    groups: dict[int | None, list[int]] = {}
    for i, (name, _) in enumerate(patches):
        groups.setdefault(_layer_of(name), []).append(i)
    results = torch.zeros(len(patches))
    with torch.no_grad():
        for layer, members in groups.items():
            for start in range(0, len(members), per_pass):
                chunk = members[start:start + per_pass]
                by_hook: dict[str, list[tuple[int, tuple]]] = {}
                for k, i in enumerate(chunk):
                    name, index = patches[i]
                    by_hook.setdefault(name, []).append((k, index))

                def hook(act, hook):
                    rows = act.view(len(chunk), batch, *act.shape[1:])
                    src = source[hook.name]
                    for k, index in by_hook[hook.name]:
                        rows[(k, slice(None)) + index] = src[(slice(None),) + index]
                    return act

                hooks = [(name, hook) for name in by_hook]
                if layer is None:
                    logits = model.run_with_hooks(target_tokens.repeat(len(chunk), 1), fwd_hooks=hooks)
                else:
                    resid = starts[f"blocks.{layer}.hook_resid_pre"].repeat(len(chunk), 1, 1)
                    logits = model.run_with_hooks(resid, start_at_layer=layer, fwd_hooks=hooks)
                for k, i in enumerate(chunk):
                    results[i] = metric(logits[k * batch:(k + 1) * batch]).detach().float().cpu()
    return results


def patch_layer_pos_sweep(
    model,
    source_tokens: Int[Tensor, "batch pos"],
    target_tokens: Int[Tensor, "batch pos"],
    metric: Metric,
    component: str = "resid_pre",
) -> Float[Tensor, "layer pos"]:
    """Patch a residual-stream-shaped activation at one (layer, position) at a time.

    For every layer l and position p: run the model on `target_tokens`, with the
    activation `component` of layer l at position p (for every prompt) replaced by its
    value on `source_tokens`, and record metric(logits). Denoising: source = clean,
    target = corrupted. Noising: source = corrupted, target = clean.

    Args:
        model: a HookedTransformer.
        source_tokens: the prompts whose activations are pasted in.
        target_tokens: the prompts the model runs on (same shape).
        metric: logits [batch, pos, vocab] -> a 0-dimensional tensor.
        component: "resid_pre", "resid_mid", "resid_post", "attn_out" or "mlp_out"
            (hook `blocks.{l}.hook_{component}`).

    Returns:
        [n_layers, pos] metric values, as a float32 tensor on the CPU.
    """
    if component not in LAYER_POS_COMPONENTS:
        raise ValueError(f"component must be one of {sorted(LAYER_POS_COMPONENTS)}, not {component!r}")
    names = [hook_name(component, layer) for layer in range(model.cfg.n_layers)]
    source = cache_activations(model, source_tokens, names)
    n_pos = target_tokens.shape[1]
    patches = [(name, (pos,)) for name in names for pos in range(n_pos)]
    return run_patches(model, target_tokens, source, patches, metric).reshape(model.cfg.n_layers, n_pos)


def patch_head_sweep(
    model,
    source_tokens: Int[Tensor, "batch pos"],
    target_tokens: Int[Tensor, "batch pos"],
    metric: Metric,
    component: str = "z",
) -> Float[Tensor, "layer head"]:
    """Patch one attention head's activation, at every position at once, one head at a time.

    Components: "z" (the head's output before W_O; patching it patches the head's output),
    "q", "k", "v" (its queries, keys, values) and "pattern" (its attention pattern).
    hook_z/q/k/v are [batch, pos, head, d_head]; hook_pattern is [batch, head, query, key].

    Args:
        model: a HookedTransformer.
        source_tokens: the prompts whose activations are pasted in.
        target_tokens: the prompts the model runs on (same shape).
        metric: logits [batch, pos, vocab] -> a 0-dimensional tensor.
        component: "z", "q", "k", "v" or "pattern".

    Returns:
        [n_layers, n_heads] metric values, as a float32 tensor on the CPU.
    """
    if component not in HEAD_COMPONENTS:
        raise ValueError(f"component must be one of {sorted(HEAD_COMPONENTS)}, not {component!r}")
    names = [hook_name(component, layer) for layer in range(model.cfg.n_layers)]
    source = cache_activations(model, source_tokens, names)
    if component == "pattern":
        patches = [(name, (head,)) for name in names for head in range(model.cfg.n_heads)]
    else:
        patches = [(name, (slice(None), head)) for name in names for head in range(model.cfg.n_heads)]
    return run_patches(model, target_tokens, source, patches, metric).reshape(model.cfg.n_layers, model.cfg.n_heads)


def patch_head_pos_sweep(
    model,
    source_tokens: Int[Tensor, "batch pos"],
    target_tokens: Int[Tensor, "batch pos"],
    metric: Metric,
    component: str = "z",
) -> Float[Tensor, "layer pos head"]:
    """Patch one attention head's activation at one position, for every (layer, position, head).

    As `patch_head_sweep`, but at a single position: for "z", "q", "k" and "v" the entry
    [:, pos, head]; for "pattern" the row of query position pos, [:, head, pos, :] (where
    the head looks from that position).

    Args:
        model: a HookedTransformer.
        source_tokens: the prompts whose activations are pasted in.
        target_tokens: the prompts the model runs on (same shape).
        metric: logits [batch, pos, vocab] -> a 0-dimensional tensor.
        component: "z", "q", "k", "v" or "pattern".

    Returns:
        [n_layers, pos, n_heads] metric values (the same layout for every component), as a
        float32 tensor on the CPU.
    """
    if component not in HEAD_COMPONENTS:
        raise ValueError(f"component must be one of {sorted(HEAD_COMPONENTS)}, not {component!r}")
    names = [hook_name(component, layer) for layer in range(model.cfg.n_layers)]
    source = cache_activations(model, source_tokens, names)
    n_pos, n_heads = target_tokens.shape[1], model.cfg.n_heads
    patches = []
    for name in names:
        for pos in range(n_pos):
            for head in range(n_heads):
                patches.append((name, (head, pos) if component == "pattern" else (pos, head)))
    return run_patches(model, target_tokens, source, patches, metric).reshape(model.cfg.n_layers, n_pos, n_heads)


# --- path patching ----------------------------------------------------------------------------


def validate_path(model, sender: tuple[int, int], receivers, receiver_input: str) -> None:
    """Raise ValueError unless the sender is a head, and every receiver a head of a later layer."""
    layer, head = sender
    if not (0 <= layer < model.cfg.n_layers and 0 <= head < model.cfg.n_heads):
        raise ValueError(f"sender {sender} is not a head of this model")
    if receivers is not None:
        if receiver_input not in ("q", "k", "v"):
            raise ValueError(f"receiver_input must be 'q', 'k' or 'v', not {receiver_input!r}")
        for r_layer, r_head in receivers:
            if r_layer <= layer:
                raise ValueError(f"receiver L{r_layer}H{r_head} is not after the sender L{layer}H{head}: "
                                 f"a head can only send to heads of later layers")


def path_patch(
    model,
    source_tokens: Int[Tensor, "batch pos"],
    target_tokens: Int[Tensor, "batch pos"],
    metric: Metric,
    sender: tuple[int, int],
    receivers: list[tuple[int, int]] | None,
    receiver_input: str = "q",
) -> float:
    """The effect of one head on others along the direct path only (path patching).

    1. Run the model on `target_tokens` with the sender head's output (hook_z) taken from
       the `source_tokens` run, and every OTHER head's output held at its value on the
       target run (MLPs are recomputed). Only the direct path from the sender (through
       the residual stream and MLPs) changes anything.
    2. Record the receivers' inputs (hook_q, hook_k or hook_v of each receiver head) in
       that run.
    3. Run the model on `target_tokens` again, with only those receiver inputs patched in
       (everything else recomputed), and return metric(logits).

    With ``receivers=None`` the receiver is the unembedding: return the metric of the
    first run (the sender's direct effect on the logits).

    Args:
        model: a HookedTransformer.
        source_tokens: the prompts the sender's output comes from.
        target_tokens: the prompts the model runs on.
        metric: logits [batch, pos, vocab] -> a 0-dimensional tensor.
        sender: (layer, head) of the sender.
        receivers: (layer, head) of each receiver (all in later layers), or None.
        receiver_input: which input of the receivers to patch: "q", "k" or "v".

    Returns:
        The metric as a Python float.
    """
    validate_path(model, sender, receivers, receiver_input)
    s_layer, s_head = sender
    device = model.cfg.device
    source_tokens, target_tokens = source_tokens.to(device), target_tokens.to(device)
    z_names = [f"blocks.{layer}.attn.hook_z" for layer in range(model.cfg.n_layers)]
    target_z = cache_activations(model, target_tokens, z_names)
    source_z = cache_activations(model, source_tokens, [z_names[s_layer]])[z_names[s_layer]]

    def freeze(z, hook):
        new = target_z[hook.name].clone()
        if hook.name == z_names[s_layer]:
            new[:, :, s_head] = source_z[:, :, s_head]
        return new

    receiver_names = sorted({f"blocks.{layer}.attn.hook_{receiver_input}" for layer, _ in receivers or []})
    stored: dict[str, Tensor] = {}

    def store(act, hook):
        stored[hook.name] = act.clone()

    with torch.no_grad():
        logits = model.run_with_hooks(target_tokens, fwd_hooks=[(n, freeze) for n in z_names]
                                      + [(n, store) for n in receiver_names])
        if receivers is None:
            return metric(logits).item()

        def patch_receivers(act, hook):
            layer = int(hook.name.split(".")[1])
            act = act.clone()
            for r_layer, r_head in receivers:
                if r_layer == layer:
                    act[:, :, r_head] = stored[hook.name][:, :, r_head]
            return act

        logits = model.run_with_hooks(target_tokens, fwd_hooks=[(n, patch_receivers) for n in receiver_names])
        return metric(logits).item()


def path_patch_sweep(
    model,
    source_tokens: Int[Tensor, "batch pos"],
    target_tokens: Int[Tensor, "batch pos"],
    metric: Metric,
    receivers: list[tuple[int, int]] | None,
    receiver_input: str = "q",
    max_patches_per_pass: int | None = None,
) -> Float[Tensor, "layer head"]:
    """`path_patch` for every possible sender head at once (batched); NaN where a head cannot send.

    Entry [l, h] is path_patch(..., sender=(l, h), receivers, receiver_input). Senders
    must be in layers before every receiver; other entries are NaN.
    """
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    last = n_layers if receivers is None else min(layer for layer, _ in receivers)
    senders = [(layer, head) for layer in range(last) for head in range(n_heads)]
    for s in senders:
        validate_path(model, s, receivers, receiver_input)
    device = model.cfg.device
    source_tokens, target_tokens = source_tokens.to(device), target_tokens.to(device)
    batch, n_pos = target_tokens.shape
    z_names = [f"blocks.{layer}.attn.hook_z" for layer in range(n_layers)]
    target_z = cache_activations(model, target_tokens, z_names)
    source_z = cache_activations(model, source_tokens, z_names)
    receiver_names = sorted({f"blocks.{layer}.attn.hook_{receiver_input}" for layer, _ in receivers or []})
    per_pass = max_patches_per_pass or _rows_per_pass(model, batch, n_pos)
    out = torch.full((n_layers, n_heads), float("nan"))
    with torch.no_grad():
        for start in range(0, len(senders), per_pass):
            chunk = senders[start:start + per_pass]
            n = len(chunk)
            tokens = target_tokens.repeat(n, 1)

            def freeze(z, hook):
                layer = int(hook.name.split(".")[1])
                new = target_z[hook.name].repeat(n, 1, 1, 1).view(n, batch, *z.shape[1:])
                for k, (s_layer, s_head) in enumerate(chunk):
                    if s_layer == layer:
                        new[k, :, :, s_head] = source_z[hook.name][:, :, s_head]
                return new.view(z.shape)

            stored: dict[str, Tensor] = {}

            def store(act, hook):
                stored[hook.name] = act.clone()

            logits = model.run_with_hooks(tokens, fwd_hooks=[(nm, freeze) for nm in z_names]
                                          + [(nm, store) for nm in receiver_names])
            if receivers is not None:
                def patch_receivers(act, hook):
                    layer = int(hook.name.split(".")[1])
                    act = act.clone()
                    for r_layer, r_head in receivers:
                        if r_layer == layer:
                            act[:, :, r_head] = stored[hook.name][:, :, r_head]
                    return act

                logits = model.run_with_hooks(tokens, fwd_hooks=[(nm, patch_receivers) for nm in receiver_names])
            for k, (s_layer, s_head) in enumerate(chunk):
                out[s_layer, s_head] = metric(logits[k * batch:(k + 1) * batch]).item()
    return out


# --- attribution patching ----------------------------------------------------------------------


def attribution_patch(
    model,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    metric: Metric,
    component: str = "z",
) -> Tensor:
    """Estimate every denoising patch of one component at once, from one backward pass.

    To first order, patching activation a from its corrupted value to its clean value
    changes the metric by (a_clean - a_corrupted) . d metric / d a, the gradient taken
    on the CORRUPTED run. Summing that product over the batch and the activation's
    last axis gives the estimate of patching every prompt's a at one position (and
    head) at once, as `patch_layer_pos_sweep` / `patch_head_pos_sweep` do.

    Args:
        model: a HookedTransformer.
        clean_tokens: the clean prompts.
        corrupted_tokens: the corrupted prompts (same shape).
        metric: logits [batch, pos, vocab] -> a 0-dimensional tensor (differentiable).
        component: "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out" (giving
            [layer, pos]) or "z", "q", "k", "v" (giving [layer, pos, head]).

    Returns:
        The estimated CHANGE of the metric (patched minus corrupted) for each patch, as a
        float32 tensor on the CPU: [n_layers, pos] or [n_layers, pos, n_heads].
    """
    if component not in LAYER_POS_COMPONENTS and component not in ("z", "q", "k", "v"):
        raise ValueError(f"component must be a residual-stream component or 'z', 'q', 'k', 'v', not {component!r}")
    names = [hook_name(component, layer) for layer in range(model.cfg.n_layers)]
    device = model.cfg.device
    clean = cache_activations(model, clean_tokens, names)
    acts: dict[str, Tensor] = {}

    def keep(act, hook):
        acts[hook.name] = act

    with torch.enable_grad():
        logits = model.run_with_hooks(corrupted_tokens.to(device), fwd_hooks=[(n, keep) for n in names])
        value = metric(logits)
        grads = torch.autograd.grad(value, [acts[n] for n in names])
    estimates = []
    for name, grad in zip(names, grads):
        delta = clean[name] - acts[name].detach()
        estimates.append((delta * grad).sum(dim=(0, -1)))
    return torch.stack(estimates).detach().float().cpu()


def integrated_attribution_patch(
    model,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    metric: Metric,
    component: str = "z",
    steps: int = 5,
) -> Tensor:
    """`attribution_patch` with the gradient averaged along the way from corrupted to clean.

    The first-order estimate uses the slope of the metric at the corrupted run only. When
    the metric is a switch (flat on the corrupted side, steep half-way, flat again at the
    clean side), that slope is about zero and the estimate misses a patch that restores
    everything. Here the token embeddings (and position embeddings) are mixed,
    e + alpha (e_clean - e_corrupted), at `steps` midpoints alpha = (k + 0.5) / steps; the
    gradient with respect to every activation is averaged over those runs and multiplied
    by (a_clean - a_corrupted), as integrated gradients do for the inputs (the
    "EAP-IG" variant of attribution patching). It costs `steps` forward and backward
    passes instead of one, still far fewer than a patching sweep.

    Args:
        model: a HookedTransformer.
        clean_tokens, corrupted_tokens: the two prompt sets (same shape).
        metric: logits [batch, pos, vocab] -> a 0-dimensional tensor (differentiable).
        component: as for `attribution_patch`.
        steps: points on the path (1 takes the single midpoint; 5 is plenty for TinyWorld).

    Returns:
        The estimated change of the metric for each patch, shaped as `attribution_patch`'s.
    """
    if component not in LAYER_POS_COMPONENTS and component not in ("z", "q", "k", "v"):
        raise ValueError(f"component must be a residual-stream component or 'z', 'q', 'k', 'v', not {component!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, not {steps!r}")
    if clean_tokens.shape != corrupted_tokens.shape:
        raise ValueError(f"clean and corrupted tokens must have the same shape, not {tuple(clean_tokens.shape)} "
                         f"and {tuple(corrupted_tokens.shape)}")
    names = [hook_name(component, layer) for layer in range(model.cfg.n_layers)]
    inputs = ["hook_embed", "hook_pos_embed"]
    clean = cache_activations(model, clean_tokens, names + inputs)
    corrupted = cache_activations(model, corrupted_tokens, names + inputs)
    mean_grad = {n: torch.zeros_like(clean[n]) for n in names}
    for k in range(steps):
        alpha = (k + 0.5) / steps
        acts: dict[str, Tensor] = {}

        def mix(act, hook, alpha=alpha):
            # a leaf that requires grad, so that even the embeddings' own sum (resid_pre 0) has a gradient
            return (corrupted[hook.name] + alpha * (clean[hook.name] - corrupted[hook.name])).requires_grad_(True)

        def keep(act, hook):
            acts[hook.name] = act

        with torch.enable_grad():
            logits = model.run_with_hooks(corrupted_tokens.to(model.cfg.device),
                                          fwd_hooks=[(n, mix) for n in inputs] + [(n, keep) for n in names])
            grads = torch.autograd.grad(metric(logits), [acts[n] for n in names])
        for name, grad in zip(names, grads):
            mean_grad[name] += grad / steps
    estimates = [((clean[n] - corrupted[n]) * mean_grad[n]).sum(dim=(0, -1)) for n in names]
    return torch.stack(estimates).detach().float().cpu()


# --- circuits ----------------------------------------------------------------------------------


def circuit_faithfulness(
    model,
    tokens: Int[Tensor, "batch pos"],
    answer: Int[Tensor, " batch"],
    wrong: Int[Tensor, " batch"],
    circuit: list[tuple[int, int]],
    mean_tokens: Int[Tensor, "ref_batch pos"],
) -> float:
    """How much of the model's logit difference a circuit of heads keeps on its own.

    Every head NOT in `circuit` is mean-ablated: its output (hook_z) at each position is
    replaced by its mean output at that position over the prompts `mean_tokens` (a
    reference distribution, e.g. the third-name corruption, with the same positions).
    MLPs and embeddings are kept. Faithfulness is the mean logit difference (answer
    minus wrong, final position) of this run divided by that of the intact model.

    Args:
        model: a HookedTransformer.
        tokens: the prompts to evaluate.
        answer: the right next token of each prompt.
        wrong: the competing wrong token of each prompt.
        circuit: the heads to keep, as (layer, head).
        mean_tokens: the prompts the means are taken over (same number of positions).

    Returns:
        ld(circuit only) / ld(full model), a Python float (1.0: the circuit does it all).
    """
    if mean_tokens.shape[1] != tokens.shape[1]:
        raise ValueError(f"mean_tokens has {mean_tokens.shape[1]} positions but tokens has {tokens.shape[1]}: "
                         f"mean ablation needs aligned positions")
    for layer, head in circuit:
        if not (0 <= layer < model.cfg.n_layers and 0 <= head < model.cfg.n_heads):
            raise ValueError(f"({layer}, {head}) is not a head of this model")
    device = model.cfg.device
    tokens = tokens.to(device)
    names = [f"blocks.{layer}.attn.hook_z" for layer in range(model.cfg.n_layers)]
    means = {n: z.mean(dim=0) for n, z in cache_activations(model, mean_tokens, names).items()}
    keep = set(map(tuple, circuit))

    def ablate(z, hook):
        layer = int(hook.name.split(".")[1])
        z = z.clone()
        for head in range(model.cfg.n_heads):
            if (layer, head) not in keep:
                z[:, :, head] = means[hook.name][:, head]
        return z

    with torch.no_grad():
        full = answer_logit_diff(model(tokens), answer.to(device), wrong.to(device)).mean()
        logits = model.run_with_hooks(tokens, fwd_hooks=[(n, ablate) for n in names])
        kept = answer_logit_diff(logits, answer.to(device), wrong.to(device)).mean()
    return (kept / full).item()


# --- naming heads -------------------------------------------------------------------------------


def pearson(x: Tensor, y: Tensor) -> float:
    """Pearson correlation of two tensors, flattened."""
    x, y = x.flatten().double(), y.flatten().double()
    x, y = x - x.mean(), y - y.mean()
    return float((x @ y) / (x.norm() * y.norm()))


def ioi_positions(pairs: dict[str, Tensor]) -> dict[str, Tensor]:
    """Positions [batch] of the IO, the first and second mention of S (S1, S2) and the end, in the clean prompts."""
    tokens = pairs["clean"]
    io = (tokens == pairs["answer"][:, None]).int().argmax(1)
    is_s = tokens == pairs["wrong"][:, None]
    s1 = is_s.int().argmax(1)
    s2 = tokens.shape[1] - 1 - is_s.flip(1).int().argmax(1)
    end = torch.full_like(io, tokens.shape[1] - 1)
    return {"IO": io, "S1": s1, "S1+1": s1 + 1, "S2": s2, "END": end}


def attention_between(model, tokens: Tensor, query: Tensor, key: Tensor) -> Float[Tensor, "layer head"]:
    """Mean attention of every head from position query[b] to key[b] (over the prompts b)."""
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(model.cfg.n_layers)]
    cache = cache_activations(model, tokens, names)
    b = torch.arange(tokens.shape[0])
    return torch.stack([cache[n][b, :, query, key].mean(0) for n in names]).cpu()


def head_direct_effect(model, tokens: Tensor, answer: Tensor, wrong: Tensor) -> Float[Tensor, "layer head"]:
    """Each head's direct contribution to the logit difference at the final position (direct logit attribution)."""
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens.to(model.cfg.device))
        heads = cache.stack_head_results(layer=-1, pos_slice=-1, apply_ln=True)  # [layer*head, batch, d_model]
        direction = model.W_U[:, answer] - model.W_U[:, wrong]  # [d_model, batch]
        effect = (heads * direction.T[None]).sum(-1).mean(-1)
    return effect.reshape(model.cfg.n_layers, model.cfg.n_heads).cpu()


def induction_head_scores(model, seq_len: int = 12, n: int = 32, seed: int = 0) -> dict[str, Tensor]:
    """Previous-token, duplicate-token and induction scores [layer, head] on repeated random sequences.

    For a sequence repeated twice, at a position i of the second copy: previous-token
    attention goes to i - 1, duplicate-token attention to i - seq_len (the same word
    earlier), induction attention to i - seq_len + 1 (the word after it).
    """
    seqs, _ = sample_induction_prompts(n, seq_len, seed=seed, model=model)
    bos = model.tokenizer.bos_token_id
    tokens = torch.tensor([[bos] + [name_token_id(model, w) for w in s] * 2 for s in seqs])
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(model.cfg.n_layers)]
    cache = cache_activations(model, tokens, names)
    second = torch.arange(seq_len + 1, 2 * seq_len + 1)
    scores = {}
    for label, offset in (("previous_token", 1), ("duplicate_token", seq_len), ("induction", seq_len - 1)):
        scores[label] = torch.stack([cache[n][:, :, second, second - offset].mean((0, 2)) for n in names]).cpu()
    return scores


def top_entries(values: Tensor, k: int = 5, labels: Callable[[tuple[int, ...]], str] | None = None) -> list[tuple[str, float]]:
    """The k entries of `values` with the largest absolute value, as (label, value), largest first."""
    flat = values.flatten()
    order = flat.abs().argsort(descending=True)[:k]
    out = []
    for i in order.tolist():
        index = tuple(int(j) for j in torch.unravel_index(torch.tensor(i), values.shape))
        out.append((labels(index) if labels else str(index), float(flat[i])))
    return out


def draw_circuit(roles: dict[tuple[int, int], str], n_layers: int, n_heads: int,
                 edges: Sequence[tuple[tuple[int, int] | str, tuple[int, int] | str, float]] = (),
                 notes: dict[tuple[int, int] | str, str] | None = None, title: str = ""):
    """A circuit diagram: every head as a node (layer upwards, head across), the circuit's heads
    coloured by role, and arrows (sender, receiver, strength) between heads or to "MLP0".. "logits".

    Nodes other than heads are named by strings: "embed" (below layer 0), "MLP{l}" (right of
    layer l) and "logits" (above the last layer).
    """
    import matplotlib.pyplot as plt

    notes = notes or {}
    role_names = sorted(set(roles.values()))
    palette = plt.get_cmap("tab10")
    colour = {r: palette(i % 10) for i, r in enumerate(role_names)}

    def where(node):
        if isinstance(node, tuple):
            return node[1], node[0]
        if node == "embed":
            return (n_heads - 1) / 2, -1.1
        if node == "logits":
            return (n_heads - 1) / 2, n_layers + 0.1
        if node.startswith("MLP"):
            return n_heads + 0.3, int(node[3:]) + 0.35
        raise ValueError(f"unknown node {node!r}")

    fig, ax = plt.subplots(figsize=(1.9 * n_heads + 3.5, 1.35 * n_layers + 2.2))
    for layer in range(n_layers):
        for head in range(n_heads):
            role = roles.get((layer, head))
            ax.scatter([head], [layer], s=900, color=colour[role] if role else "#eeeeee",
                       edgecolors="black" if role else "#bbbbbb", zorder=3)
            ax.text(head, layer, f"L{layer}H{head}", ha="center", va="center", fontsize=7, zorder=4)
            if (layer, head) in notes:
                ax.text(head, layer - 0.38, notes[(layer, head)], ha="center", va="top", fontsize=6.5, zorder=4)
        ax.text(n_heads + 0.3, layer + 0.35, f"MLP{layer}", ha="center", va="center", fontsize=7,
                bbox=dict(boxstyle="round", fc="#fff7dd" if f"MLP{layer}" in notes else "#f6f6f6", ec="#999999"))
        if f"MLP{layer}" in notes:
            ax.text(n_heads + 0.3, layer + 0.05, notes[f"MLP{layer}"], ha="center", va="top", fontsize=6.5)
    for node in ("embed", "logits"):
        x, y = where(node)
        ax.text(x, y, node, ha="center", va="center", fontsize=8, bbox=dict(boxstyle="round", fc="#e8f0ff", ec="#6688cc"))
    biggest = max([abs(w) for _, _, w in edges] + [1e-9])
    for sender, receiver, weight in edges:
        (x0, y0), (x1, y1) = where(sender), where(receiver)
        ax.annotate("", xy=(x1, y1 - 0.18), xytext=(x0, y0 + 0.18),
                    arrowprops=dict(arrowstyle="-|>", lw=0.8 + 3.5 * abs(weight) / biggest,
                                    color="#cc3311" if weight < 0 else "#225588", alpha=0.8,
                                    connectionstyle="arc3,rad=0.12"), zorder=2)
    for role in role_names:
        ax.scatter([], [], s=120, color=colour[role], edgecolors="black", label=role)
    if role_names:
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    ax.set_xlim(-0.7, n_heads + 0.9)
    ax.set_ylim(-1.5, n_layers + 0.5)
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig
