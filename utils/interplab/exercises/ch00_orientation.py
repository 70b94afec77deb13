"""Chapter 00 (orientation): warm-up exercises on logits, attention patterns and hooks."""

from __future__ import annotations

from collections import Counter

import torch

from .. import tinyworld
from ..hooks import act_name
from ..paths import chapter_of
from ..solutions import ch00_orientation as sol
from . import Case, Mistake, gen, model_tokens, register, shared_model, under_no_grad

CHAPTER = chapter_of(__name__)


# --- behaviour wrappers (trusted code run instead of fn(*args) on a case) ---------------------


def _raises(fn, *args, **kwargs):
    """What happened when fn was called: 'returned', or the name of the exception it raised."""
    try:
        fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - the point is to see which error the function raises
        return f"raised {type(e).__name__}"
    return "returned"


def _validating(validate, fn):
    """``fn`` with the reference's input validation in front: a mistake that differs from the reference only
    where it is wrong, not also on the inputs that must raise (so each mistake's hint stays its own)."""

    def wrapped(*args, **kwargs):
        validate(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapped


def _must_raise(error: str, what: str):
    """A judge for a case whose input the contract says must raise ``error``."""

    def judge(expected, got):
        if got == f"raised {error}":
            return None
        did = "returned a value" if got == "returned" else got
        return f"{what}: the contract says raise {error}, your function {did}"

    return judge


def _grad_of_first(fn, x, *rest):
    """The gradient that reaches the first argument x from the sum of fn's output times fixed weights."""
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = fn(x, *rest)
        if not isinstance(out, torch.Tensor) or not out.requires_grad:
            return None
        weights = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape)
        (out * weights).sum().backward()
    return x.grad


def _gradient_judge(what: str):
    def judge(expected, got):
        if got is None:
            return (
                f"no gradient reached {what}: your output is cut off from the autograd graph "
                f"(.item(), .tolist(), torch.tensor(...) of values, .detach() or torch.no_grad() inside)"
            )
        if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
            return f"the gradient reaching {what} has the wrong shape"
        if not torch.allclose(got.double(), expected.double(), rtol=1e-4, atol=1e-5):
            return f"the gradient reaching {what} differs from the reference's: some entry is wrong or detached"
        return None

    return judge


# --- per_token_loss -------------------------------------------------------------------


def _loss_cases():
    model = shared_model()
    g = gen(0)
    cases = [
        Case(
            "tiny: batch 1, 2 positions, vocab 3",
            (torch.tensor([[[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]]]), torch.tensor([[0, 2]])),
        ),
        Case(
            "random: batch 3, 7 positions, vocab 11",
            (torch.randn(3, 7, 11, generator=g) * 3, torch.randint(0, 11, (3, 7), generator=g)),
        ),
        Case(
            "uniform logits: every token equally likely, so every loss is log(vocab)",
            (torch.full((2, 4, 6), 3.0), torch.randint(0, 6, (2, 4), generator=g)),
        ),
        Case(
            "extreme logits (a naive softmax overflows)",
            (torch.randn(2, 5, 8, generator=g) * 200, torch.randint(0, 8, (2, 5), generator=g)),
        ),
        Case(
            "one position only: nothing is predicted, the output is empty",
            (torch.randn(2, 1, 5, generator=g), torch.randint(0, 5, (2, 1), generator=g)),
        ),
    ]
    ids = model_tokens()
    with torch.no_grad():
        logits = model(ids)
    cases.append(Case("TinyWorld model logits on 6 documents", (logits, ids)))
    cases.append(
        Case(
            "behaviour: the gradient reaches the logits (later chapters train on this loss)",
            (torch.randn(2, 4, 7, generator=g), torch.randint(0, 7, (2, 4), generator=g)),
            call=_grad_of_first,
            judge=_gradient_judge("the logits"),
        )
    )
    return cases


def _detached_loss(logits, tokens):
    return sol.per_token_loss(logits.detach(), tokens)


register(
    "per_token_loss",
    CHAPTER,
    sol.per_token_loss,
    _loss_cases,
    mistakes=[
        Mistake(
            "no shift",
            lambda logits, tokens: -logits.log_softmax(-1).gather(-1, tokens[..., None])[..., 0][:, :-1],
            "Off by one: the logits at position p predict the token at p + 1, so compare logits[:, :-1] "
            "with tokens[:, 1:].",
        ),
        Mistake(
            "softmax over positions",
            lambda logits, tokens: -logits.log_softmax(1)[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0],
            "The softmax must run over the vocabulary (dim=-1), not over positions.",
        ),
        Mistake(
            "probabilities, not log-probabilities",
            lambda logits, tokens: -logits.softmax(-1)[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0],
            "Cross-entropy is minus the LOG-probability of the right token: use log_softmax.",
        ),
        Mistake(
            "sign",
            lambda logits, tokens: sol.per_token_loss(logits, tokens) * -1,
            "Check the sign: the loss is minus the log-probability, so it is never negative.",
        ),
        Mistake(
            "naive log of softmax",
            lambda logits, tokens: -torch.log(logits.softmax(-1))[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0],
            "log(softmax(x)) overflows for large logits (it gives inf); use x.log_softmax(dim=-1).",
        ),
        Mistake(
            "averaged",
            lambda logits, tokens: sol.per_token_loss(logits, tokens).mean(),
            "Return one loss per predicted token, [batch, pos-1]; don't average them (F.cross_entropy averages "
            "unless you pass reduction='none').",
        ),
        Mistake(
            "detached",
            _detached_loss,
            "The values are right but no gradient reaches the logits: don't detach, call .item()/.tolist() or "
            "rebuild the tensor from numbers inside the function.",
        ),
    ],
)


# --- answer_logit_diff -------------------------------------------------------------------


def _logit_diff_cases():
    model = shared_model()
    g = gen(1)
    answer = torch.randint(0, 9, (6,), generator=g)
    wrong = torch.randint(0, 9, (6,), generator=g)
    wrong[::2] = answer[::2]  # every other prompt: the same token twice, so the difference is exactly 0
    cases = [
        Case(
            "one prompt, vocab 4",
            (torch.tensor([[[0.0, 1.0, 2.0, 3.0], [5.0, 1.0, -2.0, 0.5]]]), torch.tensor([0]), torch.tensor([2])),
        ),
        Case(
            "random: batch 5, 6 positions, vocab 9",
            (
                torch.randn(5, 6, 9, generator=g),
                torch.randint(0, 9, (5,), generator=g),
                torch.randint(0, 9, (5,), generator=g),
            ),
        ),
        Case(
            "ties: half the prompts name the same token as answer and wrong",
            (torch.randn(6, 3, 9, generator=g), answer, wrong),
        ),
    ]
    pool = tinyworld.generate(60, seed=3, split="test", families=["ioi"])
    length = Counter(d.meta["answer_position"] for d in pool).most_common(1)[0][0]
    docs = [d for d in pool if d.meta["answer_position"] == length][:6]
    prompts = torch.stack([torch.tensor(tinyworld.encode(d.tokens[: d.meta["answer_position"] + 1])) for d in docs])
    io = torch.tensor([tinyworld.token_id(d.meta["IO"]) for d in docs])
    s = torch.tensor([tinyworld.token_id(d.meta["S"]) for d in docs])
    with torch.no_grad():
        logits = model(prompts)
    cases.append(Case("TinyWorld indirect-object prompts (IO vs S)", (logits, io, s)))
    cases.append(
        Case(
            "behaviour: the gradient reaches the logits (chapter 6 differentiates this metric)",
            (torch.randn(3, 4, 7, generator=g), torch.tensor([1, 4, 6]), torch.tensor([2, 4, 0])),
            call=_grad_of_first,
            judge=_gradient_judge("the logits"),
        )
    )
    cases.append(
        Case(
            "input that must raise: one answer id for 5 prompts",
            (torch.randn(5, 3, 9, generator=g), torch.tensor([2]), torch.tensor([1, 2, 3, 4, 5])),
            call=_raises,
            judge=_must_raise("ValueError", "answer_ids holds 1 id for 5 prompts"),
        )
    )
    return cases


def _check_ids(logits, a, w):
    if a.shape != logits.shape[:1] or w.shape != logits.shape[:1]:
        raise ValueError("one id per prompt")


def _diff_from_numbers(logits, a, w):
    return torch.tensor(sol.answer_logit_diff(logits, a, w).tolist())


def _diff_unchecked(logits, a, w):
    final = logits[:, -1]
    return final[torch.arange(len(final)), a] - final[torch.arange(len(final)), w]


register(
    "answer_logit_diff",
    CHAPTER,
    sol.answer_logit_diff,
    _logit_diff_cases,
    mistakes=[
        Mistake(
            "first position",
            _validating(
                _check_ids,
                lambda logits, a, w: (
                    logits[:, 0].gather(-1, a[:, None])[:, 0] - logits[:, 0].gather(-1, w[:, None])[:, 0]
                ),
            ),
            "Position 0 is the <bos> token; the answer is predicted at the LAST position (index -1).",
        ),
        Mistake(
            "swapped",
            lambda logits, a, w: -sol.answer_logit_diff(logits, a, w),
            "Right minus wrong, not wrong minus right.",
        ),
        Mistake(
            "batch mean",
            lambda logits, a, w: sol.answer_logit_diff(logits, a, w).mean().expand(len(a)).clone(),
            "Return one difference per prompt; don't average over the batch.",
        ),
        Mistake(
            "mean over positions",
            _validating(
                _check_ids,
                lambda logits, a, w: (
                    logits.mean(1).gather(-1, a[:, None])[:, 0] - logits.mean(1).gather(-1, w[:, None])[:, 0]
                ),
            ),
            "Use the logits at the final position only (logits[:, -1]), not an average over positions.",
        ),
        Mistake(
            "rebuilt from numbers",
            _diff_from_numbers,
            "The values are right but no gradient reaches the logits: build the result with tensor operations, "
            "not torch.tensor(...) of Python numbers.",
        ),
        Mistake(
            "ids of another batch accepted",
            _diff_unchecked,
            "Check that answer_ids and wrong_ids hold one id per prompt and raise ValueError otherwise: indexing "
            "broadcasts a single id over the whole batch without complaint.",
        ),
    ],
)


# --- previous_token_score ---------------------------------------------------------------


def _causal_pattern(heads: int, n: int, g: torch.Generator) -> torch.Tensor:
    scores = torch.randn(heads, n, n, generator=g) * 2
    mask = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    return scores.masked_fill(mask, float("-inf")).softmax(-1)


def _prev_cases():
    model = shared_model()
    g = gen(2)
    n = 5
    prev = torch.zeros(1, n, n)
    prev[0, 0, 0] = 1.0
    for q in range(1, n):
        prev[0, q, q - 1] = 1.0
    cases = [
        Case("a perfect previous-token head", (prev,)),
        Case("random causal patterns: 3 heads, 6 tokens", (_causal_pattern(3, 6, g),)),
        Case("random causal patterns: 2 heads, 2 tokens (only position 1 counts)", (_causal_pattern(2, 2, g),)),
    ]
    ids = model_tokens(1, seed=4)
    _, cache = model.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_pattern"))
    for layer in range(model.cfg.n_layers):
        cases.append(Case(f"TinyWorld layer {layer} patterns", (cache[act_name("pattern", layer)][0],)))
    cases.append(
        Case(
            "input that must raise: a one-token prompt (no position has a previous token)",
            (torch.ones(3, 1, 1),),
            call=_raises,
            judge=_must_raise("ValueError", "a pattern of one position"),
        )
    )
    return cases


def _check_positions(pattern):
    if pattern.shape[-1] < 2:
        raise ValueError("no previous token")


def _prev_unchecked(pattern):
    return pattern.diagonal(offset=-1, dim1=-2, dim2=-1).mean(dim=-1)


register(
    "previous_token_score",
    CHAPTER,
    sol.previous_token_score,
    _prev_cases,
    mistakes=[
        Mistake.edit(
            "diagonal",
            sol.previous_token_score,
            "offset=-1",
            "offset=0",
            "That is attention to the token itself (offset 0); the previous token is one below the "
            "diagonal (offset=-1).",
        ),
        Mistake.edit(
            "transposed",
            sol.previous_token_score,
            "offset=-1",
            "offset=1",
            "Query is the second axis and key the third: pattern[h, q, q - 1] lies BELOW the diagonal.",
        ),
        Mistake(
            "includes position 0",
            _validating(
                _check_positions,
                lambda p: torch.cat([p[:, :1, 0], p.diagonal(offset=-1, dim1=-2, dim2=-1)], dim=-1).mean(-1),
            ),
            "Position 0 has no previous token: average over q = 1 .. n-1 only (don't count its attention "
            "to <bos> itself).",
        ),
        Mistake.edit(
            "sum",
            sol.previous_token_score,
            ".mean(dim=-1)",
            ".sum(dim=-1)",
            "Average over query positions (mean), don't sum.",
        ),
        Mistake(
            "NaN for one position",
            _prev_unchecked,
            "With one position there is nothing to average (the mean of nothing is NaN): raise ValueError.",
        ),
    ],
)


# --- ablate_head -------------------------------------------------------------------------


def _check_head(z, head):
    if not 0 <= head < z.shape[2]:
        raise IndexError(head)


def _ablate_in_place(z, head):
    z[:, :, head, :] = 0.0
    return z


def _ablate_detached(z, head):
    out = z.detach().clone()
    out[:, :, head, :] = 0.0
    return out


def _ablate_unchecked(z, head):
    out = z.clone()
    out[:, :, head, :] = 0.0
    return out


def _ablate_cases():
    g = gen(3)
    return [
        Case("batch 1, 3 positions, 2 heads, d_head 2", (torch.arange(12.0).reshape(1, 3, 2, 2), 1)),
        Case("random z: batch 2, 5 positions, 4 heads, d_head 8, head 0", (torch.randn(2, 5, 4, 8, generator=g), 0)),
        Case("random z, last head", (torch.randn(3, 4, 4, 6, generator=g), 3)),
        Case("as many positions as heads (catches the wrong axis)", (torch.randn(2, 4, 4, 3, generator=g), 2)),
        Case(
            "behaviour: gradients reach the other heads, none the removed one",
            (torch.randn(2, 3, 4, 5, generator=g), 1),
            call=_grad_of_first,
            judge=_gradient_judge("z"),
        ),
        Case(
            "input that must raise: head 4 of a layer with 4 heads",
            (torch.randn(1, 2, 4, 3, generator=g), 4),
            call=_raises,
            judge=_must_raise("IndexError", "head 4 of 4 heads"),
        ),
        Case(
            "input that must raise: head -1",
            (torch.randn(1, 2, 4, 3, generator=g), -1),
            call=_raises,
            judge=_must_raise("IndexError", "head -1"),
        ),
    ]


register(
    "ablate_head",
    CHAPTER,
    sol.ablate_head,
    _ablate_cases,
    mistakes=[
        Mistake(
            "position axis",
            _validating(_check_head, lambda z, head: z.clone().index_fill_(1, torch.tensor([head]), 0.0)),
            "hook_z is [batch, pos, head, d_head]: the head is axis 2, not axis 1.",
        ),
        Mistake(
            "keeps only the head",
            _validating(_check_head, lambda z, head: z * (torch.arange(z.shape[2]) == head)[None, None, :, None]),
            "Zero the chosen head and keep the others, not the other way round.",
        ),
        Mistake(
            "in place",
            _validating(_check_head, _ablate_in_place),
            "Clone z before editing it; editing a learner's input in place changes it for everyone.",
        ),
        Mistake(
            "detached copy",
            _validating(_check_head, _ablate_detached),
            "z.detach() cuts the copy off from the autograd graph; z.clone() alone keeps the gradient flowing.",
        ),
        Mistake(
            "negative head accepted",
            _ablate_unchecked,
            "Check that 0 <= head < n_heads and raise IndexError otherwise: z[:, :, -1] silently removes the "
            "last head.",
        ),
    ],
)


# --- head_ablation_loss -----------------------------------------------------------------


def _ablation_loss_cases():
    model = shared_model()
    ids = model_tokens(8, seed=5)
    docs = tinyworld.generate(8, seed=5, split="test")
    padded, real = tinyworld.batch_tokens(docs)
    assert torch.equal(padded, ids), "model_tokens and batch_tokens disagree"
    ind = [d for d in tinyworld.generate(40, seed=6, split="test", families=["induction"]) if d.meta["length"] == 8][:4]
    ind_ids, _ = tinyworld.batch_tokens(ind)
    repeated = torch.zeros_like(ind_ids, dtype=torch.bool)
    repeated[:, ind[0].meta["repeat_start"] :] = True
    last = (model.cfg.n_layers - 1, model.cfg.n_heads - 1)
    cases = [
        Case(f"TinyWorld, layer {layer} head {head}", (model, ids, layer, head))
        for layer, head in [(0, 0), (1, 2), last]
    ]
    cases += [
        Case("real padding: loss_mask marks the real tokens (padding is left out)", (model, ids, 0, 1, real)),
        Case("induction sequences, counting only the repeated half", (model, ind_ids, 0, 2, repeated)),
        Case(
            "behaviour: works when the caller has turned gradients off",
            (model, ids, 1, 2, real),
            call=under_no_grad,
        ),
    ]
    return cases


def _no_ablation(model, tokens, layer, head, loss_mask=None):
    return _masked_mean(model(tokens), tokens, loss_mask)


def _masked_mean(logits, tokens, loss_mask):
    loss = sol.per_token_loss(logits, tokens)
    return loss.mean().item() if loss_mask is None else loss[loss_mask[:, 1:]].mean().item()


def _wrong_layer(model, tokens, layer, head, loss_mask=None):
    other = (layer + 1) % model.cfg.n_layers
    return sol.head_ablation_loss(model, tokens, other, head, loss_mask)


def _whole_layer(model, tokens, layer, head, loss_mask=None):
    logits = model.run_with_hooks(tokens, fwd_hooks=[(act_name("z", layer), lambda z, hook: z * 0)])
    return _masked_mean(logits, tokens, loss_mask)


def _ablated_logits(model, tokens, layer, head):
    return model.run_with_hooks(tokens, fwd_hooks=[(act_name("z", layer), lambda z, hook: sol.ablate_head(z, head))])


def _mask_ignored(model, tokens, layer, head, loss_mask=None):
    return _masked_mean(_ablated_logits(model, tokens, layer, head), tokens, None)


def _mask_unshifted(model, tokens, layer, head, loss_mask=None):
    loss = sol.per_token_loss(_ablated_logits(model, tokens, layer, head), tokens)
    return loss.mean().item() if loss_mask is None else loss[loss_mask[:, :-1]].mean().item()


def _mean_of_prompt_means(model, tokens, layer, head, loss_mask=None):
    loss = sol.per_token_loss(_ablated_logits(model, tokens, layer, head), tokens)
    if loss_mask is None:
        return loss.mean().item()
    m = loss_mask[:, 1:].float()
    return ((loss * m).sum(1) / m.sum(1)).mean().item()


register(
    "head_ablation_loss",
    CHAPTER,
    sol.head_ablation_loss,
    _ablation_loss_cases,
    mistakes=[
        Mistake(
            "no ablation",
            _no_ablation,
            "This is the clean loss: the hook never ran. Pass it with "
            "model.run_with_hooks(tokens, fwd_hooks=[(hook_name, hook_fn)]) and make the hook RETURN the edited z.",
        ),
        Mistake("wrong layer", _wrong_layer, "Check the hook name: act_name('z', layer) for the given layer."),
        Mistake("whole layer", _whole_layer, "Zero only the chosen head (z[:, :, head]), not every head of the layer."),
        Mistake(
            "mask ignored",
            _mask_ignored,
            "Only the predictions that loss_mask marks count: padding and unmarked tokens must stay out of the mean.",
        ),
        Mistake(
            "mask not shifted",
            _mask_unshifted,
            "loss_mask[b, t] marks the prediction OF token t, which per_token_loss holds at column t - 1: "
            "pair the losses with loss_mask[:, 1:].",
        ),
        Mistake(
            "mean of per-prompt means",
            _mean_of_prompt_means,
            "Every counted token weighs the same: average over all counted tokens at once, not prompt by prompt "
            "(prompts of different lengths would weigh differently).",
        ),
    ],
    rtol=1e-4,
    atol=1e-5,
)


# --- head_ablation_effects (the chapter's harness) --------------------------------------


def _effects_cases():
    model = shared_model()
    ind = [d for d in tinyworld.generate(80, seed=8, split="test", families=["induction"]) if d.meta["length"] == 8][:4]
    ids, _ = tinyworld.batch_tokens(ind)
    repeated = torch.zeros_like(ids, dtype=torch.bool)
    repeated[:, ind[0].meta["repeat_start"] :] = True
    _, cache = model.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_z"))
    z = torch.stack([cache[act_name("z", layer)] for layer in range(model.cfg.n_layers)])
    mixed = tinyworld.generate(4, seed=9, split="test")
    mixed_ids, real = tinyworld.batch_tokens(mixed)
    no_count = repeated.clone()
    no_count[2] = False
    no_count[2, 0] = True  # position 0 is never predicted: this prompt counts nothing
    return [
        Case("zero ablation, every prediction counted", (model, ids)),
        Case("real padding: loss_mask marks the real tokens", (model, mixed_ids, real)),
        Case(
            "mean ablation: one mean per head over prompts and positions",
            (model, ids, repeated, z.mean(dim=(1, 2), keepdim=True)),
        ),
        Case(
            "resample ablation: each prompt gets another prompt's outputs", (model, ids, repeated, z[:, [1, 2, 3, 0]])
        ),
        Case(
            "property: replacing every head by its own clean output changes nothing (all effects 0)",
            (model, ids, repeated, z),
        ),
        Case(
            "input that must raise: a prompt that counts no prediction",
            (model, ids, no_count),
            call=_raises,
            judge=_must_raise("ValueError", "loss_mask counts nothing in prompt 2"),
        ),
    ]


def _effects_from(model, tokens, loss_mask, replacements, *, shift=1, subtract=True, use_replacements=True):
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    if loss_mask is None:
        counted = torch.ones_like(tokens[:, 1:], dtype=torch.bool)
    else:
        counted = loss_mask[:, 1:] if shift == 1 else loss_mask[:, :-1]
    counted = counted.float()
    if loss_mask is not None and not loss_mask[:, 1:].any(1).all():
        raise ValueError("a prompt counts no prediction")

    def mean_loss(logits):
        return (sol.per_token_loss(logits, tokens) * counted).sum(1) / counted.sum(1)

    clean = mean_loss(model(tokens)) if subtract else 0.0
    out = torch.zeros(n_layers, n_heads, tokens.shape[0])
    for layer in range(n_layers):
        for head in range(n_heads):

            def hook(z, hook, layer=layer, head=head):
                z = z.clone()
                z[:, :, head] = 0.0 if replacements is None or not use_replacements else replacements[layer][:, :, head]
                return z

            out[layer, head] = mean_loss(model.run_with_hooks(tokens, fwd_hooks=[(act_name("z", layer), hook)])) - clean
    return out


register(
    "head_ablation_effects",
    CHAPTER,
    sol.head_ablation_effects,
    _effects_cases,
    mistakes=[
        Mistake(
            "clean loss not subtracted",
            lambda model, tokens, loss_mask=None, replacements=None: _effects_from(
                model, tokens, loss_mask, replacements, subtract=False
            ),
            "Return the rise in loss: subtract each prompt's loss with no head removed.",
        ),
        Mistake(
            "layer and head swapped",
            lambda model, tokens, loss_mask=None, replacements=None: _effects_from(
                model, tokens, loss_mask, replacements
            ).transpose(0, 1),
            "The output is [layer, head, batch]: entry [l, h] is head h of layer l.",
        ),
        Mistake(
            "pooled over prompts",
            lambda model, tokens, loss_mask=None, replacements=None: _effects_from(
                model, tokens, loss_mask, replacements
            ).mean(-1),
            "Keep one effect per prompt (the last axis): the chapter uses their spread for error bars.",
        ),
        Mistake(
            "mask ignored",
            lambda model, tokens, loss_mask=None, replacements=None: _effects_from(model, tokens, None, replacements),
            "Only the predictions that loss_mask marks count, in the ablated and in the clean loss alike.",
        ),
        Mistake(
            "mask not shifted",
            lambda model, tokens, loss_mask=None, replacements=None: _effects_from(
                model, tokens, loss_mask, replacements, shift=0
            ),
            "loss_mask[b, t] marks the prediction OF token t, which per_token_loss holds at column t - 1: "
            "pair the losses with loss_mask[:, 1:].",
        ),
        Mistake(
            "replacements ignored",
            lambda model, tokens, loss_mask=None, replacements=None: _effects_from(
                model, tokens, loss_mask, replacements, use_replacements=False
            ),
            "When replacements is given, a removed head outputs replacements[layer][:, :, head], not zeros.",
        ),
    ],
    rtol=1e-4,
    atol=1e-4,
)
