"""Chapter 06 (patching): prompt pairs, the metric, patching sweeps, path patching, attribution
patching and circuit faithfulness."""

from __future__ import annotations

import functools

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from .. import pairs as pairs_lib
from .. import patching
from ..hooks import act_name
from ..models import quiet_transformer_lens
from ..patching import logit_diff
from ..paths import chapter_of
from ..solutions import ch06_patching as sol
from . import Case, Mistake, gen, register, shared_model, under_no_grad

CHAPTER = chapter_of(__name__)
SWEEP_TOL = dict(rtol=1e-3, atol=1e-4)


# --- shared inputs -------------------------------------------------------------------------


@functools.cache
def _bpe_model():
    """A randomly initialised GPT-2-shaped stand-in with a byte-level BPE tokenizer, where " Alice" and "Alice"
    are different tokens (TinyWorld's word tokenizer cannot tell them apart)."""
    from ..standin import standin_model  # lazy: builds a tokenizer, needed only by the pair exercises' cases

    return standin_model("gpt2-small", device="cpu")


def _raised(fn, *args, **kwargs):
    """Call fn and return the name of the exception it raised ("" when it returned normally)."""
    try:
        fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - the case asks which error, if any, is raised
        return type(e).__name__
    return ""


def _must_raise(what: str):
    """A judge for a `_raised` case: the contract says this input raises a ValueError."""

    def judge(expected, got):
        if got == "ValueError":
            return None
        if got == "":
            return f"{what} must raise a ValueError, but the function returned normally"
        return f"{what} must raise a ValueError (with a message saying what is wrong), not {got}"

    return judge


def _gradient_of_metric(fn, logits, *args):
    """Call the metric with logits that require gradients; return (its value, d value / d logits or None)."""
    logits = logits.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        value = fn(logits, *args)
        if not isinstance(value, torch.Tensor) or not value.requires_grad:
            return value, None
        (grad,) = torch.autograd.grad(value, logits)
    return value.detach(), grad


def _judge_gradient(expected, got):
    """The metric's value and its gradient with respect to the logits must both match the reference's."""
    from ..grading.compare import compare  # lazy: grading imports the exercise specs

    value, grad = got if isinstance(got, tuple) and len(got) == 2 else (got, None)
    msg = compare(expected[0], value, 1e-4, 1e-5)
    if msg:
        return "the value: " + msg
    if grad is None:
        return (
            "the value is right but it is not differentiable with respect to the logits (it comes back detached: "
            "passed through .item() or float() and made a tensor again?). Attribution patching takes its gradient."
        )
    msg = compare(expected[1], grad, 1e-4, 1e-5)
    return "the gradient with respect to the logits: " + msg if msg else None


@functools.cache
def _tiny_model(n_layers: int = 2, seed: int = 0):
    """A small random HookedTransformer (3 heads, vocabulary of 11): cheap cases with other shapes."""
    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=24,
        d_head=8,
        n_heads=3,
        d_mlp=48,
        n_ctx=16,
        d_vocab=11,
        act_fn="gelu",
        normalization_type="LN",
        seed=seed,
        initializer_range=0.4,
        device="cpu",
    )
    with quiet_transformer_lens():
        model = HookedTransformer(cfg)
    model.eval()
    return model


def _plain_metric(answer: torch.Tensor, wrong: torch.Tensor):
    """The mean (un-normalised) logit difference: a simple differentiable metric."""

    def metric(logits):
        return logit_diff(logits, answer, wrong).mean()

    return metric


def _tiny_pair(n_layers: int, batch: int, n_pos: int, seed: int):
    """(model, source tokens, target tokens, metric) on a random tiny model; the metric compares the
    target run's favourite final token with its least favourite one, so it is far from zero."""
    model = _tiny_model(n_layers, seed)
    g = gen(100 + seed)
    source = torch.randint(0, 11, (batch, n_pos), generator=g)
    target = torch.randint(0, 11, (batch, n_pos), generator=g)
    with torch.no_grad():
        final = model(target)[:, -1]
    return model, source, target, _plain_metric(final.argmax(-1), final.argmin(-1))


@functools.cache
def _ioi(corruption: str = "swap_names", n: int = 4, seed: int = 0):
    model = shared_model()
    pairs = sol.ioi_pairs(model, pairs_lib.sample_ioi_prompts(n, seed=seed, template=0), corruption)
    return pairs, patching.logit_diff_metric(model, pairs)


@functools.cache
def _induction(corruption: str = "answer", n: int = 4, seed: int = 0):
    model = shared_model()
    seqs, reps = pairs_lib.sample_induction_prompts(n, 8, seed=seed, model=model)
    pairs = sol.induction_pairs(model, seqs, 5, reps, corruption)
    return pairs, patching.logit_diff_metric(model, pairs)


# --- ioi_pairs -------------------------------------------------------------------------------

HAND_PROMPT = dict(
    template=pairs_lib.ioi_templates()[0], A="Alice", B="Bob", S="Bob", IO="Alice", C="Carol", place="park", obj="ball"
)
HAND_BABA = dict(
    template=pairs_lib.ioi_templates()[2], A="Eve", B="Dave", S="Eve", IO="Dave", C="Uma", place="zoo", obj="key"
)


def _ioi_pairs_cases():
    model = shared_model()
    cases = [Case(f"one hand-made ABBA prompt, {c}", (model, [HAND_PROMPT], c)) for c in pairs_lib.IOI_CORRUPTIONS]
    cases.append(Case("one hand-made BABA prompt of another template, swap_names", (model, [HAND_BABA], "swap_names")))
    for seed, c in [(1, "swap_names"), (2, "swap_template"), (3, "third_name")]:
        prompts = pairs_lib.sample_ioi_prompts(6, seed=seed, template=seed)
        cases.append(Case(f"6 sampled TinyWorld prompts (template {seed}), {c}", (model, prompts, c)))
    bpe = _bpe_model()
    cases.append(
        Case(
            "a BPE tokenizer (GPT-2-shaped stand-in), where ' Alice' and 'Alice' are different tokens, third_name",
            (bpe, pairs_lib.sample_ioi_prompts(4, seed=4, template=0, model=bpe), "third_name"),
        )
    )
    short, long = (
        pairs_lib.sample_ioi_prompts(1, seed=5, template=2),
        pairs_lib.sample_ioi_prompts(1, seed=5, template=3),
    )
    cases.append(
        Case(
            "property: prompts of two templates of different lengths raise ValueError",
            (model, short + long, "swap_names"),
            call=_raised,
            judge=_must_raise("prompts that tokenize to different lengths"),
        )
    )
    cases.append(
        Case(
            "property: an unknown corruption raises ValueError",
            (model, [HAND_PROMPT], "swap_everything"),
            call=_raised,
            judge=_must_raise("an unknown corruption"),
        )
    )
    return cases


def _ioi_first_clause_only(model, prompts, corruption="third_name"):
    if corruption == "third_name":
        return sol.ioi_pairs(model, prompts, corruption)
    swapped = [dict(p, A=p["B"], B=p["A"]) for p in prompts]
    out = sol.ioi_pairs(model, prompts, "third_name")
    out["corrupted"] = sol.ioi_pairs(model, swapped, "third_name")["clean"]
    return out


def _ioi_replaced_subject(model, prompts, corruption="third_name"):
    if corruption != "third_name":
        return sol.ioi_pairs(model, prompts, corruption)
    renamed = [dict(p, **{("A" if p["S"] == p["A"] else "B"): p["C"]}) for p in prompts]
    out = sol.ioi_pairs(model, prompts, corruption)
    out["corrupted"] = sol.ioi_pairs(model, renamed, corruption)["clean"]
    return out


def _ioi_swapped_answer(model, prompts, corruption="third_name"):
    out = sol.ioi_pairs(model, prompts, corruption)
    return dict(out, answer=out["wrong"], wrong=out["answer"])


def _ioi_no_bos(model, prompts, corruption="third_name"):
    out = sol.ioi_pairs(model, prompts, corruption)
    return dict(out, clean=out["clean"][:, 1:], corrupted=out["corrupted"][:, 1:])


def _ioi_bare_names(model, prompts, corruption="third_name"):
    out = sol.ioi_pairs(model, prompts, corruption)
    first = {"answer": "IO", "wrong": "S"}
    return dict(
        out,
        **{
            k: torch.tensor([model.to_tokens(p[v], prepend_bos=False)[0, 0].item() for p in prompts])
            for k, v in first.items()
        },
    )


def _ioi_no_length_check(model, prompts, corruption="third_name"):
    if corruption not in pairs_lib.IOI_CORRUPTIONS:
        raise ValueError(f"unknown corruption {corruption!r}")
    try:
        return sol.ioi_pairs(model, prompts, corruption)
    except ValueError:
        return {}


register(
    "ioi_pairs",
    CHAPTER,
    sol.ioi_pairs,
    _ioi_pairs_cases,
    mistakes=[
        Mistake(
            "answer and wrong swapped",
            _ioi_swapped_answer,
            "The right answer is the indirect object (IO, the name said once); the wrong one is the subject "
            "S (the repeated name). Keep the clean prompt's two names for both runs.",
        ),
        Mistake(
            "first clause only",
            _ioi_first_clause_only,
            "Swapping A and B only in the first clause leaves the answer unchanged (an ABBA prompt becomes a "
            "BABA prompt with the same IO). swap_names exchanges the names everywhere, including the subject "
            "of the final clause; swap_template makes the final clause's subject the IO.",
        ),
        Mistake(
            "third name replaces the subject",
            _ioi_replaced_subject,
            "third_name replaces the indirect object (the name mentioned once, in the first clause) by C; "
            "the subject S keeps both of its mentions.",
        ),
        Mistake(
            "no <bos>",
            _ioi_no_bos,
            "Tokenize with model.to_tokens, which prepends the <bos> token; the model was trained with it.",
        ),
        Mistake(
            "names without their leading space",
            _ioi_bare_names,
            "A name that is the next word of a sentence is a different token from the bare name for a BPE "
            "tokenizer: take the token of ' ' + name (model.to_single_token(' ' + name)).",
        ),
        Mistake(
            "no length check",
            _ioi_no_length_check,
            "Check that every clean and corrupted text has the same number of tokens and raise a ValueError "
            "(saying so) when they do not: patching compares positions.",
        ),
    ],
)


# --- induction_pairs -----------------------------------------------------------------------------

HAND_SEQ = ["cat", "Paris", "ball", "red", "kitchen"]


def _induction_cases():
    model = shared_model()
    hand = ["cat", "Paris", "ball", "kitchen", "doctor"]
    cases = [
        Case("one hand-made sequence, cut 2, answer", (model, [hand], 2, ["zoo"], "answer")),
        Case("one hand-made sequence, cut 2, match", (model, [hand], 2, ["zoo"], "match")),
        Case("cut 1 (only the first word repeats), match", (model, [hand], 1, ["zoo"], "match")),
    ]
    for seed, (length, cut, corruption) in enumerate([(8, 5, "answer"), (12, 3, "match"), (6, 4, "match")]):
        seqs, reps = pairs_lib.sample_induction_prompts(5, length, seed=seed)
        cases.append(
            Case(
                f"5 sampled sequences of {length} words, cut {cut}, {corruption}", (model, seqs, cut, reps, corruption)
            )
        )
    bpe = _bpe_model()
    seqs, reps = pairs_lib.sample_induction_prompts(3, 6, seed=7, model=bpe)
    cases.append(
        Case(
            "a BPE tokenizer (GPT-2-shaped stand-in), words with their leading space, cut 3, answer",
            (bpe, seqs, 3, reps, "answer"),
        )
    )
    cases.append(
        Case(
            "property: cut = n (nothing left to predict) raises ValueError",
            (model, [hand], 5, ["zoo"], "answer"),
            call=_raised,
            judge=_must_raise("a cut outside 1 <= cut < n"),
        )
    )
    return cases


def _ind_off_by_one(model, sequences, cut, replacements, corruption="answer"):
    out = sol.induction_pairs(model, sequences, cut, replacements, corruption)
    return dict(out, answer=out["clean"][:, 1 + cut - 1].clone())


def _ind_mixed_up(model, sequences, cut, replacements, corruption="answer"):
    other = {"answer": "match", "match": "answer"}[corruption]
    return sol.induction_pairs(model, sequences, cut, replacements, other)


def _ind_second_copy(model, sequences, cut, replacements, corruption="answer"):
    out = sol.induction_pairs(model, sequences, cut, replacements, corruption)
    if corruption == "match":
        bad = out["clean"].clone()
        bad[:, -1] = out["wrong"]
        out = dict(out, corrupted=bad)
    return out


def _ind_no_bos(model, sequences, cut, replacements, corruption="answer"):
    out = sol.induction_pairs(model, sequences, cut, replacements, corruption)
    return dict(out, clean=out["clean"][:, 1:], corrupted=out["corrupted"][:, 1:])


def _ind_bare_words(model, sequences, cut, replacements, corruption="answer"):
    def bare(word):
        return model.to_tokens(word, prepend_bos=False)[0, 0].item()

    bos = model.tokenizer.bos_token_id
    clean, corrupted, answer, wrong = [], [], [], []
    for seq, r in zip(sequences, replacements, strict=True):
        ids = [bare(w) for w in seq]
        first = list(ids)
        first[cut if corruption == "answer" else cut - 1] = bare(r)
        clean.append([bos] + ids + ids[:cut])
        corrupted.append([bos] + first + ids[:cut])
        answer.append(ids[cut])
        wrong.append(bare(r))
    return {k: torch.tensor(v) for k, v in dict(clean=clean, corrupted=corrupted, answer=answer, wrong=wrong).items()}


register(
    "induction_pairs",
    CHAPTER,
    sol.induction_pairs,
    _induction_cases,
    mistakes=[
        Mistake(
            "answer off by one",
            _ind_off_by_one,
            "The prompt ends with x_{cut-1}; induction predicts the word that FOLLOWED it the first time, "
            "x_cut (sequences[b][cut]).",
        ),
        Mistake(
            "corruptions mixed up",
            _ind_mixed_up,
            "'answer' replaces x_cut in the first copy (so induction copies r instead); 'match' replaces "
            "x_{cut-1}, the earlier copy of the current word (so there is nothing to match).",
        ),
        Mistake(
            "corrupted the second copy",
            _ind_second_copy,
            "Corrupt the FIRST copy of the sequence: the final word stays x_{cut-1} so both runs ask the "
            "same question; only what the earlier context says about it changes.",
        ),
        Mistake(
            "no <bos>", _ind_no_bos, "Start every prompt with model.tokenizer.bos_token_id, as model.to_tokens would."
        ),
        Mistake(
            "words without their leading space",
            _ind_bare_words,
            "Each word of the sequence follows another word, so for a BPE tokenizer it is the token of ' ' + word "
            "(model.to_single_token(' ' + word)), not the token that starts the bare word.",
        ),
    ],
)


# --- normalised_logit_diff ------------------------------------------------------------------------


def _nld_cases():
    model = shared_model()
    g = gen(5)
    cases = [
        Case(
            "one prompt, vocabulary 3: clean gives 1",
            (torch.tensor([[[0.0, 0.0, 0.0], [2.0, -1.0, 0.5]]]), torch.tensor([0]), torch.tensor([1]), 3.0, -1.0),
        ),
        Case(
            "one prompt, halfway between",
            (torch.tensor([[[0.0, 1.0, 0.0, 0.0]]]), torch.tensor([1]), torch.tensor([3]), 3.0, -1.0),
        ),
        Case(
            "random: batch 6, 4 positions, vocabulary 9",
            (
                torch.randn(6, 4, 9, generator=g) * 3,
                torch.randint(0, 9, (6,), generator=g),
                torch.randint(0, 9, (6,), generator=g),
                2.5,
                0.5,
            ),
        ),
    ]
    for corruption in ("swap_names", "third_name"):
        pairs, metric = _ioi(corruption)
        with torch.no_grad():
            logits = model(pairs["clean"][:, :])
            logits_corrupted = model(pairs["corrupted"])
        args = (pairs["answer"], pairs["wrong"], metric.clean_ld, metric.corrupted_ld)
        cases.append(Case(f"TinyWorld IOI clean run ({corruption})", (logits,) + args))
        cases.append(Case(f"TinyWorld IOI corrupted run ({corruption})", (logits_corrupted,) + args))
    random_args = cases[2].args
    cases.append(
        Case(
            "behaviour: differentiable with respect to the logits (random batch 6, the gradient compared)",
            random_args,
            call=_gradient_of_metric,
            judge=_judge_gradient,
        )
    )
    pairs, metric = _ioi("third_name")
    with torch.no_grad():
        logits = model(pairs["corrupted"])
    cases.append(
        Case(
            "behaviour: differentiable on the TinyWorld IOI corrupted run (third_name), where attribution uses it",
            (logits, pairs["answer"], pairs["wrong"], metric.clean_ld, metric.corrupted_ld),
            call=_gradient_of_metric,
            judge=_judge_gradient,
        )
    )
    cases.append(Case("behaviour: works under torch.no_grad() (random batch 6)", random_args, call=under_no_grad))
    cases.append(
        Case(
            "float64 logits (random batch 6): any floating dtype is accepted",
            (random_args[0].double(),) + random_args[1:],
        )
    )
    return cases


def _nld_detached(logits, answer, wrong, clean_ld, corrupted_ld):
    return torch.tensor(sol.normalised_logit_diff(logits, answer, wrong, clean_ld, corrupted_ld).item())


def _nld_first_position(logits, answer, wrong, clean_ld, corrupted_ld):
    return sol.normalised_logit_diff(logits[:, :1], answer, wrong, clean_ld, corrupted_ld)


register(
    "normalised_logit_diff",
    CHAPTER,
    sol.normalised_logit_diff,
    _nld_cases,
    mistakes=[
        Mistake.edit(
            "not normalised",
            sol.normalised_logit_diff,
            "return (ld - corrupted_ld) / (clean_ld - corrupted_ld)",
            "return ld",
            "Rescale the mean logit difference: subtract corrupted_ld and divide by (clean_ld - corrupted_ld), "
            "so the clean run scores 1 and the corrupted run 0.",
        ),
        Mistake.edit(
            "no baseline",
            sol.normalised_logit_diff,
            "return (ld - corrupted_ld) / (clean_ld - corrupted_ld)",
            "return ld / clean_ld",
            "Dividing by clean_ld makes the clean run 1 but not the corrupted run 0: subtract corrupted_ld "
            "first (and divide by clean_ld - corrupted_ld).",
        ),
        Mistake.edit(
            "upside down",
            sol.normalised_logit_diff,
            "return (ld - corrupted_ld) / (clean_ld - corrupted_ld)",
            "return (ld - clean_ld) / (corrupted_ld - clean_ld)",
            "That is 1 minus the answer: the clean run must give 1 and the corrupted run 0.",
        ),
        Mistake.edit(
            "sum over the batch",
            sol.normalised_logit_diff,
            ".mean()",
            ".sum()",
            "Average the logit difference over the prompts (mean), don't sum: clean_ld and corrupted_ld are means.",
        ),
        Mistake(
            "passed through .item()",
            _nld_detached,
            "The number is right, but a tensor rebuilt from .item() (or float()) has lost its link to the logits: "
            "attribution patching needs the gradient. Compute the result with tensor operations only.",
        ),
        Mistake(
            "first position",
            _nld_first_position,
            "The next token is predicted at the FINAL position: read the logits at position -1.",
        ),
    ],
)


# --- patching sweeps --------------------------------------------------------------------------------


def _ioi_sweep_case(label: str, corruption: str, direction: str, component: str, n: int = 4):
    pairs, metric = _ioi(corruption, n)
    source, target = (
        (pairs["clean"], pairs["corrupted"]) if direction == "denoising" else (pairs["corrupted"], pairs["clean"])
    )
    return Case(
        f"TinyWorld IOI ({corruption}), {direction}, {component}: {label}",
        (shared_model(), source, target, metric, component),
    )


def _tiny_sweep_case(label: str, n_layers: int, batch: int, n_pos: int, seed: int, component: str):
    model, source, target, metric = _tiny_pair(n_layers, batch, n_pos, seed)
    return Case(
        f"random {n_layers}-layer model, {batch} prompt(s) x {n_pos} positions, {component}: {label}",
        (model, source, target, metric, component),
    )


def _layer_pos_cases():
    return [
        _tiny_sweep_case("edge case", 1, 1, 3, 0, "resid_pre"),
        _tiny_sweep_case("seeded", 2, 3, 5, 1, "resid_pre"),
        _tiny_sweep_case("seeded", 2, 2, 4, 2, "mlp_out"),
        _ioi_sweep_case("the residual stream", "swap_names", "denoising", "resid_pre"),
        _ioi_sweep_case("attention output", "swap_template", "denoising", "attn_out"),
        _ioi_sweep_case("MLP output", "third_name", "noising", "mlp_out"),
        _no_grad(_ioi_sweep_case("the residual stream", "third_name", "denoising", "resid_mid")),
    ]


def _no_grad(case: Case) -> Case:
    """The same case, called with gradients turned off (as the chapter's notebook runs every sweep)."""
    return Case("behaviour: works under torch.no_grad(), " + case.label, case.args, case.kwargs, call=under_no_grad)


def _unpatched(model, source_tokens, target_tokens, metric, shape):
    with torch.no_grad():
        value = metric(model(target_tokens)).detach().float().cpu()
    return value.expand(shape).clone()


def _lp_swapped(model, source_tokens, target_tokens, metric, component="resid_pre"):
    return sol.patch_layer_pos_sweep(model, target_tokens, source_tokens, metric, component)


def _lp_no_return(model, source_tokens, target_tokens, metric, component="resid_pre"):
    return _unpatched(model, source_tokens, target_tokens, metric, (model.cfg.n_layers, target_tokens.shape[1]))


def _lp_post(model, source_tokens, target_tokens, metric, component="resid_pre"):
    return sol.patch_layer_pos_sweep(
        model, source_tokens, target_tokens, metric, "resid_post" if component == "resid_pre" else component
    )


def _lp_all_positions(model, source_tokens, target_tokens, metric, component="resid_pre"):
    names = [act_name(component, layer) for layer in range(model.cfg.n_layers)]
    source = patching.cache_activations(model, source_tokens, names)
    per_layer = patching.run_patches(model, target_tokens, source, [(n, (slice(None),)) for n in names], metric)
    return per_layer[:, None].expand(-1, target_tokens.shape[1]).clone()


register(
    "patch_layer_pos_sweep",
    CHAPTER,
    sol.patch_layer_pos_sweep,
    _layer_pos_cases,
    mistakes=[
        Mistake(
            "source and target swapped",
            _lp_swapped,
            "Run the model on target_tokens and paste in activations cached from source_tokens (denoising: "
            "source = clean, target = corrupted), not the other way round.",
        ),
        Mistake(
            "hook does not return the patch",
            _lp_no_return,
            "Every value equals the unpatched target run: your hook edits a copy and returns nothing. A hook "
            "must return the edited activation (or edit it in place).",
        ),
        Mistake(
            "resid_post instead of resid_pre",
            _lp_post,
            "Off by one layer: blocks.{l}.hook_resid_pre is the INPUT of block l (for l = 0, the embeddings); "
            "hook_resid_post is its output.",
        ),
        Mistake(
            "every position at once",
            _lp_all_positions,
            "Patch one position at a time: act[:, pos] = source_act[:, pos], not the whole sequence.",
        ),
    ],
    **SWEEP_TOL,
)


def _head_cases():
    return [
        _tiny_sweep_case("edge case", 1, 1, 3, 3, "z"),
        _tiny_sweep_case("seeded", 2, 3, 5, 4, "pattern"),
        _tiny_sweep_case("seeded", 2, 2, 4, 5, "v"),
        _ioi_sweep_case("head outputs", "swap_names", "denoising", "z"),
        _ioi_sweep_case("head outputs", "third_name", "noising", "z"),
        _ioi_sweep_case("queries", "swap_template", "denoising", "q"),
        _ioi_sweep_case("keys", "swap_names", "denoising", "k"),
        _ioi_sweep_case("attention patterns", "swap_template", "noising", "pattern"),
        _no_grad(_ioi_sweep_case("values", "third_name", "denoising", "v")),
    ]


def _heads_swapped(model, source_tokens, target_tokens, metric, component="z"):
    return sol.patch_head_sweep(model, target_tokens, source_tokens, metric, component)


def _heads_wrong_axis(model, source_tokens, target_tokens, metric, component="z"):
    names = [act_name(component, layer) for layer in range(model.cfg.n_layers)]
    source = patching.cache_activations(model, source_tokens, names)
    index = (lambda h: (slice(None), h)) if component == "pattern" else (lambda h: (h,))
    heads = min(model.cfg.n_heads, target_tokens.shape[1])
    patches = [(n, index(h)) for n in names for h in range(model.cfg.n_heads)]
    out = torch.full((len(patches),), float("nan"))
    ok = [i for i, (_, idx) in enumerate(patches) if idx[-1] < heads]
    out[ok] = patching.run_patches(model, target_tokens, source, [patches[i] for i in ok], metric)
    return out.reshape(model.cfg.n_layers, model.cfg.n_heads)


def _heads_whole_layer(model, source_tokens, target_tokens, metric, component="z"):
    names = [act_name(component, layer) for layer in range(model.cfg.n_layers)]
    source = patching.cache_activations(model, source_tokens, names)
    per_layer = patching.run_patches(model, target_tokens, source, [(n, (slice(None),)) for n in names], metric)
    return per_layer[:, None].expand(-1, model.cfg.n_heads).clone()


def _heads_no_return(model, source_tokens, target_tokens, metric, component="z"):
    return _unpatched(model, source_tokens, target_tokens, metric, (model.cfg.n_layers, model.cfg.n_heads))


register(
    "patch_head_sweep",
    CHAPTER,
    sol.patch_head_sweep,
    _head_cases,
    mistakes=[
        Mistake(
            "source and target swapped",
            _heads_swapped,
            "Run the model on target_tokens and paste in activations cached from source_tokens, not the "
            "other way round.",
        ),
        Mistake(
            "head on the wrong axis",
            _heads_wrong_axis,
            "Mind the layouts: hook_z, hook_q, hook_k and hook_v are [batch, pos, head, d_head] (head = axis "
            "2), hook_pattern is [batch, head, query, key] (head = axis 1).",
        ),
        Mistake(
            "whole layer",
            _heads_whole_layer,
            "Patch one head at a time (act[:, :, head] or, for patterns, act[:, head]), not every head of the layer.",
        ),
        Mistake(
            "hook does not return the patch",
            _heads_no_return,
            "Every value equals the unpatched target run: your hook must return the edited activation (or "
            "edit it in place).",
        ),
    ],
    **SWEEP_TOL,
)


def _head_pos_cases():
    return [
        _tiny_sweep_case("edge case", 1, 1, 2, 6, "z"),
        _tiny_sweep_case("seeded", 2, 3, 5, 7, "pattern"),
        _tiny_sweep_case("seeded", 2, 2, 4, 8, "q"),
        _tiny_sweep_case("seeded", 2, 2, 3, 9, "v"),
        _ioi_sweep_case("head outputs by position", "swap_names", "denoising", "z", n=2),
        _ioi_sweep_case("patterns by query position", "swap_template", "noising", "pattern", n=2),
        _no_grad(_ioi_sweep_case("keys by position", "third_name", "denoising", "k", n=2)),
    ]


def _hp_swapped(model, source_tokens, target_tokens, metric, component="z"):
    return sol.patch_head_pos_sweep(model, target_tokens, source_tokens, metric, component)


def _hp_key_pos(model, source_tokens, target_tokens, metric, component="z"):
    if component != "pattern":
        return sol.patch_head_pos_sweep(model, source_tokens, target_tokens, metric, component)
    names = [act_name(component, layer) for layer in range(model.cfg.n_layers)]
    source = patching.cache_activations(model, source_tokens, names)
    n_pos, n_heads = target_tokens.shape[1], model.cfg.n_heads
    patches = [(n, (h, slice(None), p)) for n in names for p in range(n_pos) for h in range(n_heads)]
    return patching.run_patches(model, target_tokens, source, patches, metric).reshape(
        model.cfg.n_layers, n_pos, n_heads
    )


def _hp_transposed(model, source_tokens, target_tokens, metric, component="z"):
    return sol.patch_head_pos_sweep(model, source_tokens, target_tokens, metric, component).transpose(1, 2).contiguous()


def _hp_all_positions(model, source_tokens, target_tokens, metric, component="z"):
    per_head = sol.patch_head_sweep(model, source_tokens, target_tokens, metric, component)
    return per_head[:, None].expand(-1, target_tokens.shape[1], -1).clone()


register(
    "patch_head_pos_sweep",
    CHAPTER,
    sol.patch_head_pos_sweep,
    _head_pos_cases,
    mistakes=[
        Mistake(
            "source and target swapped",
            _hp_swapped,
            "Run the model on target_tokens and paste in activations cached from source_tokens, not the "
            "other way round.",
        ),
        Mistake(
            "pattern by key position",
            _hp_key_pos,
            "For the pattern, 'position' is the QUERY (destination) position: patch act[:, head, pos, :], "
            "the row saying where the head looks from pos, not the column act[:, head, :, pos].",
        ),
        Mistake(
            "[layer, head, pos] layout",
            _hp_transposed,
            "Return [layer, pos, head] for every component (TransformerLens's pattern sweep is [layer, head, "
            "pos]; this exercise uses one layout).",
        ),
        Mistake(
            "all positions at once",
            _hp_all_positions,
            "Patch the head at ONE position per patch (act[:, pos, head]), not at every position.",
        ),
    ],
    **SWEEP_TOL,
)


# --- path_patch ------------------------------------------------------------------------------------


def _path_cases():
    model = shared_model()
    cases = []
    for seed, (receivers, inp) in enumerate([([(2, 0)], "q"), ([(2, 1), (2, 2)], "k"), ([(2, 2)], "v"), (None, "q")]):
        m, source, target, metric = _tiny_pair(3, 3, 5, 10 + seed)
        cases.append(
            Case(
                f"random 3-layer model, sender L0H{seed % 3}, receivers {receivers} ({inp})",
                (m, source, target, metric, (0, seed % 3), receivers, inp),
            )
        )
    pairs, metric = _ioi("third_name")
    for sender, receivers, inp in [
        ((1, 0), [(3, 0), (3, 1), (3, 2), (3, 3)], "q"),
        ((0, 1), [(2, 0), (2, 1)], "k"),
        ((2, 2), None, "q"),
    ]:
        cases.append(
            Case(
                f"TinyWorld IOI (third_name), noising, sender L{sender[0]}H{sender[1]}, receivers {receivers} ({inp})",
                (model, pairs["corrupted"], pairs["clean"], metric, sender, receivers, inp),
            )
        )
    cases.append(
        Case(
            "behaviour: works under torch.no_grad(), TinyWorld IOI (third_name), sender L0H2, receivers the values "
            "of L1H1, L1H3, L2H3",
            (model, pairs["corrupted"], pairs["clean"], metric, (0, 2), [(1, 1), (1, 3), (2, 3)], "v"),
            call=under_no_grad,
        )
    )
    cases.append(
        Case(
            "property: a receiver in the sender's own layer raises ValueError",
            (model, pairs["corrupted"], pairs["clean"], metric, (1, 0), [(1, 2)], "q"),
            call=_raised,
            judge=_must_raise("a receiver that is not in a later layer than the sender"),
        )
    )
    return cases


def _pp_qkv(model, source_tokens, target_tokens, metric, sender, receivers, receiver_input="q"):
    patching.validate_path(model, sender, receivers, receiver_input)
    if receivers is None:
        return sol.path_patch(model, source_tokens, target_tokens, metric, sender, receivers, receiver_input)
    # step 1 for all three inputs, then patch all of them
    stored = {}
    for inp in ("q", "k", "v"):
        stored[inp] = _path_inputs(model, source_tokens, target_tokens, sender, receivers, inp)

    def patch(act, hook):
        inp = hook.name.split("hook_")[-1]
        layer = hook.layer()
        act = act.clone()
        for r_layer, r_head in receivers:
            if r_layer == layer:
                act[:, :, r_head] = stored[inp][hook.name][:, :, r_head]
        return act

    names = [n for inp in ("q", "k", "v") for n in stored[inp]]
    with torch.no_grad():
        return metric(model.run_with_hooks(target_tokens, fwd_hooks=[(n, patch) for n in names])).item()


def _path_inputs(model, source_tokens, target_tokens, sender, receivers, receiver_input):
    """Step 1 of path patching: the receivers' inputs with the sender patched and other heads frozen."""
    s_layer, s_head = sender
    z_names = [act_name("z", layer) for layer in range(model.cfg.n_layers)]
    target_z = patching.cache_activations(model, target_tokens, z_names)
    source_z = patching.cache_activations(model, source_tokens, z_names)

    def freeze(z, hook):
        new = target_z[hook.name].clone()
        if hook.name == z_names[s_layer]:
            new[:, :, s_head] = source_z[hook.name][:, :, s_head]
        return new

    names = sorted({act_name(receiver_input, layer) for layer, _ in receivers})
    stored = {}

    def store(act, hook):
        stored[hook.name] = act.clone()

    with torch.no_grad():
        model.run_with_hooks(target_tokens, fwd_hooks=[(n, freeze) for n in z_names] + [(n, store) for n in names])
    return stored


def _pp_swapped(model, source_tokens, target_tokens, metric, sender, receivers, receiver_input="q"):
    return sol.path_patch(model, target_tokens, source_tokens, metric, sender, receivers, receiver_input)


register(
    "path_patch",
    CHAPTER,
    sol.path_patch,
    _path_cases,
    mistakes=[
        Mistake.edit(
            "no validation",
            sol.path_patch,
            "validate_path(model, sender, receivers, receiver_input)",
            "pass",
            "Check the arguments first and raise a ValueError saying what is wrong: a receiver must be in a "
            "later layer than the sender (a head cannot send to its own layer or an earlier one).",
        ),
        Mistake.edit(
            "other heads not frozen",
            sol.path_patch,
            "new = target_z[hook.name].clone()",
            "new = z.clone()",
            "In the first run, hold every head other than the sender at its value on the target run (patch "
            "hook_z of every layer). Otherwise the sender's effect also reaches the receivers through the "
            "heads in between, and you measure more than the direct path.",
        ),
        Mistake(
            "patched q, k and v",
            _pp_qkv,
            "Patch only the receivers' input named by receiver_input (hook_q, hook_k or hook_v): asking "
            "whether the sender acts through the receivers' queries is a different question from keys.",
        ),
        Mistake.edit(
            "every head of the receivers' layer",
            sol.path_patch,
            "act[:, :, r_head] = stored[hook.name][:, :, r_head]",
            "act[:] = stored[hook.name]",
            "In the last run patch only the receiver heads' slice, act[:, :, head] for each receiver; the "
            "other heads of that layer must read their normal input.",
        ),
        Mistake(
            "source and target swapped",
            _pp_swapped,
            "The sender's output comes from source_tokens; the model runs on target_tokens.",
        ),
    ],
    rtol=1e-3,
    atol=1e-4,
)


# --- attribution_patch -------------------------------------------------------------------------


def _attr_cases():
    model = shared_model()
    cases = []
    for seed, component in enumerate(["z", "resid_pre"]):
        m, source, target, metric = _tiny_pair(2, 2, 4, 20 + seed)
        cases.append(
            Case(f"random 2-layer model, 2 prompts x 4 positions, {component}", (m, source, target, metric, component))
        )
    for corruption, component in [
        ("swap_names", "z"),
        ("third_name", "resid_pre"),
        ("swap_template", "mlp_out"),
        ("swap_names", "v"),
    ]:
        pairs, metric = _ioi(corruption)
        cases.append(
            Case(
                f"TinyWorld IOI ({corruption}), {component}",
                (model, pairs["clean"], pairs["corrupted"], metric, component),
            )
        )
    pairs, metric = _induction("answer")
    cases.append(Case("TinyWorld induction (answer), z", (model, pairs["clean"], pairs["corrupted"], metric, "z")))
    pairs, metric = _ioi("third_name")
    cases.append(
        Case(
            "behaviour: works under torch.no_grad() (as in the notebook), TinyWorld IOI (third_name), z",
            (model, pairs["clean"], pairs["corrupted"], metric, "z"),
            call=_without_grad,
            judge=_judge_without_grad,
        )
    )
    return cases


def _without_grad(fn, *args, **kwargs):
    """Call fn with gradients turned off by the caller; an error comes back as its name (so it can be judged)."""
    with torch.no_grad():
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - the case is about whether it raises
            return f"{type(e).__name__}: {e}"


def _judge_without_grad(expected, got):
    from ..grading.compare import compare  # lazy: grading imports the exercise specs

    if isinstance(got, str):
        return (
            f"with gradients turned off by the caller (torch.no_grad(), as the chapter runs), your function raised "
            f"{got.splitlines()[0][:200]}; it must turn them on where it needs them"
        )
    return compare(expected, got, 1e-3, 1e-4)


def _attr_clean_grad(model, clean_tokens, corrupted_tokens, metric, component="z"):
    """Gradient taken on the clean run instead of the corrupted one."""
    names = [act_name(component, layer) for layer in range(model.cfg.n_layers)]
    corrupted = patching.cache_activations(model, corrupted_tokens, names)
    acts = {}

    def keep(act, hook):
        acts[hook.name] = act

    with torch.enable_grad():
        value = metric(model.run_with_hooks(clean_tokens, fwd_hooks=[(n, keep) for n in names]))
        grads = torch.autograd.grad(value, [acts[n] for n in names])
    return torch.stack([((acts[n].detach() - corrupted[n]) * g).sum((0, -1)) for n, g in zip(names, grads)]).float()


def _attr_sign(model, clean_tokens, corrupted_tokens, metric, component="z"):
    return -sol.attribution_patch(model, clean_tokens, corrupted_tokens, metric, component)


def _attr_over_positions(model, clean_tokens, corrupted_tokens, metric, component="z"):
    return sol.attribution_patch(model, clean_tokens, corrupted_tokens, metric, component).sum(1)


register(
    "attribution_patch",
    CHAPTER,
    sol.attribution_patch,
    _attr_cases,
    mistakes=[
        Mistake(
            "gradient on the clean run",
            _attr_clean_grad,
            "Take the gradient on the CORRUPTED run: the estimate is a Taylor expansion around the run you "
            "patch into, f(corrupted + delta) ~ f(corrupted) + delta . grad f(corrupted).",
        ),
        Mistake(
            "sign",
            _attr_sign,
            "The activation difference is clean minus corrupted (where you go to, minus where you start).",
        ),
        Mistake.edit(
            "gradient only",
            sol.attribution_patch,
            "(delta * grad).sum(",
            "grad.sum(",
            "Multiply the gradient by the activation difference (clean - corrupted) before summing: the "
            "gradient alone says how sensitive the metric is, not how much this patch would change it.",
        ),
        Mistake.edit(
            "gradients switched off by the caller",
            sol.attribution_patch,
            "with torch.enable_grad():",
            "if True:",
            "The chapter runs with gradients turned off (torch.set_grad_enabled(False)); turn them on for your "
            "forward and backward pass with `with torch.enable_grad():`.",
        ),
        Mistake(
            "summed over positions",
            _attr_over_positions,
            "Keep the position axis: sum the product over the batch and the activation's last axis (d_model "
            "or d_head) only, giving [layer, pos] or [layer, pos, head].",
        ),
    ],
    rtol=1e-3,
    atol=1e-4,
)


# --- circuit_faithfulness ---------------------------------------------------------------------


def _faith_cases():
    model = shared_model()
    cases = []
    for seed, circuit in enumerate([[(1, 0)], [(0, 2), (1, 1), (1, 2)]]):
        m, source, target, _ = _tiny_pair(2, 3, 5, 30 + seed)
        with torch.no_grad():
            final = m(target)[:, -1]
        cases.append(
            Case(
                f"random 2-layer model, circuit {circuit}",
                (m, target, final.argmax(-1), final.argmin(-1), circuit, source),
            )
        )
    pairs, _ = _ioi("third_name")
    for circuit in ([(3, 0), (3, 1), (2, 2)], [(layer, head) for layer in range(4) for head in range(4)], []):
        label = "every head" if len(circuit) == 16 else ("no head" if not circuit else f"{circuit}")
        cases.append(
            Case(
                f"TinyWorld IOI, means over third-name prompts, circuit {label}",
                (model, pairs["clean"], pairs["answer"], pairs["wrong"], circuit, pairs["corrupted"]),
            )
        )
    pairs, _ = _induction("answer")
    cases.append(
        Case(
            "TinyWorld induction, circuit [(0, 1), (1, 2)]",
            (model, pairs["clean"], pairs["answer"], pairs["wrong"], [(0, 1), (1, 2)], pairs["corrupted"]),
        )
    )
    pairs, _ = _ioi("swap_names", n=8, seed=3)
    cases.append(
        Case(
            "behaviour: works under torch.no_grad(); means over 8 other prompts than the 4 evaluated, circuit "
            "[(0, 1), (1, 1)]",
            (
                model,
                _ioi("swap_names")[0]["clean"],
                _ioi("swap_names")[0]["answer"],
                _ioi("swap_names")[0]["wrong"],
                [(0, 1), (1, 1)],
                pairs["clean"],
            ),
            call=under_no_grad,
        )
    )
    cases.append(
        Case(
            "property: a head that is not in the model raises ValueError",
            (model, pairs["clean"], pairs["answer"], pairs["wrong"], [(0, 1), (4, 0)], pairs["corrupted"]),
            call=_raised,
            judge=_must_raise("a circuit naming a head the model does not have (L4H0 of a 4-layer model)"),
        )
    )
    return cases


def _ablated_ratio(model, tokens, answer, wrong, ablate_heads, value_of):
    """ld with the heads `ablate_heads` replaced by value_of(hook_name) [.., head, d_head], over ld of the model."""

    def hook(z, hook):
        layer = hook.layer()
        z = z.clone()
        for l, h in ablate_heads:
            if l == layer:
                z[:, :, h] = value_of(hook.name, z)[..., h, :]
        return z

    names = [act_name("z", layer) for layer in range(model.cfg.n_layers)]
    with torch.no_grad():
        full = logit_diff(model(tokens), answer, wrong).mean()
        kept = logit_diff(model.run_with_hooks(tokens, fwd_hooks=[(n, hook) for n in names]), answer, wrong).mean()
    return (kept / full).item()


def _complement(model, circuit):
    keep = set(map(tuple, circuit))
    return [(l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads) if (l, h) not in keep]


def _means(model, tokens, over=(0,)):
    names = [act_name("z", layer) for layer in range(model.cfg.n_layers)]
    return {n: z.mean(dim=over) for n, z in patching.cache_activations(model, tokens, names).items()}


def _faith_pos_mean(model, tokens, answer, wrong, circuit, mean_tokens):
    means = _means(model, mean_tokens, over=(0, 1))
    return _ablated_ratio(model, tokens, answer, wrong, _complement(model, circuit), lambda n, z: means[n])


register(
    "circuit_faithfulness",
    CHAPTER,
    sol.circuit_faithfulness,
    _faith_cases,
    mistakes=[
        Mistake.edit(
            "zero ablation",
            sol.circuit_faithfulness,
            "z[:, :, head] = means[hook.name][:, head]",
            "z[:, :, head] = 0",
            "Replace the other heads' outputs by their MEAN over mean_tokens, not by zero: zero is an output "
            "no head ever produces, so zero-ablation breaks the model in ways that have nothing to do with "
            "the task.",
        ),
        Mistake.edit(
            "ablated the circuit",
            sol.circuit_faithfulness,
            "if (layer, head) not in keep:",
            "if (layer, head) in keep:",
            "Keep the circuit and mean-ablate every OTHER head (that measures what the circuit does on its own).",
        ),
        Mistake(
            "mean over positions too",
            _faith_pos_mean,
            "Average over the prompts only (dim 0), position by position: a head's typical output at the "
            "final position is not its typical output at <bos>.",
        ),
        Mistake.edit(
            "means over the evaluated prompts",
            sol.circuit_faithfulness,
            "cache_activations(model, mean_tokens, names)",
            "cache_activations(model, tokens, names)",
            "Take the means over mean_tokens (the reference distribution), not over the prompts you evaluate.",
        ),
    ],
    rtol=1e-3,
    atol=1e-4,
)
