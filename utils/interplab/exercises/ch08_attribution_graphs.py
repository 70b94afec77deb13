"""Chapter 08 (attribution graphs): the CLT loss, a frozen-attention direct effect, the influence matrix,
pruning by cumulative influence, and the intervention-check harness."""

from __future__ import annotations

import functools

import torch

from ..paths import chapter_of
from ..solutions import ch08_attribution_graphs as sol
from . import Case, Mistake, gen, register, shared_model

CHAPTER = chapter_of(__name__)


# --- clt_loss ------------------------------------------------------------------------------------


def _clt_weights(n_layers: int, d_sae: int, d: int, seed: int):
    g = gen(seed)
    W_dec = [torch.randn(d_sae, n_layers - l, d, generator=g) for l in range(n_layers)]  # noqa: E741
    b_dec = torch.randn(n_layers, d, generator=g)
    return W_dec, b_dec


def _clt_cases():
    cases = []
    # Hand-made: one feature in layer 0 writing only into layer 1; nothing else is active.
    W_dec = [torch.zeros(1, 2, 2), torch.zeros(1, 1, 2)]
    W_dec[0][0, 1] = torch.tensor([1.0, 2.0])
    acts = torch.tensor([[[1.0], [0.0]]])
    target = torch.tensor([[[0.0, 0.0], [1.0, 2.0]]])
    cases.append(
        Case("a layer-0 feature writes into layer 1 only (exact: loss 0)", (acts, W_dec, torch.zeros(2, 2), target))
    )
    cases.append(
        Case("same, target off by 1 in every entry of both layers", (acts, W_dec, torch.zeros(2, 2), target + 1.0))
    )
    for seed, (n, s, d, batch) in enumerate([(2, 3, 4, 5), (3, 4, 3, 6), (4, 5, 6, 7)]):
        W_dec, b_dec = _clt_weights(n, s, d, 10 + seed)
        g = gen(20 + seed)
        acts = torch.relu(torch.randn(batch, n, s, generator=g))
        target = torch.randn(batch, n, d, generator=g)
        cases.append(
            Case(
                f"random: {n} layers, {s} features per layer, d_model {d}, {batch} tokens", (acts, W_dec, b_dec, target)
            )
        )
    return cases


register(
    "clt_loss",
    CHAPTER,
    sol.clt_loss,
    _clt_cases,
    mistakes=[
        Mistake.edit(
            "no cross-layer writes",
            sol.clt_loss,
            "for l in range(L + 1)",
            "for l in range(L, L + 1)",
            "A CLT's features write into their own layer AND every later one: layer L's reconstruction sums the "
            "decoders of the features of every layer l <= L (W_dec[l][:, L - l]), not only layer L's own.",
        ),
        Mistake.edit(
            "mean over the model dimension",
            sol.clt_loss,
            ".pow(2).sum(-1).mean()",
            ".pow(2).mean()",
            "Sum the squared error over the model dimension (the squared distance of each token's vector), then "
            "average over tokens.",
        ),
        Mistake.edit(
            "averaged over layers",
            sol.clt_loss,
            "    return loss\n",
            "    return loss / n_layers\n",
            "Sum the per-layer losses over layers: every MLP counts fully.",
        ),
        Mistake.edit(
            "no output bias",
            sol.clt_loss,
            "recon = b_dec[L] + sum(",
            "recon = sum(",
            "Each layer's reconstruction includes its output bias b_dec[L].",
        ),
    ],
    atol=1e-4,
    rtol=1e-4,
)


# --- direct_effect -------------------------------------------------------------------------------


def _de_args(seed: int, n_heads: int = 2, pos: int = 4, d: int = 5, src: int = 1, tgt: int = 3):
    g = gen(seed)
    pattern = torch.rand(n_heads, pos, pos, generator=g).tril()
    pattern = pattern / pattern.sum(-1, keepdim=True)
    W_OV = torch.randn(n_heads, d, d, generator=g) / d**0.5
    decoder = torch.randn(d, generator=g) + 0.7  # a non-zero mean: centring matters
    encoder = torch.randn(d, generator=g)
    act = float(torch.rand((), generator=g)) * 2 + 0.5
    scale_src, scale_tgt = float(torch.rand((), generator=g)) + 0.5, float(torch.rand((), generator=g)) + 1.5
    return (act, decoder, pattern, W_OV, scale_src, scale_tgt, encoder, src, tgt)


def _de_cases():
    # Hand-made: one head, identity OV, the target attends fully to the source.
    pattern = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    eye = torch.eye(2)[None]
    dec, enc = torch.tensor([1.0, 3.0]), torch.tensor([1.0, -1.0])
    cases = [
        Case(
            "one head copies position 0 to position 1, identity OV, scales 1",
            (2.0, dec, pattern, eye, 1.0, 1.0, enc, 0, 1),
        ),
        Case("same source and target position (the residual path too)", (2.0, dec, pattern, eye, 2.0, 4.0, enc, 0, 0)),
        Case("target before the source: no effect", (2.0, dec, pattern, eye, 1.0, 1.0, enc, 1, 0)),
    ]
    for seed in range(3):
        cases.append(Case(f"random: 2 heads, source 1, target 3 (seed {seed})", _de_args(seed)))
    cases.append(Case("random: 3 heads, source = target = 2", _de_args(7, n_heads=3, src=2, tgt=2)))
    cases.append(Case("random: asymmetric pattern, source 0, target 2", _de_args(8, src=0, tgt=2)))
    return cases


register(
    "direct_effect",
    CHAPTER,
    sol.direct_effect,
    _de_cases,
    mistakes=[
        Mistake.edit(
            "pattern indexed [key, query]",
            sol.direct_effect,
            "pattern[h, tgt_pos, src_pos]",
            "pattern[h, src_pos, tgt_pos]",
            "pattern[h, query, key]: the target position is the query (it reads), the source position the key.",
        ),
        Mistake.edit(
            "no residual path",
            sol.direct_effect,
            "moved = moved + write\n",
            "pass\n",
            "When the source and target positions are the same, the write also reaches the target straight "
            "through the residual stream, besides the heads.",
        ),
        Mistake.edit(
            "target LayerNorm not centred",
            sol.direct_effect,
            "((moved - moved.mean()) / scale_tgt)",
            "(moved / scale_tgt)",
            "The target reads through a LayerNorm: centre the vector over the model dimension before dividing by "
            "the frozen scale.",
        ),
        Mistake.edit(
            "scales ignored",
            sol.direct_effect,
            "read = (write - write.mean()) / scale_src",
            "read = write - write.mean()",
            "With LayerNorm frozen, the heads read the write divided by the source position's frozen scale.",
        ),
        Mistake.edit(
            "activation left out",
            sol.direct_effect,
            "write = act * decoder",
            "write = decoder",
            "A direct effect is per this activation, not per unit: the source writes act * decoder.",
        ),
    ],
    atol=1e-4,
    rtol=1e-4,
)


# --- influence_matrix ----------------------------------------------------------------------------


def _dag(n: int, seed: int, density: float = 0.6) -> torch.Tensor:
    g = gen(seed)
    A = torch.randn(n, n, generator=g) * (torch.rand(n, n, generator=g) < density)
    return A.tril(-1)  # target rows only receive from earlier nodes: acyclic


def _influence_cases():
    chain = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, -3.0, 0.0]])
    mixed = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [1.0, -1.0, 0.0, 0.0], [0.0, 3.0, 1.0, 0.0]])
    cases = [
        Case("a chain 0 -> 1 -> 2 with a negative edge", (chain,)),
        Case("four nodes, a node with two inputs of opposite signs", (mixed,)),
    ]
    for n, seed in ((5, 0), (8, 1), (12, 2)):
        cases.append(Case(f"random acyclic graph, {n} nodes (seed {seed})", (_dag(n, seed),)))
    return cases


register(
    "influence_matrix",
    CHAPTER,
    sol.influence_matrix,
    _influence_cases,
    mistakes=[
        Mistake.edit(
            "signed weights",
            sol.influence_matrix,
            "N = A.abs().double()",
            "N = A.double()",
            "Influence counts how much flows, whatever the sign: take absolute values before normalising.",
        ),
        Mistake.edit(
            "columns normalised",
            sol.influence_matrix,
            "N.sum(dim=1, keepdim=True)",
            "N.sum(dim=0, keepdim=True)",
            "Normalise each ROW (a target's inputs add up to 1), not each column.",
        ),
        Mistake.edit(
            "identity kept",
            sol.influence_matrix,
            "(torch.linalg.inv(eye - N) - eye)",
            "torch.linalg.inv(eye - N)",
            "(I - N)^-1 = I + N + N^2 + ... includes the paths of length 0; subtract the identity.",
        ),
        Mistake.edit(
            "direct edges only",
            sol.influence_matrix,
            "(torch.linalg.inv(eye - N) - eye)",
            "N",
            "Influence goes through paths of every length: N + N^2 + N^3 + ..., not only the direct edges N.",
        ),
    ],
    atol=1e-5,
    rtol=1e-4,
)


# --- prune_by_influence --------------------------------------------------------------------------


def _raises(fn, *args):
    try:
        fn(*args)
    except ValueError:
        return "ValueError"
    except Exception as e:  # noqa: BLE001
        return type(e).__name__
    return "no error"


def _must_raise(expected, got):
    return None if got == "ValueError" else f"a threshold outside [0, 1] must raise a ValueError; got: {got}"


def _prune_cases():
    cases = [
        Case("shares 0.5, 0.3, 0.2 (shuffled), threshold 0.8: keep two", (torch.tensor([0.3, 0.5, 0.2]), 0.8)),
        Case("threshold exactly reached by the first node", (torch.tensor([0.0, 5.0, 3.0, 2.0]), 0.5)),
        Case("threshold 1: every node with influence", (torch.tensor([1.0, 0.0, 2.0, 1.0]), 1.0)),
        Case("ties with the weakest kept node are kept", (torch.tensor([4.0, 2.0, 2.0, 1.0, 1.0]), 0.7)),
        Case("threshold 0: the strongest node only", (torch.tensor([1.0, 3.0, 2.0]), 0.0)),
        Case("all zero: nothing kept", (torch.zeros(4), 0.8)),
        Case("threshold 1.5 must raise", (torch.tensor([1.0, 2.0]), 1.5), call=_raises, judge=_must_raise),
    ]
    g = gen(3)
    for n, thr in ((20, 0.8), (50, 0.9), (30, 0.5)):
        infl = torch.rand(n, generator=g) ** 3
        cases.append(Case(f"random: {n} nodes, threshold {thr}", (infl, thr)))
    return cases


register(
    "prune_by_influence",
    CHAPTER,
    sol.prune_by_influence,
    _prune_cases,
    mistakes=[
        Mistake.edit(
            "one node short",
            sol.prune_by_influence,
            "k = min(k, len(ranked) - 1)",
            "k = max(min(k, len(ranked) - 1) - 1, 0)",
            "Keep nodes until the kept share REACHES the threshold: include the node that crosses it.",
        ),
        Mistake.edit(
            "not sorted",
            sol.prune_by_influence,
            "ranked = influence.sort(descending=True).values",
            "ranked = influence",
            "Accumulate the strongest nodes first: sort the influences in decreasing order before summing.",
        ),
        Mistake.edit(
            "share of the largest",
            sol.prune_by_influence,
            "share = ranked.cumsum(0) / total",
            "share = ranked.cumsum(0) / ranked[0]",
            "The threshold is a share of the TOTAL influence (the sum), not of the largest node's.",
        ),
    ],
)


# --- intervention_check --------------------------------------------------------------------------


def _table(pred: list[float], obs: list[float]):
    pt, ot = dict(enumerate(pred)), dict(enumerate(obs))
    return list(range(len(pred))), pt.__getitem__, ot.__getitem__


def _check_cases():
    cases = []
    items, p, o = _table([1.0, -2.0, 0.5, 3.0], [0.9, -1.0, -0.2, 3.1])
    cases.append(Case("four items: one half as large, one of the wrong sign", (items, p, o)))
    items, p, o = _table([2.0, 1.0, 4.0, -1.0, 0.5], [2.5, 1.0, 3.0, -0.8, 1.0])
    cases.append(Case("five items, tolerance 0.3", (items, p, o), {"tolerance": 0.3}))
    items, p, o = _table([1.0, 2.0], [1.0, -2.0])
    cases.append(Case("two items: no correlations", (items, p, o)))
    items, p, o = _table([1.0, 2.0, 3.0, 4.0, 5.0], [10.0, 20.0, 30.0, 40.0, 1000.0])
    cases.append(Case("monotone but not linear: spearman 1, pearson below 1", (items, p, o)))
    g = gen(5)
    x = torch.randn(30, generator=g)
    y = x * 0.8 + torch.randn(30, generator=g) * 0.5 + 2.0
    items, p, o = _table(x.tolist(), y.tolist())
    cases.append(Case("30 random items, observed = 0.8 x predicted + noise + 2", (items, p, o)))
    return cases


register(
    "intervention_check",
    CHAPTER,
    sol.intervention_check,
    _check_cases,
    mistakes=[
        Mistake.edit(
            "correlation not centred",
            sol.intervention_check,
            "x, y = x - x.mean(), y - y.mean()",
            "x, y = x, y",
            "Pearson's correlation centres both series first (subtract their means); without it you get the "
            "cosine similarity.",
        ),
        Mistake.edit(
            "spearman on the values",
            sol.intervention_check,
            "corr(ranks(predicted), ranks(observed))",
            "corr(predicted, observed)",
            "Spearman's correlation is Pearson's correlation of the RANKS of the two series.",
        ),
        Mistake.edit(
            "failures: sign only",
            sol.intervention_check,
            "if wrong_sign or abs(o - p) > tolerance * max(abs(p), abs(o)):",
            "if wrong_sign:",
            "A failure is also an observation of the right sign that is off by more than tolerance times the "
            "larger magnitude.",
        ),
        Mistake.edit(
            "tolerance relative to the prediction",
            sol.intervention_check,
            "tolerance * max(abs(p), abs(o))",
            "tolerance * abs(p)",
            "Measure the miss relative to the LARGER of the two magnitudes, predicted or observed.",
        ),
    ],
    atol=1e-6,
    rtol=1e-6,
)


@functools.cache
def _model():  # the bundled model, for the chapter's own uses (kept for symmetry with the other chapters)
    return shared_model()
