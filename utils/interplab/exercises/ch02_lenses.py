"""Chapter 2 (the logit lens and the tuned lens): exercise specs.

Every exercise is checked on fixed edge cases (ties, logits so large that softmax underflows,
real padding, a depth-0 position), seeded random cases (some on a tiny random transformer with
an unfolded layer norm, so that a lens that only works for folded models is caught), cases on
the bundled TinyWorld model, and behaviour its contract names: gradients that reach the
translators, calls under ``torch.no_grad()``. The training loop `fit_tuned_lens` is judged by
properties of its result (the loss it reaches against the reference's, within a margin; its
start at the logit lens; its learning-rate schedule; seeding), not by its exact weights.
"""

from __future__ import annotations

import functools
import math

import torch

from .. import lenses, tinyworld
from ..grading.compare import compare
from ..models import quiet_transformer_lens
from ..paths import chapter_of
from ..solutions import ch02_lenses as sol
from . import Case, Mistake, gen, register, shared_model, under_no_grad

CHAPTER = chapter_of(__name__)


# --- judging outputs by what the contracts say -------------------------------------------------------------


def _float32(x):
    """A floating tensor as float32 (a float64 answer is judged at float32 tolerances); anything else unchanged."""
    return x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def _same_values(expected, got, what: str, rtol: float = 1e-4, atol: float = 1e-5) -> str | None:
    """None when ``got`` is a float tensor (any floating dtype) equal to ``expected`` at float32 tolerances."""
    if not isinstance(got, torch.Tensor):
        return f"{what}: expected a tensor, got {type(got).__name__}"
    if not got.is_floating_point():
        return f"{what}: expected a float tensor, got dtype {got.dtype}"
    msg = compare(_float32(expected), _float32(got), rtol, atol)
    return f"{what}: {msg}" if msg else None


def _with_gradients(output_name: str, leaves: dict[str, int]):
    """A `Case.call` for "the gradient reaches ...": the arguments at the positions in ``leaves`` require
    gradients, a fixed random weighting of the output is backpropagated, and the output and the gradient at
    each leaf come back (None for a gradient that never arrives). Runs with gradients on, whatever the caller."""

    def call(fn, *args, **kwargs):
        args = list(args)
        for i in leaves.values():
            args[i] = args[i].detach().clone().requires_grad_(True)
        with torch.enable_grad():
            out = fn(*args, **kwargs)
            result = {output_name: out.detach() if isinstance(out, torch.Tensor) else out}
            grads = [None] * len(leaves)
            if isinstance(out, torch.Tensor) and out.is_floating_point() and out.requires_grad:
                weight = torch.randn(out.shape, generator=gen(99)).to(out.dtype)
                grads = torch.autograd.grad((out * weight).sum(), [args[i] for i in leaves.values()], allow_unused=True)
        for name, g in zip(leaves, grads):
            result[f"gradient reaching {name}"] = None if g is None else g.detach()
        return result

    return call


def _judge_with_gradients(rtol: float = 1e-4, atol: float = 1e-5):
    """A `Case.judge` for `_with_gradients`: the output and every gradient as the reference's."""

    def judge(expected: dict, got: dict) -> str | None:
        for key, exp in expected.items():
            value = got.get(key) if isinstance(got, dict) else None
            if key.startswith("gradient") and value is None and exp is None:
                continue  # neither reaches it (comparing two wrong answers with each other)
            if key.startswith("gradient") and value is None:
                name = key.removeprefix("gradient reaching ")
                return (
                    f"no gradient reaches {name}: the output is not connected to {name} (a detached tensor, "
                    f"a Python number from .item(), or a computation under torch.no_grad()), so training through "
                    f"this function would never change {name}"
                )
            msg = _same_values(exp, value, key, rtol, atol)
            if msg:
                return msg
        return None

    return judge


def _judge_values(rtol: float = 1e-4, atol: float = 1e-5):
    """A `Case.judge` for a single float tensor at float32 tolerances, accepting any floating dtype."""
    return lambda expected, got: _same_values(expected, got, "the output", rtol, atol)


@functools.cache
def _tiny_model(seed: int = 0):
    """A 2-layer random transformer with an unfolded final layer norm (weights and bias not 1 and 0)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig  # heavy: only these cases need it

    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=16,
        n_heads=2,
        d_head=8,
        d_mlp=32,
        d_vocab=13,
        n_ctx=12,
        act_fn="gelu",
        normalization_type="LN",
        device="cpu",
    )
    g = gen(seed + 100)
    with quiet_transformer_lens(), torch.random.fork_rng(), torch.no_grad():  # leave the global RNG alone
        torch.manual_seed(seed)
        model = HookedTransformer(cfg, move_to_device=False)
        model.ln_final.w.copy_(1 + 0.3 * torch.randn(16, generator=g))
        model.ln_final.b.copy_(0.3 * torch.randn(16, generator=g))
        model.b_U.copy_(0.5 * torch.randn(13, generator=g))
        for p in model.parameters():  # larger weights than the default init: the layers do something
            if p.ndim >= 2:
                p.mul_(4)
    return model.eval()


def _tiny_tokens(batch: int, pos: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 13, (batch, pos), generator=gen(seed))


@functools.cache
def _tinyworld_batch(n: int = 3, seed: int = 0):
    """Token ids and mask of a few TinyWorld test documents (right-padded)."""
    docs = tinyworld.generate(n, seed=seed, split="test")
    return tinyworld.batch_tokens(docs)


@functools.cache
def _tinyworld_lens(incl_mid: bool = False):
    """Logit-lens logits and final logits of the bundled model on 3 documents."""
    model = shared_model()
    ids, _ = _tinyworld_batch()
    with torch.no_grad():
        lens = sol.logit_lens(model, ids, incl_mid)
    return lens, lens[-1].clone(), ids


# --- logit_lens -------------------------------------------------------------------------------


def _logit_lens_cases():
    tiny = _tiny_model()
    model = shared_model()
    ids, _ = _tinyworld_batch()
    return [
        Case("random 2-layer model with an unfolded layer norm, 2 prompts of 7 tokens", (tiny, _tiny_tokens(2, 7, 1))),
        Case("random 2-layer model, a single token", (tiny, _tiny_tokens(1, 1, 2))),
        Case("random 2-layer model, incl_mid=True", (tiny, _tiny_tokens(3, 5, 3)), {"incl_mid": True}),
        Case("TinyWorld model on 3 documents", (model, ids)),
        Case("TinyWorld model on 3 documents, incl_mid=True", (model, ids), {"incl_mid": True}),
        Case(
            "behaviour: works when the caller has turned gradients off (random model, incl_mid=True)",
            (tiny, _tiny_tokens(2, 4, 5)),
            {"incl_mid": True},
            call=under_no_grad,
        ),
    ]


def _stack(model, tokens, incl_mid, first="blocks.0.hook_resid_pre"):
    names = lenses.lens_hook_names(model.cfg.n_layers, incl_mid)
    _, cache = model.run_with_cache(tokens)
    return torch.stack([cache[first if i == 0 else n] for i, n in enumerate(names)]), cache


def _no_layer_norm(model, tokens, incl_mid=False):
    resid, _ = _stack(model, tokens, incl_mid)
    return model.unembed(resid)


def _final_scale(model, tokens, incl_mid=False):
    resid, cache = _stack(model, tokens, incl_mid)
    return model.unembed(cache.apply_ln_to_stack(resid))  # recompute_ln=False: the final layer's scale


def _token_embedding_only(model, tokens, incl_mid=False):
    resid, _ = _stack(model, tokens, incl_mid, first="hook_embed")
    return model.unembed(model.ln_final(resid))


def _ignores_incl_mid(model, tokens, incl_mid=False):
    return sol.logit_lens(model, tokens, False)


def _no_embeddings(model, tokens, incl_mid=False):
    return sol.logit_lens(model, tokens, incl_mid)[1:]


def _mids_after_posts(model, tokens, incl_mid=False):
    out = sol.logit_lens(model, tokens, incl_mid)
    if not incl_mid:
        return out
    n = model.cfg.n_layers
    order = [0] + [2 + 2 * i for i in range(n)] + [1 + 2 * i for i in range(n)]
    return out[order]


register(
    "logit_lens",
    CHAPTER,
    sol.logit_lens,
    _logit_lens_cases,
    mistakes=[
        Mistake(
            "no final layer norm",
            _no_layer_norm,
            "Apply the final layer norm before the unembedding: model.unembed(model.ln_final(resid)). The "
            "unembedding was trained on normalised vectors, and residual norms grow from layer to layer.",
        ),
        Mistake(
            "final layer's scale",
            _final_scale,
            "cache.apply_ln_to_stack divides every layer by the FINAL residual's scale unless you pass "
            "recompute_ln=True (that is what direct logit attribution wants). The logit lens normalises each "
            "layer's vector by its own statistics: apply model.ln_final to the stack.",
        ),
        Mistake(
            "token embedding only",
            _token_embedding_only,
            "The first point is blocks.0.hook_resid_pre, the token embedding PLUS the position embedding; "
            "hook_embed is the token embedding alone.",
        ),
        Mistake(
            "ignores incl_mid",
            _ignores_incl_mid,
            "With incl_mid=True also read blocks.L.hook_resid_mid (after the attention sublayer), between "
            "the resid_pre/resid_post points: 2 * n_layers + 1 points in all.",
        ),
        Mistake(
            "no embeddings point",
            _no_embeddings,
            "There are n_layers + 1 read-out points: start with the embeddings (blocks.0.hook_resid_pre), "
            "then the residual stream after each block.",
        ),
        Mistake(
            "points out of order",
            _mids_after_posts,
            "With incl_mid the points follow the residual stream through the network: the embeddings, then "
            "layer 0 after attention, layer 0 after the block, layer 1 after attention, ... (not every "
            "attention point after every block point).",
        ),
    ],
)


# --- kl_to_final -----------------------------------------------------------------------------


def _kl_cases():
    g = gen(10)
    final = torch.randn(3, 6, generator=g)
    lens, final_tw, _ = _tinyworld_lens()
    return [
        Case("every point equal to the final logits (KL = 0)", (final.expand(2, 3, 6).clone(), final)),
        Case(
            "random: 4 points, batch 2, 3 positions, vocab 7",
            (torch.randn(4, 2, 3, 7, generator=g) * 2, torch.randn(2, 3, 7, generator=g) * 2),
        ),
        Case(
            "large logits (softmax underflows to 0)",
            (torch.randn(3, 4, 9, generator=g) * 100, torch.randn(4, 9, generator=g) * 100),
        ),
        Case("TinyWorld logit lens on 3 documents", (lens, final_tw)),
        Case(
            "the model certain of one token, the lens of another (probabilities underflow on both sides)",
            (torch.tensor([[[0.0, 200.0, 0.0]], [[150.0, 0.0, 0.0]]]), torch.tensor([[300.0, 0.0, -100.0]])),
        ),
        Case(
            "behaviour: the gradient reaches lens_logits (random: 3 points, 2 positions, vocab 5)",
            (torch.randn(3, 2, 5, generator=g) * 3, torch.randn(2, 5, generator=g) * 3),
            call=_with_gradients("KL", {"lens_logits": 0}),
            judge=_judge_with_gradients(),
        ),
    ]


def _kl_reversed(lens_logits, final_logits):
    log_p = final_logits.log_softmax(-1)
    log_q = lens_logits.log_softmax(-1)
    return (log_q.exp() * (log_q - log_p)).sum(-1)


def _kl_naive_log(lens_logits, final_logits):
    p, q = final_logits.softmax(-1), lens_logits.softmax(-1)
    return (p * (p.log() - q.log())).sum(-1)


def _kl_clamped_log(lens_logits, final_logits):
    p, q = final_logits.softmax(-1), lens_logits.softmax(-1)
    return (p * (p.clamp_min(1e-12).log() - q.clamp_min(1e-12).log())).sum(-1)


def _kl_detached(lens_logits, final_logits):
    return sol.kl_to_final(lens_logits.detach(), final_logits)


register(
    "kl_to_final",
    CHAPTER,
    sol.kl_to_final,
    _kl_cases,
    mistakes=[
        Mistake(
            "reversed",
            _kl_reversed,
            "KL is not symmetric. Weight by the MODEL's final distribution p: sum p (log p - log q), with q "
            "the lens's distribution. (F.kl_div(input, target) computes KL(target || input) and wants "
            "log-probabilities as input.)",
        ),
        Mistake(
            "naive log of softmax",
            _kl_naive_log,
            "softmax underflows to 0 for large logits and log(0) = -inf gives nan: take logs with "
            "log_softmax, and probabilities with log_probs.exp().",
        ),
        Mistake(
            "clamped log",
            _kl_clamped_log,
            "Clamping probabilities before the log (p.clamp_min(1e-12).log()) avoids nan but gives the wrong "
            "value wherever the lens's probability is below the clamp: the true log-probability can be -200, "
            "not -27.6. Take logs of a softmax with log_softmax, which stays exact for any finite logits.",
        ),
        Mistake(
            "detached from the lens",
            _kl_detached,
            "The KL must stay connected to lens_logits: the tuned lens is trained through it. Do not detach, "
            "call .item() or .numpy(), or compute it under torch.no_grad().",
        ),
        Mistake.edit(
            "mean over the vocabulary",
            sol.kl_to_final,
            ".sum(dim=-1)",
            ".mean(dim=-1)",
            "KL SUMS over the vocabulary (reduction='mean' in F.kl_div averages over it, which divides by d_vocab).",
        ),
    ],
)


# --- lens_entropy ------------------------------------------------------------------------------


def _entropy_cases():
    g = gen(11)
    lens, _, _ = _tinyworld_lens()
    return [
        Case("uniform over 5 tokens (entropy log 5)", (torch.zeros(3, 5),)),
        Case("a certain prediction (one huge logit)", (torch.tensor([[0.0, 1000.0, 0.0, -5.0]]),)),
        Case("random: batch 2, 4 positions, vocab 9", (torch.randn(2, 4, 9, generator=g) * 3,)),
        Case("TinyWorld logit lens on 3 documents", (lens,)),
        Case(
            "two tokens tied at the top, the rest underflowing (entropy log 2)",
            (torch.tensor([[500.0, 500.0, 0.0, -300.0], [-50.0, 10.0, 10.0, -2000.0]]),),
        ),
    ]


register(
    "lens_entropy",
    CHAPTER,
    sol.lens_entropy,
    _entropy_cases,
    mistakes=[
        Mistake(
            "bits",
            lambda logits: -(logits.softmax(-1) * logits.log_softmax(-1) / torch.log(torch.tensor(2.0))).sum(-1),
            "Measure entropy in nats (natural log), like the loss and the KL: use log_softmax, not log2.",
        ),
        Mistake(
            "naive log of softmax",
            lambda logits: -(logits.softmax(-1) * logits.softmax(-1).log()).sum(-1),
            "A probability that underflows to 0 gives 0 * log(0) = 0 * -inf = nan: use log_softmax for log p.",
        ),
        Mistake.edit(
            "sign",
            sol.lens_entropy,
            "return -(log_p.exp() * log_p)",
            "return (log_p.exp() * log_p)",
            "Entropy is MINUS sum p log p: it is never negative.",
        ),
        Mistake(
            "raw logits instead of log-probabilities",
            lambda logits: -(logits.softmax(-1) * logits).sum(-1),
            "Weight log-probabilities (log_softmax), not raw logits: logits are log-probabilities only up to "
            "an additive constant.",
        ),
        Mistake(
            "entropy of the top token only",
            lambda logits: -logits.log_softmax(-1).amax(-1),
            "The entropy sums -p log p over EVERY token of the vocabulary, not just the most likely one.",
        ),
    ],
)


# --- correct_token_rank -------------------------------------------------------------------------


def _rank_cases():
    g = gen(12)
    lens, _, ids = _tinyworld_lens()
    targets = ids[:, 1:].expand(lens.shape[0], -1, -1).clone()
    return [
        Case(
            "one set of 5 logits, each token as the target",
            (torch.tensor([0.1, 2.0, -1.0, 0.5, 1.0]).expand(5, 5).clone(), torch.arange(5)),
        ),
        Case(
            "random: batch 3, 5 positions, vocab 11",
            (torch.randn(3, 5, 11, generator=g), torch.randint(0, 11, (3, 5), generator=g)),
        ),
        Case("TinyWorld logit lens: rank of the actual next token at every point", (lens[:, :, :-1].clone(), targets)),
        Case(
            "ties: the target tied with other tokens, at the top and in the middle",
            (
                torch.tensor([[3.0, 3.0, 3.0, 1.0, 0.0], [5.0, 0.0, 2.0, 2.0, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0]]),
                torch.tensor([2, 3, 3]),
            ),
        ),
    ]


def _stable_sort_position(logits, targets):
    order = torch.sort(logits, dim=-1, descending=True, stable=True).indices
    return (order == targets[..., None]).long().argmax(-1)


def _is_top1(logits, targets):
    return (logits.argmax(-1) != targets).long()


register(
    "correct_token_rank",
    CHAPTER,
    sol.correct_token_rank,
    _rank_cases,
    mistakes=[
        Mistake(
            "argsort index",
            lambda logits, targets: logits.argsort(-1, descending=True).gather(-1, targets[..., None])[..., 0],
            "argsort(descending=True)[..., k] is the token AT rank k, not the rank of token k. Count the tokens "
            "with a larger logit instead: (logits > logits.gather(-1, targets[..., None])).sum(-1).",
        ),
        Mistake.edit(
            "counts the token itself",
            sol.correct_token_rank,
            "(logits > correct)",
            "(logits >= correct)",
            "With >= the correct token counts itself, so the top-1 gets rank 1; the top-1 has rank 0 "
            "(count STRICTLY larger logits).",
        ),
        Mistake.edit(
            "ascending",
            sol.correct_token_rank,
            "(logits > correct)",
            "(logits < correct)",
            "Rank 0 is the HIGHEST logit: count the tokens with a larger logit, not a smaller one.",
        ),
        Mistake(
            "position in a sort",
            _stable_sort_position,
            "The position of the target in a sorted order depends on how the sort breaks ties: a target tied "
            "with the top token may land at position 2. The rank counts only tokens with a STRICTLY larger logit.",
        ),
        Mistake(
            "top-1 or not",
            _is_top1,
            "Return how many tokens beat the target, not only whether it is the top-1: a target in third place "
            "has rank 2.",
        ),
    ],
)


# --- prediction_depth ---------------------------------------------------------------------------


def _depth_fixed() -> torch.Tensor:
    """4 points, 3 positions, vocab 3; top-1 tokens by point: [2, 2, 0, 2], [0, 1, 1, 1], [1, 1, 1, 1]."""
    tops = torch.tensor([[2, 0, 1], [2, 1, 1], [0, 1, 1], [2, 1, 1]])
    logits = torch.zeros(4, 3, 3)
    logits.scatter_(-1, tops[..., None], 2.0)
    return logits + 0.1 * torch.arange(3.0)  # no exact ties among the rest


def _depth_cases():
    g = gen(13)
    lens, _, _ = _tinyworld_lens()
    lens_mid, _, _ = _tinyworld_lens(True)
    return [
        Case("top-1 tokens that flicker before settling", (_depth_fixed(),)),
        Case("random: 5 points, batch 2, 6 positions, vocab 4", (torch.randn(5, 2, 6, 4, generator=g),)),
        Case("TinyWorld logit lens on 3 documents", (lens,)),
        Case("TinyWorld logit lens with resid_mid points", (lens_mid,)),
        Case("a single read-out point (the output itself): depth 0 everywhere", (torch.randn(1, 3, 5, generator=g),)),
    ]


def _first_agreement(lens_logits):
    top = lens_logits.argmax(-1)
    return (top == top[-1]).long().argmax(0)


def _disagreement_count(lens_logits):
    top = lens_logits.argmax(-1)
    return (top != top[-1]).long().sum(0)


def _leading_agreement(lens_logits):
    top = lens_logits.argmax(-1)
    return (top == top[-1]).long().cumprod(0).sum(0)


def _last_disagreement(lens_logits):
    top = lens_logits.argmax(-1)
    n = lens_logits.shape[0]
    idx = torch.arange(n).reshape(n, *([1] * (top.ndim - 1)))
    return torch.where(top != top[-1], idx, torch.zeros_like(idx)).amax(0)


register(
    "prediction_depth",
    CHAPTER,
    sol.prediction_depth,
    _depth_cases,
    mistakes=[
        Mistake(
            "first agreement",
            _first_agreement,
            "The top-1 can agree with the final one, then change, then agree again: the depth is where it "
            "agrees AND STAYS in agreement at every later point.",
        ),
        Mistake(
            "counts disagreeing points",
            _disagreement_count,
            "Counting the points that disagree only gives the depth when agreement never flickers; find the "
            "first point after which every point agrees.",
        ),
        Mistake(
            "last disagreement",
            _last_disagreement,
            "Off by one: the depth is the point AFTER the last disagreement (and 0 when there is none).",
        ),
        Mistake(
            "agreement from the start",
            _leading_agreement,
            "That counts how many points agree from the FIRST point on. The depth looks from the end: the "
            "earliest point from which every LATER point agrees.",
        ),
    ],
)


# --- tuned_lens_logits --------------------------------------------------------------------------


def _tuned_cases():
    g = gen(14)
    tiny = _tiny_model()
    model = shared_model()
    ids, _ = _tinyworld_batch(2, seed=1)
    resid = lenses.residual_stack(model, ids)[:-1]
    d = model.cfg.d_model
    return [
        Case(
            "random model, A = b = 0 (the logit lens)",
            (tiny, torch.randn(2, 2, 3, 16, generator=g) * 3, torch.zeros(2, 16, 16), torch.zeros(2, 16)),
        ),
        Case(
            "random model, random translators",
            (
                tiny,
                torch.randn(2, 2, 3, 16, generator=g) * 3,
                torch.randn(2, 16, 16, generator=g) * 0.3,
                torch.randn(2, 16, generator=g),
            ),
        ),
        Case(
            "random model, one vector per layer (no batch or position axes)",
            (
                tiny,
                torch.randn(2, 16, generator=g) * 3,
                torch.randn(2, 16, 16, generator=g) * 0.3,
                torch.randn(2, 16, generator=g),
            ),
        ),
        Case(
            "TinyWorld residual streams of 2 documents, random translators",
            (
                model,
                resid,
                torch.randn(resid.shape[0], d, d, generator=g) * 0.05,
                torch.randn(resid.shape[0], d, generator=g) * 0.5,
            ),
        ),
        Case(
            "random model, three batch axes between the layer axis and d_model",
            (
                tiny,
                torch.randn(2, 2, 2, 3, 16, generator=g) * 3,
                torch.randn(2, 16, 16, generator=g) * 0.3,
                torch.randn(2, 16, generator=g),
            ),
        ),
        Case(
            "behaviour: the gradient reaches A and b (random model, random translators)",
            (
                tiny,
                torch.randn(2, 4, 16, generator=g) * 3,
                torch.randn(2, 16, 16, generator=g) * 0.3,
                torch.randn(2, 16, generator=g),
            ),
            call=_with_gradients("logits", {"A": 2, "b": 3}),
            judge=_judge_with_gradients(),
        ),
        Case(
            "behaviour: works when the caller has turned gradients off (TinyWorld, random translators)",
            (
                model,
                resid[:, :1],
                torch.randn(resid.shape[0], d, d, generator=g) * 0.05,
                torch.randn(resid.shape[0], d, generator=g) * 0.5,
            ),
            call=under_no_grad,
        ),
    ]


def _after_norm(model, resid, A, b):
    normed = model.ln_final(resid)
    flat = normed.reshape(resid.shape[0], -1, resid.shape[-1])
    out = flat + torch.bmm(flat, A.transpose(1, 2)) + b[:, None]
    return model.unembed(out.reshape(resid.shape))


def _translators_detached(model, resid, A, b):
    return sol.tuned_lens_logits(model, resid, A.detach(), b.detach())


register(
    "tuned_lens_logits",
    CHAPTER,
    sol.tuned_lens_logits,
    _tuned_cases,
    mistakes=[
        Mistake.edit(
            "no skip connection",
            sol.tuned_lens_logits,
            "translated = flat + torch.bmm(",
            "translated = torch.bmm(",
            "The translator is h + A h + b, not A h + b: with A = b = 0 it must be the identity, so that a "
            "freshly initialised tuned lens IS the logit lens.",
        ),
        Mistake.edit(
            "A transposed",
            sol.tuned_lens_logits,
            "A.transpose(1, 2)",
            "A",
            "A h is the matrix-vector product: (A h)_i = sum_j A[i, j] h_j. For row vectors h that is "
            "h @ A.T (or torch.einsum('lij,l...j->l...i', A, h)), not h @ A.",
        ),
        Mistake(
            "translator after the norm",
            _after_norm,
            "Translate the raw residual stream, then apply model.ln_final, then model.unembed: the translator "
            "maps layer l's residual stream to something that looks like the final one.",
        ),
        Mistake.edit(
            "no final norm",
            sol.tuned_lens_logits,
            "model.unembed(model.ln_final(translated.reshape(resid.shape)))",
            "model.unembed(translated.reshape(resid.shape))",
            "After translating, read out like the model does: model.ln_final, then model.unembed.",
        ),
        Mistake(
            "translators detached",
            _translators_detached,
            "The logits must stay connected to A and b, or training can never change them: no .detach(), "
            "no torch.no_grad() inside, no copies through numpy.",
        ),
    ],
)


# --- tuned_lens_loss ----------------------------------------------------------------------------


def _loss_cases():
    g = gen(15)
    tiny = _tiny_model()
    model = shared_model()
    tiny_ids = _tiny_tokens(2, 6, 4)
    with torch.no_grad():
        tiny_resid = lenses.residual_stack(tiny, tiny_ids)[:-1]
        tiny_final = tiny(tiny_ids)
    tiny_mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    ids, mask = _tinyworld_batch(2, seed=2)
    with torch.no_grad():
        resid = lenses.residual_stack(model, ids)[:-1]
        final = model(ids)
    d, n = model.cfg.d_model, resid.shape[0]
    flat_resid, flat_final = resid[:, mask], final[mask]
    junk_resid, junk_final = tiny_resid.clone(), tiny_final.clone()  # padding that holds garbage
    junk_resid[:, ~tiny_mask] = 50 * torch.randn(junk_resid[:, ~tiny_mask].shape, generator=g)
    junk_final[~tiny_mask] = 50 * torch.randn(junk_final[~tiny_mask].shape, generator=g)
    A_t, b_t = torch.randn(2, 16, 16, generator=g) * 0.2, torch.randn(2, 16, generator=g)
    return [
        Case(
            "random model, A = b = 0 (the logit lens's KL)",
            (tiny, tiny_resid, torch.zeros(2, 16, 16), torch.zeros(2, 16), tiny_final),
        ),
        Case(
            "random model, random translators, padding in the mask",
            (
                tiny,
                tiny_resid,
                torch.randn(2, 16, 16, generator=g) * 0.2,
                torch.randn(2, 16, generator=g),
                tiny_final,
                tiny_mask,
            ),
        ),
        Case(
            "TinyWorld, 2 right-padded documents with their mask, random translators",
            (model, resid, torch.randn(n, d, d, generator=g) * 0.05, torch.randn(n, d, generator=g) * 0.5, final, mask),
        ),
        Case(
            "TinyWorld, positions flattened [layer, n, d_model], mask=None",
            (
                model,
                flat_resid,
                torch.randn(n, d, d, generator=g) * 0.05,
                torch.randn(n, d, generator=g) * 0.5,
                flat_final,
            ),
        ),
        Case(
            "property: padded positions have no effect (random model, garbage in the padding)",
            (tiny, junk_resid, A_t, b_t, junk_final, tiny_mask),
        ),
        Case(
            "behaviour: the gradient reaches A and b (random model, padding in the mask)",
            (tiny, tiny_resid, A_t, b_t, tiny_final, tiny_mask),
            call=_with_gradients("loss", {"A": 2, "b": 3}),
            judge=_judge_with_gradients(rtol=1e-4, atol=1e-6),
        ),
    ]


def _loss_from(kl_fn):
    def loss(model, resid, A, b, final_logits, mask=None):
        kl = kl_fn(sol.tuned_lens_logits(model, resid, A, b), final_logits)
        return (kl[:, mask] if mask is not None else kl).mean()

    return loss


def _cross_entropy(lens_logits, final_logits):
    return -(final_logits.softmax(-1) * lens_logits.log_softmax(-1)).sum(-1)


def _ignores_mask(model, resid, A, b, final_logits, mask=None):
    return sol.tuned_lens_loss(model, resid, A, b, final_logits)


def _sum_over_layers(model, resid, A, b, final_logits, mask=None):
    return sol.tuned_lens_loss(model, resid, A, b, final_logits, mask) * resid.shape[0]


def _no_translators(model, resid, A, b, final_logits, mask=None):
    return sol.tuned_lens_loss(model, resid, torch.zeros_like(A), torch.zeros_like(b), final_logits, mask)


def _loss_item(model, resid, A, b, final_logits, mask=None):
    return sol.tuned_lens_loss(model, resid, A, b, final_logits, mask).item()


def _loss_detached(model, resid, A, b, final_logits, mask=None):
    return sol.tuned_lens_loss(model, resid, A.detach(), b.detach(), final_logits, mask)


def _mask_multiplied(model, resid, A, b, final_logits, mask=None):
    kl = sol.kl_to_final(sol.tuned_lens_logits(model, resid, A, b), final_logits)
    return (kl * mask).mean() if mask is not None else kl.mean()


def _per_document_first(model, resid, A, b, final_logits, mask=None):
    kl = sol.kl_to_final(sol.tuned_lens_logits(model, resid, A, b), final_logits)
    if mask is None or mask.ndim < 2:
        return (kl[:, mask] if mask is not None else kl).mean()
    per_doc = (kl * mask).sum(-1) / mask.sum(-1)
    return per_doc.mean()


register(
    "tuned_lens_loss",
    CHAPTER,
    sol.tuned_lens_loss,
    _loss_cases,
    mistakes=[
        Mistake(
            "reversed KL",
            _loss_from(_kl_reversed),
            "Train on KL(model || lens): weight by the model's final distribution p, as in kl_to_final. "
            "(The reverse makes the lens mode-seeking: confidently right on a few tokens, blind to the rest.)",
        ),
        Mistake(
            "cross-entropy, not KL",
            _loss_from(_cross_entropy),
            "That is the cross-entropy H(p, q) = KL(p || q) + H(p). It has the same gradient, but it is not "
            "the KL: a perfect lens must have loss 0. Subtract the entropy of p (or use kl_to_final).",
        ),
        Mistake(
            "ignores the mask",
            _ignores_mask,
            "Average only over the positions where mask is True: padding tokens are not text, and "
            "their predictions would leak into the loss.",
        ),
        Mistake(
            "sum over layers",
            _sum_over_layers,
            "Average over layers as well as positions (kl.mean()), so the loss does not grow with depth.",
        ),
        Mistake(
            "no translators",
            _no_translators,
            "Compute the KL of the TUNED lens (tuned_lens_logits with A and b), otherwise no gradient reaches "
            "the translators.",
        ),
        Mistake(
            ".item()",
            _loss_item,
            "Return the loss as a tensor: a Python number from .item() has the right value but no gradient, "
            "so loss.backward() is impossible and the translators never learn.",
        ),
        Mistake(
            "detached translators",
            _loss_detached,
            "The loss must stay connected to A and b (no .detach(), no torch.no_grad()): the lens is trained "
            "through its gradient.",
        ),
        Mistake(
            "padding zeroed but counted",
            _mask_multiplied,
            "Multiplying by the mask zeroes the padding's KL, but .mean() still divides by every position, "
            "padding included: average over the counted positions only.",
        ),
        Mistake(
            "each document averaged first",
            _per_document_first,
            "Averaging each document first gives a short document's positions more weight than a long one's: "
            "every counted position must weigh the same.",
        ),
    ],
    rtol=1e-4,
    atol=1e-6,
)


# --- fit_tuned_lens: the training loop, judged by properties of its result -------------------------------------

LOSS_MARGIN = 0.10  # the held-in loss may exceed the reference's by 10% (another draw of batches moves it ~2%)


@functools.cache
def _tiny_lens_data():
    """Residual streams [2, 288, 16] and output logits [288, 13] of the random 2-layer model on 24 prompts."""
    tiny = _tiny_model()
    ids = _tiny_tokens(24, 12, 7)
    with torch.no_grad():
        resid = lenses.residual_stack(tiny, ids)[:-1].flatten(1, 2)
        final = tiny(ids).flatten(0, 1)
    return resid, final


@functools.cache
def _tinyworld_lens_data():
    """Residual streams [4, n, 192] and output logits of the bundled model at the positions of 30 training
    documents (every real token but <bos>)."""
    model = shared_model()
    ids, mask = tinyworld.batch_tokens(tinyworld.generate(30, seed=5, split="train"))
    resid, final, _, _ = lenses.collect_lens_data(model, ids, lenses.positions_to_read(mask))
    return resid[:-1].clone(), final


def _summary(out, model, resid, final_logits) -> dict:
    """What the judge needs from a training run: its four outputs, checked for shape, and the loss its
    translators reach on all the training positions."""
    if not isinstance(out, (tuple, list)) or len(out) != 4:
        kind = f"a tuple of {len(out)}" if isinstance(out, (tuple, list)) else type(out).__name__
        return {"problem": f"fit_tuned_lens must return (A, b, losses, lrs); it returned {kind}"}
    A, b, losses, lrs = out
    n_layers, _, d = resid.shape
    for name, x, shape in [("A", A, (n_layers, d, d)), ("b", b, (n_layers, d))]:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or tuple(x.shape) != shape:
            got = f"shape {tuple(x.shape)}, dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
            return {"problem": f"{name} must be a float tensor of shape {shape}; got {got}"}
    series = {}
    for name, x in [("losses", losses), ("lrs", lrs)]:
        try:
            series[name] = torch.as_tensor([float(v) for v in x], dtype=torch.float64)
        except (TypeError, ValueError):
            return {"problem": f"{name} must be a float tensor with one value per step; got {type(x).__name__}"}
    with torch.no_grad():
        held_in = lenses.tuned_lens_loss(model, resid, A.detach().float(), b.detach().float(), final_logits)
    return {"A": A.detach(), "b": b.detach(), **series, "loss reached": float(held_in)}


def _train(fn, model, resid, final_logits, steps, batch_size, lr, seed=0):
    """A `Case.call`: one training run, summarised (and the model's requires_grad flags checked and restored)."""
    flags = [p.requires_grad for p in model.parameters()]
    try:
        out = fn(model, resid, final_logits, steps, batch_size, lr, seed)
    finally:
        changed = any(p.requires_grad != f for p, f in zip(model.parameters(), flags))
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    summary = _summary(out, model, resid, final_logits)
    summary["requires_grad flags kept"] = not changed
    return summary


def _train_under_no_grad(fn, *args):
    """A `Case.call`: `_train` inside ``torch.no_grad()``; a function that cannot train there is reported as such."""
    with torch.no_grad():
        try:
            return _train(fn, *args)
        except RuntimeError as e:
            if "does not require grad" not in str(e):
                raise
            return {"problem": f"called under torch.no_grad(), your function could not train ({e})"}


def _train_three_times(fn, model, resid, final_logits, steps, batch_size, lr, seed=0):
    """A `Case.call`: seeds (seed, seed, seed + 1); whether the first two runs agree and the third differs."""
    runs = [_train(fn, model, resid, final_logits, steps, batch_size, lr, s) for s in (seed, seed, seed + 1)]
    problem = next((r["problem"] for r in runs if "problem" in r), None)
    if problem:
        return {"problem": problem}
    same = all(torch.equal(runs[0][k], runs[1][k]) for k in ("A", "b"))
    other = not torch.equal(runs[0]["A"], runs[2]["A"])
    return {"same seed, same translators": same, "another seed, other translators": other}


def _identical(expected, got) -> bool:
    """Whether two run summaries are the same run (how a known mistake is recognised in a learner's output)."""
    if not isinstance(got, dict) or set(got) != set(expected):
        return False
    return all(
        torch.equal(v, got[k]) if isinstance(v, torch.Tensor) else isinstance(got[k], type(v)) and v == got[k]
        for k, v in expected.items()
        if not isinstance(v, torch.Tensor) or isinstance(got[k], torch.Tensor)
    ) and all(isinstance(got[k], torch.Tensor) for k, v in expected.items() if isinstance(v, torch.Tensor))


def _judge_training(full_batch: bool):
    """A `Case.judge` for `_train`: the contract's properties of a training run, against the reference's run."""

    def judge(expected: dict, got: dict) -> str | None:
        if _identical(expected, got):
            return None
        if "problem" in got:
            return got["problem"]
        steps = len(expected["losses"])
        for name in ("losses", "lrs"):
            if len(got[name]) != steps:
                return f"{name} must hold one value per step: expected {steps}, got {len(got[name])}"
            if not torch.isfinite(got[name]).all():
                return f"{name} holds a NaN or infinite value"
        if not got["requires_grad flags kept"]:
            return "the model's requires_grad flags changed: restore them after training (only the translators learn)"
        if full_batch:  # every step sees all positions: the first loss is the logit lens's on all of them
            first, want = float(got["losses"][0]), float(expected["losses"][0])
            if not math.isclose(first, want, rel_tol=1e-4, abs_tol=1e-6):
                return (
                    f"the first step's loss is {first:.6g}, but the logit lens's loss on these positions is "
                    f"{want:.6g}: the translators must start at zero (and the loss be measured before the update)"
                )
        msg = _judge_schedule(expected["lrs"], got["lrs"])
        if msg:
            return msg
        reached, ref = got["loss reached"], expected["loss reached"]
        if not reached <= ref * (1 + LOSS_MARGIN) + 1e-3:
            return (
                f"the trained translators reach a loss of {reached:.4f} on the training positions; a correct training "
                f"run reaches {ref:.4f} (at most {ref * (1 + LOSS_MARGIN) + 1e-3:.4f} accepted). Check the optimiser "
                f"(Adam), a fresh batch every step, and the learning-rate warm-up"
            )
        return None

    return judge


def _judge_schedule(expected_lrs: torch.Tensor, got: torch.Tensor) -> str | None:
    """The learning rates of a run: a linear warm-up to the peak over the first 5% of the steps, then a linear
    decay towards 0 (warm-ups that start at 0 or at peak / warm-up steps, decays that end at 0 or one step
    before it, all pass)."""
    steps = len(expected_lrs)
    peak = float(expected_lrs.max())
    warmup = max(1, steps // 20)
    top = int(got.argmax())
    if not math.isclose(float(got.max()), peak, rel_tol=1e-6):
        return f"the learning rate must reach lr = {peak:g}; its largest value is {float(got.max()):g}"
    if warmup > 1 and float(got[0]) > peak / warmup * (1 + 1e-6):
        return (
            f"the first step's learning rate is {float(got[0]):g}: it must rise linearly from near 0 to lr = {peak:g} "
            f"over the first {warmup} steps (a warm-up)"
        )
    if top > warmup:
        return f"the learning rate must peak by step {warmup} (5% of {steps}); it peaks at step {top}"
    tail = got[top:]
    if (tail[1:] > tail[:-1] * (1 + 1e-6)).any():
        return "after its peak the learning rate must only fall"
    if float(got[-1]) > 2 * peak / max(1, steps - warmup) + 1e-12:
        return (
            f"the learning rate must fall linearly towards 0 by the last step; it ends at {float(got[-1]):g} "
            f"(lr = {peak:g}): without the decay the translators keep hopping around the minimum"
        )
    quarter = warmup + (steps - warmup) // 4
    want = peak * (steps - quarter) / (steps - warmup)
    if abs(float(got[quarter]) - want) > 0.05 * peak:
        return (
            f"the decay must be linear: at step {quarter} (a quarter of the way down) the learning rate should be "
            f"about {want:g}, got {float(got[quarter]):g}"
        )
    return None


def _judge_seeding(expected: dict, got: dict) -> str | None:
    if _identical(expected, got):
        return None
    if "problem" in got:
        return got["problem"]
    if not got["same seed, same translators"]:
        return (
            "two runs with the same seed gave different translators: draw the batches from a generator seeded "
            "with `seed` (torch.Generator().manual_seed(seed)), not from the global random state"
        )
    if not got["another seed, other translators"]:
        return "runs with different seeds gave identical translators: the batches must be drawn with `seed`"
    return None


def _fit_cases():
    tiny = _tiny_model()
    r_tiny, f_tiny = _tiny_lens_data()
    model = shared_model()
    r_tw, f_tw = _tinyworld_lens_data()
    return [
        Case(
            "property: full batch on a random model (every step sees all 288 positions), 200 steps at lr 0.1",
            (tiny, r_tiny, f_tiny, 200, 1000, 0.1),
            call=_train,
            judge=_judge_training(full_batch=True),
        ),
        Case(
            f"property: TinyWorld, {r_tw.shape[1]} positions of 30 documents, 60 steps of 128 at lr 0.01",
            (model, r_tw, f_tw, 60, 128, 1e-2),
            call=_train,
            judge=_judge_training(full_batch=False),
        ),
        Case(
            "behaviour: the same seed gives the same translators, another seed others (random model, batches of 64)",
            (tiny, r_tiny, f_tiny, 20, 64, 0.1, 3),
            call=_train_three_times,
            judge=_judge_seeding,
        ),
        Case(
            "behaviour: trains when the caller has turned gradients off (random model, full batch, 200 steps)",
            (tiny, r_tiny, f_tiny, 200, 1000, 0.3),
            call=_train_under_no_grad,
            judge=_judge_training(full_batch=True),
        ),
    ]


register(
    "fit_tuned_lens",
    CHAPTER,
    sol.fit_tuned_lens,
    _fit_cases,
    mistakes=[
        Mistake.edit(
            "no learning-rate decay",
            sol.fit_tuned_lens,
            "max(0.0, (steps - step) / max(1, steps - warmup))",
            "1.0",
            "After the warm-up the learning rate must fall linearly to 0 by the last step: with a constant rate "
            "Adam keeps taking steps of about lr and never settles into the minimum.",
        ),
        Mistake.edit(
            "no warm-up",
            sol.fit_tuned_lens,
            "(step + 1) / warmup",
            "1.0",
            "Start with a small learning rate and raise it linearly over the first 5% of the steps: Adam's first "
            "steps move every entry by about lr, which from zero overshoots.",
        ),
        Mistake.edit(
            "random initial translators",
            sol.fit_tuned_lens,
            "A = torch.zeros(n_layers, d_model, d_model, device=resid.device, requires_grad=True)",
            "A = (torch.randn(n_layers, d_model, d_model, generator=torch.Generator().manual_seed(1)) / d_model**0.5)"
            ".to(resid.device).requires_grad_(True)",
            "Start A and b at zero: then the untrained tuned lens IS the logit lens, and training moves the "
            "translators only as far as the data asks.",
        ),
        Mistake.edit(
            "one batch for every step",
            sol.fit_tuned_lens,
            "torch.randint(0, n, (batch_size,), generator=gen)",
            "torch.randint(0, n, (batch_size,), generator=torch.Generator().manual_seed(seed))",
            "Draw a fresh batch at every step (from one generator seeded once, before the loop): re-seeding "
            "inside the loop draws the same batch every time, and the lens learns only those positions.",
        ),
        Mistake.edit(
            "SGD",
            sol.fit_tuned_lens,
            "torch.optim.Adam([A, b], lr=lr)",
            "torch.optim.SGD([A, b], lr=lr)",
            "Use Adam: plain SGD at this learning rate barely moves the translators in the given steps.",
        ),
        Mistake.edit(
            "unseeded batches",
            sol.fit_tuned_lens,
            "torch.randint(0, n, (batch_size,), generator=gen)",
            "torch.randint(0, n, (batch_size,))",
            "Draw the batches from torch.Generator().manual_seed(seed) so that the same seed gives the same lens.",
        ),
        Mistake.edit(
            "needs gradients on",
            sol.fit_tuned_lens,
            "with torch.enable_grad():",
            "if True:",
            "Wrap the loop in `with torch.enable_grad():` so that training works even when the caller is inside "
            "torch.no_grad() (the residual streams are usually computed there).",
        ),
    ],
    time_limit=60.0,
)
