"""Chapter 00 (orientation): warm-up exercises on logits, attention patterns and hooks."""

from __future__ import annotations

from collections import Counter

import torch

from .. import tinyworld
from ..hooks import act_name
from ..paths import chapter_of
from ..solutions import ch00_orientation as sol
from . import Case, Mistake, gen, model_tokens, register, shared_model

CHAPTER = chapter_of(__name__)


# --- per_token_loss -------------------------------------------------------------------


def _loss_cases():
    model = shared_model()
    cases = []
    g = gen(0)
    cases.append(
        Case(
            "tiny: batch 1, 2 positions, vocab 3",
            (torch.tensor([[[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]]]), torch.tensor([[0, 2]])),
        )
    )
    cases.append(
        Case(
            "random: batch 3, 7 positions, vocab 11",
            (torch.randn(3, 7, 11, generator=g) * 3, torch.randint(0, 11, (3, 7), generator=g)),
        )
    )
    cases.append(
        Case(
            "extreme logits (a naive softmax overflows)",
            (torch.randn(2, 5, 8, generator=g) * 200, torch.randint(0, 8, (2, 5), generator=g)),
        )
    )
    ids = model_tokens()
    with torch.no_grad():
        logits = model(ids)
    cases.append(Case("TinyWorld model logits on 6 documents", (logits, ids)))
    return cases


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
    ],
)


# --- answer_logit_diff -------------------------------------------------------------------


def _logit_diff_cases():
    model = shared_model()
    g = gen(1)
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
    return cases


register(
    "answer_logit_diff",
    CHAPTER,
    sol.answer_logit_diff,
    _logit_diff_cases,
    mistakes=[
        Mistake(
            "first position",
            lambda logits, a, w: logits[:, 0].gather(-1, a[:, None])[:, 0] - logits[:, 0].gather(-1, w[:, None])[:, 0],
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
            lambda logits, a, w: (
                logits.mean(1).gather(-1, a[:, None])[:, 0] - logits.mean(1).gather(-1, w[:, None])[:, 0]
            ),
            "Use the logits at the final position only (logits[:, -1]), not an average over positions.",
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
        Case("random causal patterns: 2 heads, 2 tokens", (_causal_pattern(2, 2, g),)),
    ]
    ids = model_tokens(1, seed=4)
    _, cache = model.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_pattern"))
    for layer in range(model.cfg.n_layers):
        cases.append(Case(f"TinyWorld layer {layer} patterns", (cache[act_name("pattern", layer)][0],)))
    return cases


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
            lambda p: torch.cat([p[:, :1, 0], p.diagonal(offset=-1, dim1=-2, dim2=-1)], dim=-1).mean(-1),
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
    ],
)


# --- ablate_head -------------------------------------------------------------------------


def _ablate_in_place(z, head):
    z[:, :, head, :] = 0.0
    return z


def _ablate_cases():
    g = gen(3)
    return [
        Case("batch 1, 3 positions, 2 heads, d_head 2", (torch.arange(12.0).reshape(1, 3, 2, 2), 1)),
        Case("random z: batch 2, 5 positions, 4 heads, d_head 8, head 0", (torch.randn(2, 5, 4, 8, generator=g), 0)),
        Case("random z, last head", (torch.randn(3, 4, 4, 6, generator=g), 3)),
        Case("as many positions as heads (catches the wrong axis)", (torch.randn(2, 4, 4, 3, generator=g), 2)),
    ]


register(
    "ablate_head",
    CHAPTER,
    sol.ablate_head,
    _ablate_cases,
    mistakes=[
        Mistake(
            "position axis",
            lambda z, head: z.clone().index_fill_(1, torch.tensor([head]), 0.0),
            "hook_z is [batch, pos, head, d_head]: the head is axis 2, not axis 1.",
        ),
        Mistake(
            "keeps only the head",
            lambda z, head: z * (torch.arange(z.shape[2]) == head)[None, None, :, None],
            "Zero the chosen head and keep the others, not the other way round.",
        ),
        Mistake(
            "in place",
            _ablate_in_place,
            "Clone z before editing it; editing a learner's input in place changes it for everyone.",
        ),
    ],
)


# --- head_ablation_loss -----------------------------------------------------------------


def _ablation_loss_cases():
    model = shared_model()
    ids = model_tokens(8, seed=5)
    return [
        Case(f"TinyWorld, layer {layer} head {head}", (model, ids, layer, head))
        for layer, head in [(0, 0), (1, 2), (model.cfg.n_layers - 1, model.cfg.n_heads - 1)]
    ]


def _no_ablation(model, tokens, layer, head):
    return sol.per_token_loss(model(tokens), tokens).mean().item()


def _wrong_layer(model, tokens, layer, head):
    other = (layer + 1) % model.cfg.n_layers
    return sol.head_ablation_loss(model, tokens, other, head)


def _whole_layer(model, tokens, layer, head):
    logits = model.run_with_hooks(tokens, fwd_hooks=[(act_name("z", layer), lambda z, hook: z * 0)])
    return sol.per_token_loss(logits, tokens).mean().item()


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
        Mistake("wrong layer", _wrong_layer, "Check the hook name: f'blocks.{layer}.attn.hook_z' for the given layer."),
        Mistake("whole layer", _whole_layer, "Zero only the chosen head (z[:, :, head]), not every head of the layer."),
    ],
    rtol=1e-4,
    atol=1e-5,
)
