"""Chapter 2 (the logit lens and the tuned lens): exercise specs.

Every exercise is checked on fixed edge cases, seeded random cases (some on a tiny
random transformer with an unfolded layer norm, so that a lens that only works for
folded models is caught) and cases on the bundled TinyWorld model.
"""

from __future__ import annotations

import functools

import torch

from .. import lenses, tinyworld
from ..models import quiet_transformer_lens
from ..paths import chapter_of
from ..solutions import ch02_lenses as sol
from . import Case, Mistake, gen, register, shared_model

CHAPTER = chapter_of(__name__)


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
    ]


def _kl_reversed(lens_logits, final_logits):
    log_p = final_logits.log_softmax(-1)
    log_q = lens_logits.log_softmax(-1)
    return (log_q.exp() * (log_q - log_p)).sum(-1)


def _kl_naive_log(lens_logits, final_logits):
    p, q = final_logits.softmax(-1), lens_logits.softmax(-1)
    return (p * (p.log() - q.log())).sum(-1)


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
    ]


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
    ]


def _first_agreement(lens_logits):
    top = lens_logits.argmax(-1)
    return (top == top[-1]).long().argmax(0)


def _disagreement_count(lens_logits):
    top = lens_logits.argmax(-1)
    return (top != top[-1]).long().sum(0)


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
    ]


def _after_norm(model, resid, A, b):
    normed = model.ln_final(resid)
    flat = normed.reshape(resid.shape[0], -1, resid.shape[-1])
    out = flat + torch.bmm(flat, A.transpose(1, 2)) + b[:, None]
    return model.unembed(out.reshape(resid.shape))


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
    ],
    rtol=1e-4,
    atol=1e-6,
)
