"""Chapter 01 (linear probes): labelled datasets, probes, AUROC, control tasks and a causal edit."""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import torch.nn.functional as F

from .. import probes, tinyworld
from ..grading.compare import compare, describe
from ..hooks import act_name
from ..paths import chapter_of
from ..solutions import ch01_probes as sol
from ..tinyworld import ROOMS, Doc
from . import Case, Mistake, gen, register, shared_model, under_no_grad

CHAPTER = chapter_of(__name__)


@functools.cache
def _docs(n: int, seed: int, families: tuple[str, ...]) -> tuple[Doc, ...]:
    return tuple(tinyworld.generate(n, seed=seed, split="test", families=list(families)))


def _hand_made_rooms_doc() -> Doc:
    """Alice moves twice; Bob stays; questions about both, the last one after Bob's room was mentioned last."""
    d = Doc("rooms", meta={"people": ["Alice", "Bob"], "questions": []})
    where: dict[str, str] = {}
    for person, words, room in [
        ("Alice", "", "kitchen"),
        ("Bob", "", "hall"),
        ("Alice", "then", "attic"),
        ("Alice", "later", "cellar"),
    ]:
        d.add(f"{words} {person}")
        where[person] = room
        d.add([room, "."])
        d.rooms[-2] = dict(where)
        d.rooms[-1] = dict(where)
    for person in ["Bob", "Alice"]:
        d.meta["questions"].append((person, where[person]))
        d.add(f"where is {person}")
        d.add(f"{where[person]} .", answer_first=True)
    return d


# --- room_query_labels ---------------------------------------------------------------------------


def _labels_cases():
    return [
        Case("one hand-made rooms document (Alice moves twice)", ([_hand_made_rooms_doc()],)),
        Case("no rooms documents at all", (list(_docs(4, 1, ("ioi", "reviews"))),)),
        Case("12 documents of every family (rooms ones among them)", (list(_docs(12, 2, ())),)),
        Case("20 rooms documents", (list(_docs(20, 3, ("rooms",))),)),
    ]


def _labels_token_ids(docs):
    doc, pos, label, person = sol.room_query_labels(docs)
    ids = torch.tensor([tinyworld.token_id(ROOMS[int(c)]) for c in label], dtype=torch.long)
    return doc, pos, ids, person


def _labels_rooms_only_index(docs):
    rooms = [d for d in docs if d.family == "rooms"]
    return sol.room_query_labels(rooms)


def _labels_first_room(docs):
    doc, pos, _, person = sol.room_query_labels(docs)
    first = []
    for i, p in zip(doc.tolist(), pos.tolist()):
        name = docs[i].tokens[p]
        first.append(ROOMS.index(next(r[name] for r in docs[i].rooms if name in r)))
    return doc, pos, torch.tensor(first, dtype=torch.long), person


def _labels_last_room_mentioned(docs):
    doc, pos, _, person = sol.room_query_labels(docs)
    last = []
    for i, p in zip(doc.tolist(), pos.tolist()):
        last.append(ROOMS.index(next(t for t in reversed(docs[i].tokens[:p]) if t in ROOMS)))
    return doc, pos, torch.tensor(last, dtype=torch.long), person


def _labels_answer_position(docs):
    doc, pos, label, person = sol.room_query_labels(docs)
    return doc, pos + 1, label, person


register(
    "room_query_labels",
    CHAPTER,
    sol.room_query_labels,
    _labels_cases,
    mistakes=[
        Mistake(
            "vocabulary ids as labels",
            _labels_token_ids,
            "Labels are class indices 0 .. 7: ROOMS.index(room), not the room word's token id.",
        ),
        Mistake(
            "index among rooms documents only",
            _labels_rooms_only_index,
            "`doc` must index the full `docs` list (use enumerate(docs) and skip other families), "
            "not count only the rooms documents.",
        ),
        Mistake(
            "first room",
            _labels_first_room,
            "People move: the label is where X is at the question, doc.rooms[position][X], not the room X "
            "was first in.",
        ),
        Mistake(
            "last room mentioned",
            _labels_last_room_mentioned,
            "The label is X's room, which is not always the most recently mentioned room; read it from the "
            "annotation doc.rooms[position][X]. (A probe for 'the last room word' would be a different latent.)",
        ),
        Mistake(
            "answer position",
            _labels_answer_position,
            "The position is that of the name X ending 'where is X' (where the model must produce the room), "
            "not that of the room word after it: by then the answer is in the text.",
        ),
    ],
)


# --- document_split -----------------------------------------------------------------------------------
#
# The contract leaves the random draw free: a split is judged by its properties (whole documents held out,
# the requested number of documents within rounding, the same mask for the same seed, another mask for
# other seeds), so a correct split drawn another way passes.

_OTHER_SEEDS = (1, 2, 3)


def _split_call(fn, doc, test_fraction, seed):
    """The split for `seed`, the same call again, and the splits for three other seeds."""
    first = fn(doc, test_fraction, seed)
    again = fn(doc, test_fraction, seed)
    return first, again, [fn(doc, test_fraction, seed + k) for k in _OTHER_SEEDS]


def _split_judge(doc, test_fraction, seed, vary=True):
    ids = torch.unique(doc)
    allowed = {math.floor(test_fraction * len(ids)), math.ceil(test_fraction * len(ids))}

    def judge(expected, got):
        first, again, others = got
        for mask, what in [(first, f"seed {seed}"), *((m, f"seed {seed + k}") for m, k in zip(others, _OTHER_SEEDS))]:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != doc.shape:
                return f"with {what}: return a bool mask of shape {tuple(doc.shape)} (one entry per example), got {describe(mask)}"
            test_docs, train_docs = set(doc[mask].tolist()), set(doc[~mask].tolist())
            shared = sorted(test_docs & train_docs)
            if shared:
                return (
                    f"with {what}: the test split shares document {shared[0]} with the train split "
                    f"({len(shared)} documents on both sides); hold out whole documents"
                )
            if len(test_docs) not in allowed:
                want = " or ".join(map(str, sorted(allowed)))
                return (
                    f"with {what}: {len(test_docs)} of the {len(ids)} documents are held out; test_fraction "
                    f"{test_fraction} asks for {want} ({test_fraction} x {len(ids)} = {test_fraction * len(ids):g}, rounded)"
                )
        if not torch.equal(first, again):
            return f"two calls with seed {seed} gave different splits; the split must depend only on the seed"
        if vary and all(torch.equal(first, m) for m in others):
            return (
                f"seeds {seed}, {', '.join(str(seed + k) for k in _OTHER_SEEDS)} all gave the same split; "
                "the draw must depend on the seed"
            )
        return None

    return judge


def _split_case(label, doc, test_fraction, seed, vary=True):
    return Case(
        label,
        (doc, test_fraction, seed),
        call=_split_call,
        judge=_split_judge(doc, test_fraction, seed, vary),
    )


def _split_raises(fn, doc, test_fraction, seed):
    try:
        fn(doc, test_fraction, seed)
    except ValueError:
        return "raises ValueError"
    return "returns a split"


def _split_cases():
    g = gen(10)
    rnd = torch.randint(0, 30, (80,), generator=g).sort().values
    gaps = torch.tensor([3, 3, 7, 10, 10, 10, 42, 42, 42, 42, 50])
    doc, _, _, _ = sol.room_query_labels(list(_docs(40, 4, ("rooms",))))
    many = torch.randint(0, 1000, (300,), generator=g) * 7 + 5
    return [
        _split_case(
            "property: 4 documents, 8 examples, half held out", torch.tensor([0, 0, 1, 1, 1, 2, 3, 3]), 0.5, 0, False
        ),
        _split_case("property: non-contiguous document ids, 0.4 of 5 documents (2 held out)", gaps, 0.4, 1, False),
        _split_case("property: 80 examples from up to 30 documents", rnd, 0.3, 2),
        _split_case(
            "property: 10 documents, 0.25 of them: 2.5 lies on a rounding boundary (2 or 3 held out)",
            torch.arange(10).repeat_interleave(3),
            0.25,
            5,
        ),
        _split_case(
            "property: examples in any order (not sorted by document)", rnd[torch.randperm(80, generator=g)], 0.25, 3
        ),
        _split_case("property: 300 examples, large sparse ids, a small fraction", many, 0.1, 4),
        _split_case("property: TinyWorld rooms questions (several per document)", doc, 0.25, 0),
        Case("edge: test_fraction 1.0 must raise ValueError", (gaps, 1.0, 0), call=_split_raises),
        Case("edge: test_fraction 0.0 must raise ValueError", (gaps, 0.0, 0), call=_split_raises),
    ]


def _valid_fraction(test_fraction):
    """The mistakes below check test_fraction as the contract asks, so that each differs from it in one way only."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(test_fraction)


def _split_rows(doc, test_fraction=0.25, seed=0):
    _valid_fraction(test_fraction)
    perm = torch.randperm(len(doc), generator=torch.Generator().manual_seed(seed))
    out = torch.zeros(len(doc), dtype=torch.bool)
    out[perm[: round(test_fraction * len(doc))]] = True
    return out


def _split_perm_as_ids(doc, test_fraction=0.25, seed=0):
    _valid_fraction(test_fraction)
    n_docs = len(torch.unique(doc))
    perm = torch.randperm(n_docs, generator=torch.Generator().manual_seed(seed))
    return torch.isin(doc, perm[: round(test_fraction * n_docs)])


def _split_count_rows(doc, test_fraction=0.25, seed=0):
    _valid_fraction(test_fraction)
    docs = torch.unique(doc)
    perm = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed))
    return torch.isin(doc, docs[perm[: round(test_fraction * len(doc))]])


def _split_global_rng(doc, test_fraction=0.25, seed=0):
    _valid_fraction(test_fraction)
    docs = torch.unique(doc)
    perm = torch.randperm(len(docs))
    return torch.isin(doc, docs[perm[: round(test_fraction * len(docs))]])


def _split_seed_ignored(doc, test_fraction=0.25, seed=0):
    return sol.document_split(doc, test_fraction, 0)


def _split_no_check(doc, test_fraction=0.25, seed=0):
    docs = torch.unique(doc)
    perm = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed))
    return torch.isin(doc, docs[perm[: round(test_fraction * len(docs))]])


register(
    "document_split",
    CHAPTER,
    sol.document_split,
    _split_cases,
    mistakes=[
        Mistake(
            "split examples, not documents",
            _split_rows,
            "This splits examples, so questions from one document land on both sides and the test set shares "
            "context with the training set (leakage). Draw among the distinct document ids instead.",
        ),
        Mistake(
            "permutation used as ids",
            _split_perm_as_ids,
            "A permutation of 0 .. n_docs - 1 gives positions in the list of distinct ids, not ids: ids need not "
            "be 0 .. n_docs - 1, so map the positions back to the ids.",
        ),
        Mistake(
            "n_test counts examples",
            _split_count_rows,
            "The number held out is a number of DOCUMENTS: test_fraction times the number of distinct ids, "
            "not times the number of examples.",
        ),
        Mistake(
            "global random state",
            _split_global_rng,
            "The split changes from call to call: draw with a generator seeded by `seed` "
            "(torch.Generator().manual_seed(seed)), not from the global random state.",
        ),
        Mistake(
            "seed ignored",
            _split_seed_ignored,
            "Every seed gives the same split: seed the draw with `seed` itself.",
        ),
        Mistake(
            "no check of test_fraction",
            _split_no_check,
            "A test_fraction outside (0, 1) must raise ValueError with a message saying the allowed range: "
            "1.0 would hold out every document and leave nothing to train on.",
        ),
    ],
    output_names=("is_test",),
)


# --- train_probe ------------------------------------------------------------------------------------
#
# A trained probe is judged by what it reaches, not by its exact weights: the objective (mean cross-entropy
# plus the penalty) at the returned (W, b) within 0.1 % (plus 2e-4) of the reference fit's, and its training
# accuracy within 0.05. A float64 fit, a fit on shuffled rows or a hand-written Adam all meet this; each known
# mistake misses it on at least one case.

LOSS_RTOL, LOSS_ATOL, ACC_TOL = 1e-3, 2e-4, 0.05


@functools.cache
def _real_room_features(n_docs: int = 24):
    docs = list(_docs(n_docs, 5, ("rooms",)))
    doc, pos, label, _ = sol.room_query_labels(docs)
    acts = probes.residual_dataset(shared_model(), docs, doc, pos)
    return acts[2], label


def _report(W, b, x, y, weight_decay):
    """What the fit reaches, by trusted code: (objective, training accuracy, W requires grad, W's shape, b's shape)."""
    if not isinstance(W, torch.Tensor) or not isinstance(b, torch.Tensor):
        return ("not tensors", describe(W), describe(b))
    shapes = (tuple(W.shape), tuple(b.shape))
    if W.dim() != 2 or b.dim() != 1 or W.shape[0] != x.shape[1] or W.shape[1] != b.shape[0]:
        return ("shapes", shapes)
    grad = bool(W.requires_grad or b.requires_grad)
    with torch.no_grad():
        Wd, bd, xd = W.detach().double(), b.detach().double(), x.double()
        loss = float(probes.probe_loss(Wd, bd, xd, y, weight_decay))
        acc = float(((xd @ Wd + bd).argmax(-1) == y).double().mean())
    return (loss, acc, grad, shapes)


def _probe_call(fn, x, y, n_classes, weight_decay=3e-3, steps=200, lr=0.02):
    W, b = fn(x, y, n_classes, weight_decay=weight_decay, steps=steps, lr=lr)
    return _report(W, b, x, y, weight_decay)


def _probe_call_no_grad(fn, *args, **kwargs):
    with torch.no_grad():
        return _probe_call(fn, *args, **kwargs)


def _probe_call_twice(fn, x, y, n_classes, **kwargs):
    first = fn(x, y, n_classes, **kwargs)
    second = fn(x, y, n_classes, **kwargs)
    same = all(
        isinstance(a, torch.Tensor) and isinstance(c, torch.Tensor) and torch.equal(a, c) for a, c in zip(first, second)
    )
    return _report(*first, x, y, kwargs.get("weight_decay", 3e-3)), same


def _judge_report(expected, got, n_classes):
    if got[0] == "not tensors":
        return f"return (W, b) as two tensors, got {got[1]} and {got[2]}"
    if got[0] == "shapes" or got[3] != expected[3]:
        return f"W and b must have shapes {expected[3][0]} and {expected[3][1]} (d and k = {n_classes}), got {got[-1]}"
    loss, acc, grad, _ = got
    if grad:
        return "return (W, b) detached from the graph (they still require grad)"
    if not math.isfinite(loss):
        return f"the returned probe's objective is {loss}: the fit diverged or the weights hold NaN/inf"
    margin = LOSS_ATOL + LOSS_RTOL * abs(expected[0])
    if abs(loss - expected[0]) > margin:
        worse = "higher" if loss > expected[0] else "lower"
        return (
            f"the objective (mean cross-entropy + weight_decay * squared norm of W) at your (W, b) is {loss:.6f}, "
            f"{worse} than the reference fit's {expected[0]:.6f} by more than the margin {margin:.1e}: the fit does "
            "not follow the contract (objective, number of steps, learning rate or starting point)"
        )
    if abs(acc - expected[1]) > ACC_TOL:
        return f"training accuracy {acc:.3f}, the reference fit reaches {expected[1]:.3f} (margin {ACC_TOL})"
    return None


def _probe_judge(n_classes, twice=False):
    def judge(expected, got):
        if twice:
            (expected, _), (got, same) = expected, got
            msg = _judge_report(expected, got, n_classes)
            if msg is None and not same:
                return "two fits on the same data gave different probes; the fit must be deterministic (start at zero)"
            return msg
        return _judge_report(expected, got, n_classes)

    return judge


def _probe_case(label, args, kwargs, call=_probe_call, twice=False):
    return Case(label, args, kwargs, call=call, judge=_probe_judge(args[2], twice))


def _probe_cases():
    g = gen(20)
    centres = torch.randn(3, 5, generator=g) * 2
    y = torch.arange(40) % 3
    x = centres[y] + torch.randn(40, 5, generator=g)
    xb = torch.randn(30, 8, generator=g)
    yb = (xb[:, 0] + 0.5 * xb[:, 1] > 0).long()
    xi = torch.randn(60, 4, generator=g) + 1.5
    yi = (torch.rand(60, generator=g) < 0.15).long()  # imbalanced: the bias carries most of the fit
    xr, yr = _real_room_features()
    (zr,) = probes.standardize(xr)
    return [
        _probe_case(
            "3 classes, 40 points in 5 dims, 25 steps", (x, y, 3), {"weight_decay": 0.05, "steps": 25, "lr": 0.1}
        ),
        _probe_case(
            "binary, 30 points in 8 dims, 30 steps", (xb, yb, 2), {"weight_decay": 0.01, "steps": 30, "lr": 0.05}
        ),
        _probe_case(
            "binary, imbalanced (15 % positives), strong penalty: the bias must not be decayed",
            (xi, yi, 2),
            {"weight_decay": 0.3, "steps": 60, "lr": 0.1},
        ),
        _probe_case(
            "a class that never occurs (its logit is only pushed down)",
            (x, y, 4),
            {"weight_decay": 0.05, "steps": 10, "lr": 0.1},
        ),
        _probe_case(
            "TinyWorld rooms: blocks.1.hook_resid_post at the name, standardised, 8 rooms, 40 steps",
            (zr, yr, 8),
            {"weight_decay": 0.003, "steps": 40, "lr": 0.02},
        ),
        _probe_case(
            "behaviour: the fit learns when the caller has turned gradients off (torch.no_grad())",
            (xb, yb, 2),
            {"weight_decay": 0.01, "steps": 30, "lr": 0.05},
            call=_probe_call_no_grad,
        ),
        _probe_case(
            "behaviour: deterministic (two fits on the same data give the same probe)",
            (x, y, 3),
            {"weight_decay": 0.05, "steps": 25, "lr": 0.1},
            call=_probe_call_twice,
            twice=True,
        ),
    ]


def _fit(
    x,
    y,
    n_classes,
    weight_decay,
    steps,
    lr,
    *,
    zero_grad=True,
    decay_bias=False,
    reduction="mean",
    init="zeros",
    opt_decay=False,
    enable_grad=True,
    sgd=False,
    detached_penalty=False,
):
    d = x.shape[1]
    if init == "zeros":
        W = torch.zeros(d, n_classes, requires_grad=True)
    else:
        W = (torch.randn(d, n_classes) * 0.1).requires_grad_()
    b = torch.zeros(n_classes, requires_grad=True)
    if sgd:
        opt = torch.optim.SGD([W, b], lr=lr)
    else:
        opt = torch.optim.Adam([W, b], lr=lr, weight_decay=weight_decay if opt_decay else 0.0)
    with torch.enable_grad() if enable_grad else contextlib.nullcontext():
        for _ in range(steps):
            if zero_grad:
                opt.zero_grad()
            loss = F.cross_entropy(x @ W + b, y, reduction=reduction)
            if not opt_decay:
                penalty_W = W.detach() if detached_penalty else W
                loss = loss + weight_decay * (penalty_W.pow(2).sum() + (b.pow(2).sum() if decay_bias else 0))
            if not loss.requires_grad:  # gradients are off and the fit did not turn them on: nothing is learned
                break
            loss.backward()
            opt.step()
    return W.detach(), b.detach()


def _mk(**flags):
    def fit(x, y, n_classes, weight_decay=3e-3, steps=200, lr=0.02):
        return _fit(x, y, n_classes, weight_decay, steps, lr, **flags)

    return fit


register(
    "train_probe",
    CHAPTER,
    sol.train_probe,
    _probe_cases,
    mistakes=[
        Mistake(
            "no zero_grad",
            _mk(zero_grad=False),
            "Gradients accumulate in .grad from one backward pass to the next: clear them at every step.",
        ),
        Mistake(
            "bias decayed",
            _mk(decay_bias=True),
            "Penalise only the weights W, not the bias: shifting all of a class's logits is free, and the "
            "penalty on b pulls an imbalanced probe's bias away from the class frequencies.",
        ),
        Mistake(
            "weight decay in the optimizer",
            _mk(opt_decay=True),
            "Put the penalty in the objective; Adam's weight_decay= argument adds weight_decay * p to every "
            "gradient, bias included, which minimises a different objective.",
        ),
        Mistake(
            "summed loss",
            _mk(reduction="sum"),
            "Average the cross-entropy over the examples, don't sum it: the sum makes the penalty's strength "
            "depend on the dataset's size.",
        ),
        Mistake(
            "random initialisation",
            _mk(init="random"),
            "Start W and b at zero, so the fit is deterministic and probes fitted at different depths are comparable.",
        ),
        Mistake(
            "no training under no_grad",
            _mk(enable_grad=False),
            "When the caller has turned gradients off (torch.no_grad()), the loss has no graph and nothing is "
            "learned: turn gradients on for the fit itself (torch.enable_grad()).",
        ),
        Mistake(
            "penalty on detached weights",
            _mk(detached_penalty=True),
            "The penalty's value is right but it sends no gradient: it was computed from detached weights "
            "(W.detach(), W.data or a copy), so the fit ignores weight decay. Compute it from W itself.",
        ),
        Mistake(
            "plain gradient descent",
            _mk(sgd=True),
            "The contract's optimizer is Adam (torch's defaults besides lr); plain gradient descent at the same "
            "learning rate reaches a different objective in the same number of steps.",
        ),
    ],
)


# --- mass_mean_probe -----------------------------------------------------------------------------------


def _mass_mean_raises(fn, x, y, n_classes):
    try:
        out = fn(x, y, n_classes)
    except ValueError:
        return "raises ValueError"
    return ("returns", describe(out))


def _mass_mean_cases():
    g = gen(30)
    y5 = torch.tensor([0, 1, 1, 0, 1])
    x5 = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 3.0], [3.0, 1.0], [2.0, 2.0]])
    y = torch.randint(0, 4, (50,), generator=g)
    y[:4] = torch.arange(4)
    x = torch.randn(50, 6, generator=g) + y[:, None].float()
    xr, yr = _real_room_features()
    present = torch.unique(yr)
    remap = torch.full((8,), -1, dtype=torch.long)
    remap[present] = torch.arange(len(present))
    return [
        Case("binary, 5 points in 2 dims", (x5, y5, 2)),
        Case("random: 4 unequal classes, 50 points in 6 dims", (x, y, 4)),
        Case("a class with a single example", (x5, torch.tensor([0, 0, 2, 0, 1]), 3)),
        Case("TinyWorld rooms activations (rooms that occur, renumbered)", (xr, remap[yr], len(present))),
        Case(
            "edge: a class with no example must raise ValueError",
            (x5, torch.tensor([0, 0, 2, 2, 0]), 3),
            call=_mass_mean_raises,
        ),
    ]


def _mm_no_bias(x, y, n_classes):
    W, b = sol.mass_mean_probe(x, y, n_classes)
    return W, torch.zeros_like(b)


def _mm_bias_sign(x, y, n_classes):
    W, b = sol.mass_mean_probe(x, y, n_classes)
    return W, -b


def _mm_divide_by_n(x, y, n_classes):
    if (torch.bincount(y, minlength=n_classes) == 0).any():
        raise ValueError("a class has no example")
    sums = torch.zeros(n_classes, x.shape[1]).index_add_(0, y, x)
    means = sums / len(y)
    return means.T.contiguous(), -0.5 * means.pow(2).sum(-1)


def _mm_no_check(x, y, n_classes):
    counts = torch.bincount(y, minlength=n_classes)
    sums = torch.zeros(n_classes, x.shape[1]).index_add_(0, y, x)
    means = sums / counts[:, None]
    return means.T.contiguous(), -0.5 * means.pow(2).sum(-1)


register(
    "mass_mean_probe",
    CHAPTER,
    sol.mass_mean_probe,
    _mass_mean_cases,
    mistakes=[
        Mistake(
            "no bias",
            _mm_no_bias,
            "Without a bias the probe favours classes with large means; with minus half each mean's squared "
            "norm as the bias, the highest logit is the nearest class mean (expand the squared distance to see why).",
        ),
        Mistake(
            "bias sign",
            _mm_bias_sign,
            "The bias is MINUS half the squared norm of each class mean.",
        ),
        Mistake(
            "divided by all examples",
            _mm_divide_by_n,
            "Divide each class's sum by the number of examples IN THAT CLASS, not by n.",
        ),
        Mistake(
            "no check for a missing class",
            _mm_no_check,
            "A class with no example has no mean (0 / 0 gives NaN): raise ValueError naming the missing class.",
        ),
    ],
)


# --- auroc --------------------------------------------------------------------------------------------------


@functools.cache
def _model_sentiment_scores():
    docs = list(_docs(40, 6, ("reviews",)))
    ids, _ = tinyworld.batch_tokens(docs)
    pos = torch.tensor([d.answer_positions[-1] for d in docs])
    with torch.no_grad():
        logits = shared_model()(ids)[torch.arange(len(docs)), pos]
    score = logits[:, tinyworld.token_id("positive")] - logits[:, tinyworld.token_id("negative")]
    return score, torch.tensor([int(d.meta["sentiment"] > 0) for d in docs])


def _auroc_raises(fn, scores, labels):
    try:
        out = fn(scores, labels)
    except ValueError:
        return "raises ValueError"
    return ("returns", describe(out))


def _auroc_cases():
    g = gen(40)
    s = torch.randn(60, generator=g)
    lab = (s + torch.randn(60, generator=g) > 0).long()
    score, label = _model_sentiment_scores()
    fine = 1.0 + torch.tensor([3, 1, 4, 1, 5, 9, 2, 6], dtype=torch.float64) * 1e-10  # ties only in float32
    return [
        Case(
            "no ties, 3 positives, 2 negatives",
            (torch.tensor([0.9, 0.2, 0.7, 0.4, 0.1]), torch.tensor([1, 0, 1, 1, 0])),
        ),
        Case(
            "ties between a positive and a negative",
            (torch.tensor([1.0, 1.0, 0.5, 0.5, 2.0, 0.0]), torch.tensor([1, 0, 1, 0, 1, 0])),
        ),
        Case(
            "ties, negatives listed before positives",
            (torch.tensor([0.5, 1.0, 0.5, 1.0, 0.5, 3.0]), torch.tensor([0, 0, 1, 1, 1, 0])),
        ),
        Case(
            "boolean labels, a score that is mostly wrong",
            (torch.tensor([0.1, 0.8, 0.3, 0.9]), torch.tensor([True, False, True, False])),
        ),
        Case("every score equal (AUROC 0.5)", (torch.zeros(6), torch.tensor([0, 1, 0, 1, 1, 0]))),
        Case(
            "float64 scores that differ only below float32's precision",
            (fine, torch.tensor([1, 0, 1, 0, 1, 1, 1, 0])),
        ),
        Case("random: 60 noisy scores, rounded (many ties)", ((s * 2).round() / 2, lab)),
        Case("the model's own logit(positive) - logit(negative) on 40 reviews", (score, label)),
        Case(
            "edge: only one class must raise ValueError",
            (torch.tensor([0.1, 0.2, 0.3]), torch.tensor([1, 1, 1])),
            call=_auroc_raises,
        ),
    ]


def _auroc_strict(scores, labels):
    labels = labels.bool()
    pos, neg = scores[labels], scores[~labels]
    return (pos[:, None] > neg[None, :]).double().mean().item()


def _auroc_flipped(scores, labels):
    return 1.0 - sol.auroc(scores, labels)


def _auroc_accuracy(scores, labels):
    return ((scores > 0) == labels.bool()).double().mean().item()


def _auroc_sort_order(scores, labels):
    labels = labels.bool()
    ranks = torch.empty(len(scores), dtype=torch.float64)
    ranks[torch.argsort(scores, stable=True)] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    return (ranks[labels].sum().item() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def _auroc_float32(scores, labels):
    return sol.auroc(scores.float(), labels)


register(
    "auroc",
    CHAPTER,
    sol.auroc,
    _auroc_cases,
    mistakes=[
        Mistake(
            "ties count zero",
            _auroc_strict,
            "A tie between a positive and a negative counts one half, not zero (an uninformative constant "
            "score must get AUROC 0.5).",
        ),
        Mistake(
            "flipped",
            _auroc_flipped,
            "You computed the probability that a NEGATIVE outscores a positive: AUROC is P(score of a random "
            "positive > score of a random negative).",
        ),
        Mistake(
            "accuracy at threshold 0",
            _auroc_accuracy,
            "That is the accuracy of `score > 0`; AUROC uses no threshold: compare every positive with every "
            "negative (or use ranks).",
        ),
        Mistake(
            "ties broken by sort order",
            _auroc_sort_order,
            "Ranks from a sort break ties by position, so tied scores count as won or lost depending on the "
            "order of the examples: give tied scores their average rank (a tie counts one half).",
        ),
        Mistake(
            "scores rounded to float32",
            _auroc_float32,
            "Scores that differ only beyond float32's precision became ties: compare the scores in their own "
            "precision (or float64), never in a lower one.",
        ),
    ],
    atol=1e-6,
    rtol=1e-6,
)


# --- control_task_labels ----------------------------------------------------------------------------------
#
# The random draw is free: control labels are judged by their properties (a function of the type, in range,
# reproducible for a seed, different for other seeds, every class drawn about equally often).


def _control_call(fn, types, n_classes, seed):
    first = fn(types, n_classes, seed)
    again = fn(types, n_classes, seed)
    return first, again, [fn(types, n_classes, seed + k) for k in _OTHER_SEEDS]


def _control_judge(types, n_classes, seed, vary=True, uniform=False):
    def judge(expected, got):
        first, again, others = got
        for labels, what in [(first, f"seed {seed}"), *((m, f"seed {seed + k}") for m, k in zip(others, _OTHER_SEEDS))]:
            if not isinstance(labels, torch.Tensor) or labels.shape != types.shape or labels.is_floating_point():
                return f"with {what}: return an integer tensor of shape {tuple(types.shape)}, got {describe(labels)}"
            if labels.dtype == torch.bool:
                return f"with {what}: return integer class labels, not a bool mask"
            if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
                return (
                    f"with {what}: labels range from {int(labels.min())} to {int(labels.max())}; they must lie in "
                    f"0 .. {n_classes - 1}"
                )
            if len(labels):
                per_type = torch.full((int(types.max()) + 1,), -1, dtype=torch.long)
                per_type[types] = labels.long()  # one of each type's labels; any other label of that type differs
                differ = (per_type[types] != labels.long()).nonzero()[:, 0]
                if len(differ):
                    t = int(types[differ[0]])
                    return (
                        f"with {what}: examples of type {t} got different labels "
                        f"{torch.unique(labels[types == t]).tolist()}; every example of a type must get its type's label"
                    )
        if not torch.equal(first, again):
            return f"two calls with seed {seed} gave different labels; the labels must depend only on the seed"
        if vary and all(torch.equal(first, m) for m in others):
            return "every seed gave the same labels; the draw must depend on the seed"
        if uniform:
            per_type = torch.zeros(int(types.max()) + 1, dtype=torch.long)
            per_type[types] = first.long()
            counts = torch.bincount(per_type[torch.unique(types)], minlength=n_classes).double()
            share = counts / counts.sum()
            if (share - 1 / n_classes).abs().max() > 0.06:
                return (
                    f"the classes are drawn with frequencies {[round(v, 3) for v in share.tolist()]} over "
                    f"{len(torch.unique(types))} types; a uniform draw gives about {1 / n_classes:.3f} each"
                )
        return None

    return judge


def _control_case(label, types, n_classes, seed, **flags):
    return Case(
        label, (types, n_classes, seed), call=_control_call, judge=_control_judge(types, n_classes, seed, **flags)
    )


def _control_cases():
    g = gen(50)
    _, _, _, person = sol.room_query_labels(list(_docs(30, 7, ("rooms",))))
    many = torch.randint(0, 4000, (3000,), generator=g)
    return [
        _control_case("property: 3 types, repeated, 2 classes", torch.tensor([0, 1, 2, 0, 1, 2, 2]), 2, 0, vary=False),
        _control_case("property: types with gaps (ids 2, 5, 9)", torch.tensor([5, 2, 9, 9, 5, 2, 2]), 4, 1, vary=False),
        _control_case("property: 50 examples of 12 types, 8 classes", torch.randint(0, 12, (50,), generator=g), 8, 7),
        _control_case("property: the person asked about in TinyWorld rooms questions, 8 rooms", person, len(ROOMS), 3),
        _control_case(
            "property: every class drawn about equally often (2,000+ types, 5 classes)", many, 5, 11, uniform=True
        ),
        _control_case("edge: no examples", torch.zeros(0, dtype=torch.long), 3, 0, vary=False),
    ]


def _control_per_example(types, n_classes, seed=0):
    return torch.randint(0, n_classes, (len(types),), generator=torch.Generator().manual_seed(seed))


def _control_unseeded(types, n_classes, seed=0):
    if len(types) == 0:
        return torch.zeros(0, dtype=torch.long)
    table = torch.randint(0, n_classes, (int(types.max()) + 1,))
    return table[types]


def _control_seed_ignored(types, n_classes, seed=0):
    return sol.control_task_labels(types, n_classes, 0)


def _control_off_by_one(types, n_classes, seed=0):
    if len(types) == 0:
        return torch.zeros(0, dtype=torch.long)
    table = torch.randint(0, n_classes - 1, (int(types.max()) + 1,), generator=torch.Generator().manual_seed(seed))
    return table[types]


register(
    "control_task_labels",
    CHAPTER,
    sol.control_task_labels,
    _control_cases,
    mistakes=[
        Mistake(
            "one label per example",
            _control_per_example,
            "Draw one label per TYPE and give it to every example of that type. Labels drawn per example "
            "cannot be learned at all, so they measure nothing; the point of a control task is that a probe "
            "CAN fit it, by memorising type -> label.",
        ),
        Mistake(
            "global random state",
            _control_unseeded,
            "The labels change from call to call: draw with a generator seeded by `seed`, so the control task "
            "is the same every run.",
        ),
        Mistake(
            "seed ignored",
            _control_seed_ignored,
            "Every seed gives the same labels: seed the draw with `seed` itself.",
        ),
        Mistake(
            "last class never drawn",
            _control_off_by_one,
            "torch.randint's upper bound is exclusive: randint(0, n_classes - 1) never draws the last class.",
        ),
    ],
)


# --- edited_logits --------------------------------------------------------------------------------------------


@functools.cache
def _edit_batch():
    docs = list(_docs(6, 8, ("rooms",)))
    ids, _ = tinyworld.batch_tokens(docs)
    first = torch.tensor([d.answer_positions[0] for d in docs])  # the name of the first question
    last = torch.tensor([d.answer_positions[-1] for d in docs])  # the name of the last question
    assert (ids == tinyworld.token_id("<pad>")).any(), "the edit cases need right-padded rows"
    return ids, first, last


def _n_hooks(model) -> int:
    return sum(len(hp.fwd_hooks) + len(hp.bwd_hooks) for hp in model.hook_dict.values())


def _edit_call_hooks_left(fn, model, *args, **kwargs):
    """The output, and how many hooks the call left on the model (removed afterwards, so later cases are clean)."""
    before = _n_hooks(model)
    try:
        out = fn(model, *args, **kwargs)
    finally:
        left = _n_hooks(model) - before
        model.reset_hooks(including_permanent=False)
    return out, left


def _reset_after(call):
    """`call`, then remove any hook the function left, so that one case's leftover hook cannot edit the next case."""

    def wrapped(fn, model, *args, **kwargs):
        try:
            return call(fn, model, *args, **kwargs)
        finally:
            model.reset_hooks(including_permanent=False)

    return wrapped


def _plain_call(fn, *args, **kwargs):
    return fn(*args, **kwargs)


def _edit_judge_hooks(expected, got):
    out, left = got
    if left:
        return f"the call left {left} hook(s) on the model; every later forward pass would still be edited"
    return compare(expected[0], out, rtol=1e-3, atol=1e-3)


def _edit_raises(fn, *args, **kwargs):
    try:
        out = fn(*args, **kwargs)
    except ValueError:
        return "raises ValueError"
    return ("returns", describe(out))


def _edit_cases():
    model = shared_model()
    ids, pos, last_q = _edit_batch()
    d = model.cfg.d_model
    g = gen(60)
    rand = torch.randn(d, generator=g) * 3
    room = model.W_U[:, tinyworld.token_id("attic")].detach() - model.W_U[:, tinyworld.token_id("kitchen")].detach()
    last = model.cfg.n_layers - 1
    cases = [
        Case(
            "layer 1, add a random direction (right-padded rows)",
            (model, ids, 1, pos, rand),
            {"mode": "add", "alpha": 1.0},
        ),
        Case("layer 0, subtract 2x a random direction", (model, ids, 0, pos, rand), {"mode": "subtract", "alpha": 2.0}),
        Case(
            "layer 2, project out a random direction of norm > 1", (model, ids, 2, pos, rand), {"mode": "project_out"}
        ),
        Case(
            f"layer {last}, add attic - kitchen (unembedding), alpha 3",
            (model, ids, last, pos, room),
            {"mode": "add", "alpha": 3.0},
        ),
        Case(
            f"layer {last - 1}, project out attic - kitchen",
            (model, ids, last - 1, pos, room * 5),
            {"mode": "project_out"},
        ),
        Case(
            "behaviour: project_out ignores alpha (alpha 7)",
            (model, ids, 1, pos, rand),
            {"mode": "project_out", "alpha": 7.0},
        ),
        Case(
            "edit at the first question, read at the last question of each row",
            (model, ids, 1, pos, rand),
            {"mode": "add", "alpha": 2.0, "read_positions": last_q},
        ),
        Case(
            "edit at position 0 (<bos>), read at the first question",
            (model, ids, 0, torch.zeros_like(pos), rand),
            {"mode": "add", "alpha": 1.5, "read_positions": pos},
        ),
        Case(
            "behaviour: works under torch.no_grad()",
            (model, ids, 2, pos, room),
            {"mode": "add", "alpha": 2.0},
            call=under_no_grad,
        ),
        Case(
            "behaviour: leaves no hook on the model",
            (model, ids, 1, pos, rand),
            {"mode": "subtract", "alpha": 1.0},
            call=_edit_call_hooks_left,
            judge=_edit_judge_hooks,
        ),
        Case(
            "edge: an unknown mode must raise ValueError",
            (model, ids, 1, pos, rand),
            {"mode": "scale"},
            call=_edit_raises,
        ),
    ]
    for case in cases:
        case.call = _reset_after(case.call or _plain_call)
    return cases


def _edit_impl(
    model,
    tokens,
    layer,
    positions,
    direction,
    mode="add",
    alpha=1.0,
    read_positions=None,
    *,
    every_position=False,
    hook="resid_post",
    normalise=True,
    read_last=False,
    read_edited=False,
    alpha_in_projection=False,
    leave_hook=False,
):
    if mode not in ("add", "subtract", "project_out"):
        raise ValueError(mode)
    rows = torch.arange(tokens.shape[0])

    def edit(resid, hook):
        resid = resid.clone()
        v = resid if every_position else resid[rows, positions]
        if mode == "add":
            v = v + alpha * direction
        elif mode == "subtract":
            v = v - alpha * direction
        else:
            u = direction / direction.norm() if normalise else direction
            v = v - (alpha if alpha_in_projection else 1.0) * (v @ u)[..., None] * u
        if every_position:
            return v
        resid[rows, positions] = v
        return resid

    if leave_hook:
        model.add_hook(act_name(hook, layer), edit)
        logits = model(tokens)
    else:
        logits = model.run_with_hooks(tokens, fwd_hooks=[(act_name(hook, layer), edit)])
    if read_last:
        return logits[:, -1]
    return logits[rows, positions if read_positions is None or read_edited else read_positions]


def _mk_edit(**flags):
    def edit(model, tokens, layer, positions, direction, mode="add", alpha=1.0, read_positions=None):
        return _edit_impl(model, tokens, layer, positions, direction, mode, alpha, read_positions, **flags)

    return edit


register(
    "edited_logits",
    CHAPTER,
    sol.edited_logits,
    _edit_cases,
    mistakes=[
        Mistake(
            "every position edited",
            _mk_edit(every_position=True),
            "Edit only the vector at (b, positions[b]) of each row. Editing every position also changes the context.",
        ),
        Mistake(
            "resid_pre",
            _mk_edit(hook="resid_pre"),
            "Edit AFTER block `layer`, at its hook_resid_post (hook_resid_pre is before the block).",
        ),
        Mistake(
            "projection without normalising",
            _mk_edit(normalise=False),
            "Remove the component along the UNIT vector of the direction: with an unnormalised direction the "
            "edited vector is not orthogonal to it.",
        ),
        Mistake(
            "logits at the last position",
            _mk_edit(read_last=True),
            "Rows are right-padded, so the last position is padding for most rows: return the logits at each "
            "row's own read position.",
        ),
        Mistake(
            "read_positions ignored",
            _mk_edit(read_edited=True),
            "When read_positions is given, return the logits there (e.g. at the answer after the edited word), "
            "not at the edited positions.",
        ),
        Mistake(
            "alpha scales the projection",
            _mk_edit(alpha_in_projection=True),
            "project_out ignores alpha: it removes the whole component along the direction.",
        ),
        Mistake(
            "hook left on the model",
            _mk_edit(leave_hook=True),
            "A hook added with model.add_hook stays until removed, so every later forward pass is edited too: "
            "use model.run_with_hooks (or model.hooks(...)) so the hook is removed when the call ends.",
        ),
    ],
    rtol=1e-3,
    atol=1e-3,
)
