"""Chapter 01 (linear probes): labelled datasets, probes, AUROC, control tasks and a causal edit."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .. import probes, tinyworld
from ..grading.compare import compare
from ..hooks import act_name
from ..paths import chapter_of
from ..solutions import ch01_probes as sol
from ..tinyworld import ROOMS, Doc
from . import Case, Mistake, gen, register, shared_model

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


def _split_cases():
    g = gen(10)
    rnd = torch.randint(0, 30, (80,), generator=g).sort().values
    doc, _, _, _ = sol.room_query_labels(list(_docs(40, 4, ("rooms",))))
    return [
        Case("4 documents, 8 examples, half held out", (torch.tensor([0, 0, 1, 1, 1, 2, 3, 3]), 0.5, 0)),
        Case("non-contiguous document ids", (torch.tensor([3, 3, 7, 10, 10, 10, 42, 42, 42, 42, 50]), 0.4, 1)),
        Case("random: 80 examples from up to 30 documents", (rnd, 0.25, 2)),
        Case("examples in any order (not sorted by document)", (rnd[torch.randperm(80, generator=g)], 0.3, 3)),
        Case("TinyWorld rooms questions (several per document)", (doc, 0.25, 0)),
    ]


def _split_rows(doc, test_fraction=0.25, seed=0):
    perm = torch.randperm(len(doc), generator=torch.Generator().manual_seed(seed))
    out = torch.zeros(len(doc), dtype=torch.bool)
    out[perm[: round(test_fraction * len(doc))]] = True
    return out


def _split_perm_as_ids(doc, test_fraction=0.25, seed=0):
    n_docs = len(torch.unique(doc))
    perm = torch.randperm(n_docs, generator=torch.Generator().manual_seed(seed))
    return torch.isin(doc, perm[: round(test_fraction * n_docs)])


def _split_count_rows(doc, test_fraction=0.25, seed=0):
    docs = torch.unique(doc)
    perm = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed))
    return torch.isin(doc, docs[perm[: round(test_fraction * len(doc))]])


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
            "context with the training set (leakage). Permute the unique document ids instead.",
        ),
        Mistake(
            "permutation used as ids",
            _split_perm_as_ids,
            "The permutation gives positions in the sorted list of document ids, not ids: use "
            "docs[perm[:n_test]] with docs = torch.unique(doc) (ids need not be 0 .. n_docs-1).",
        ),
        Mistake(
            "n_test counts examples",
            _split_count_rows,
            "n_test is a number of documents: round(test_fraction * len(docs)), not of examples.",
        ),
    ],
)


# --- train_probe ------------------------------------------------------------------------------------


@functools.cache
def _real_room_features(n_docs: int = 24):
    docs = list(_docs(n_docs, 5, ("rooms",)))
    doc, pos, label, _ = sol.room_query_labels(docs)
    acts = probes.residual_dataset(shared_model(), docs, doc, pos)
    return acts[2], label


def _probe_cases():
    g = gen(20)
    centres = torch.randn(3, 5, generator=g) * 2
    y = torch.arange(40) % 3
    x = centres[y] + torch.randn(40, 5, generator=g)
    xb = torch.randn(30, 8, generator=g)
    yb = (xb[:, 0] + 0.5 * xb[:, 1] > 0).long()
    xr, yr = _real_room_features()
    return [
        Case("3 classes, 40 points in 5 dims, 25 steps", (x, y, 3), {"weight_decay": 0.05, "steps": 25, "lr": 0.1}),
        Case("binary, 30 points in 8 dims, 30 steps", (xb, yb, 2), {"weight_decay": 0.01, "steps": 30, "lr": 0.05}),
        Case(
            "a class that never occurs (its logit is only pushed down)",
            (x, y, 4),
            {"weight_decay": 0.05, "steps": 10, "lr": 0.1},
        ),
        Case(
            "TinyWorld rooms: blocks.1.hook_resid_post at '?', 8 rooms, 20 steps",
            (xr, yr, 8),
            {"weight_decay": 0.001, "steps": 20, "lr": 0.01},
        ),
    ]


def _compare_probe(expected, got):
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        return compare(expected, got)
    if any(isinstance(t, torch.Tensor) and t.requires_grad for t in got):
        return "return detached tensors (W.detach(), b.detach()), not ones that still require grad"
    return compare(tuple(expected), tuple(got), rtol=1e-3, atol=1e-4)


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
):
    d = x.shape[1]
    if init == "zeros":
        W = torch.zeros(d, n_classes, requires_grad=True)
    else:
        W = (torch.randn(d, n_classes) * 0.1).requires_grad_()
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.Adam([W, b], lr=lr, weight_decay=weight_decay if opt_decay else 0.0)
    with torch.enable_grad():
        for _ in range(steps):
            if zero_grad:
                opt.zero_grad()
            loss = F.cross_entropy(x @ W + b, y, reduction=reduction)
            if not opt_decay:
                loss = loss + weight_decay * (W.pow(2).sum() + (b.pow(2).sum() if decay_bias else 0))
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
            "Gradients accumulate in .grad: call opt.zero_grad() at the start of every step.",
        ),
        Mistake(
            "bias decayed",
            _mk(decay_bias=True),
            "Decay only the weights: the penalty is weight_decay * (W ** 2).sum(), without the bias.",
        ),
        Mistake(
            "weight decay in the optimizer",
            _mk(opt_decay=True),
            "Put the penalty in the loss (weight_decay * (W ** 2).sum()); Adam's weight_decay= argument adds "
            "weight_decay * p to every gradient, bias included, which is a different objective.",
        ),
        Mistake(
            "summed loss",
            _mk(reduction="sum"),
            "Average the cross-entropy over the examples (the mean, F.cross_entropy's default), don't sum it: "
            "the sum makes the weight decay's strength depend on the dataset's size.",
        ),
        Mistake(
            "random initialisation",
            _mk(init="random"),
            "Start W and b at zero (torch.zeros), so the fit is deterministic and the same as the reference.",
        ),
    ],
    compare=_compare_probe,
)


# --- mass_mean_probe -----------------------------------------------------------------------------------


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
        Case("TinyWorld rooms activations (rooms that occur, renumbered)", (xr, remap[yr], len(present))),
    ]


def _mm_no_bias(x, y, n_classes):
    W, b = sol.mass_mean_probe(x, y, n_classes)
    return W, torch.zeros_like(b)


def _mm_bias_sign(x, y, n_classes):
    W, b = sol.mass_mean_probe(x, y, n_classes)
    return W, -b


def _mm_divide_by_n(x, y, n_classes):
    sums = torch.zeros(n_classes, x.shape[1]).index_add_(0, y, x)
    means = sums / len(y)
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
            "Without b[c] = -0.5 * ||mu_c||^2 the probe favours classes with large means; with it, "
            "argmax(x @ W + b) is the nearest class mean (expand ||x - mu_c||^2 to see why).",
        ),
        Mistake(
            "bias sign",
            _mm_bias_sign,
            "The bias is MINUS half the squared norm of each class mean: b[c] = -0.5 * ||mu_c||^2.",
        ),
        Mistake(
            "divided by all examples",
            _mm_divide_by_n,
            "Divide each class's sum by the number of examples IN THAT CLASS (torch.bincount(y)), not by n.",
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


def _auroc_cases():
    g = gen(40)
    s = torch.randn(60, generator=g)
    lab = (s + torch.randn(60, generator=g) > 0).long()
    score, label = _model_sentiment_scores()
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
            "boolean labels, a score that is mostly wrong",
            (torch.tensor([0.1, 0.8, 0.3, 0.9]), torch.tensor([True, False, True, False])),
        ),
        Case("every score equal (AUROC 0.5)", (torch.zeros(6), torch.tensor([0, 1, 0, 1, 1, 0]))),
        Case("random: 60 noisy scores, rounded (many ties)", ((s * 2).round() / 2, lab)),
        Case("the model's own logit(positive) - logit(negative) on 40 reviews", (score, label)),
    ]


def _auroc_strict(scores, labels):
    labels = labels.bool()
    pos, neg = scores[labels], scores[~labels]
    return (pos[:, None] > neg[None, :]).double().mean().item()


def _auroc_flipped(scores, labels):
    return 1.0 - sol.auroc(scores, labels)


def _auroc_accuracy(scores, labels):
    return ((scores > 0) == labels.bool()).double().mean().item()


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
    ],
    atol=1e-6,
    rtol=1e-6,
)


# --- control_task_labels ----------------------------------------------------------------------------------


def _control_cases():
    g = gen(50)
    _, _, _, person = sol.room_query_labels(list(_docs(30, 7, ("rooms",))))
    return [
        Case("3 types, repeated, 2 classes", (torch.tensor([0, 1, 2, 0, 1, 2, 2]), 2, 0)),
        Case("types with gaps (ids 2, 5, 9)", (torch.tensor([5, 2, 9, 9, 5, 2, 2]), 4, 1)),
        Case("random: 50 examples of 12 types, 8 classes", (torch.randint(0, 12, (50,), generator=g), 8, 7)),
        Case("TinyWorld: the person asked about in each rooms question, 8 rooms", (person, len(ROOMS), 3)),
    ]


def _control_per_example(types, n_classes, seed=0):
    return torch.randint(0, n_classes, (len(types),), generator=torch.Generator().manual_seed(seed))


def _control_unseeded(types, n_classes, seed=0):
    table = torch.randint(0, n_classes, (int(types.max()) + 1,))
    return table[types]


def _control_compact(types, n_classes, seed=0):
    uniq, inverse = torch.unique(types, return_inverse=True)
    table = torch.randint(0, n_classes, (len(uniq),), generator=torch.Generator().manual_seed(seed))
    return table[inverse]


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
            "ignores the seed",
            _control_unseeded,
            "Use generator=torch.Generator().manual_seed(seed), so the control task is the same every run.",
        ),
        Mistake(
            "table over unique types",
            _control_compact,
            "Make the table types.max() + 1 long and index it by the type id itself (table[types]), not by "
            "the type's rank among the types present.",
        ),
    ],
)


# --- edited_logits --------------------------------------------------------------------------------------------


@functools.cache
def _edit_batch():
    docs = list(_docs(6, 8, ("rooms",)))
    ids, _ = tinyworld.batch_tokens(docs)
    pos = torch.tensor([d.answer_positions[0] for d in docs])  # the name of the first question
    return ids, pos


def _edit_cases():
    model = shared_model()
    ids, pos = _edit_batch()
    d = model.cfg.d_model
    g = gen(60)
    rand = torch.randn(d, generator=g) * 3
    room = model.W_U[:, tinyworld.token_id("attic")].detach() - model.W_U[:, tinyworld.token_id("kitchen")].detach()
    last = model.cfg.n_layers - 1
    return [
        Case("layer 1, add a random direction", (model, ids, 1, pos, rand), {"mode": "add", "alpha": 1.0}),
        Case("layer 0, subtract 2x a random direction", (model, ids, 0, pos, rand), {"mode": "subtract", "alpha": 2.0}),
        Case("layer 2, project out a random direction", (model, ids, 2, pos, rand), {"mode": "project_out"}),
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
    ]


def _edit_impl(
    model,
    tokens,
    layer,
    positions,
    direction,
    mode="add",
    alpha=1.0,
    *,
    every_position=False,
    hook="resid_post",
    normalise=True,
    read_last=False,
):
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
            v = v - (v @ u)[..., None] * u
        if every_position:
            return v
        resid[rows, positions] = v
        return resid

    logits = model.run_with_hooks(tokens, fwd_hooks=[(act_name(hook, layer), edit)])
    return logits[:, -1] if read_last else logits[rows, positions]


def _mk_edit(**flags):
    def edit(model, tokens, layer, positions, direction, mode="add", alpha=1.0):
        return _edit_impl(model, tokens, layer, positions, direction, mode, alpha, **flags)

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
            "Edit only the vector at (b, positions[b]) of each row: resid[rows, positions], with "
            "rows = torch.arange(batch). Editing every position also changes the context.",
        ),
        Mistake(
            "resid_pre",
            _mk_edit(hook="resid_pre"),
            "Edit AFTER block `layer`: the hook is f'blocks.{layer}.hook_resid_post' (hook_resid_pre is before it).",
        ),
        Mistake(
            "projection without normalising",
            _mk_edit(normalise=False),
            "Project out the UNIT vector u = direction / direction.norm(): v - (v . u) u. With an unnormalised "
            "direction the edit is not a projection.",
        ),
        Mistake(
            "logits at the last position",
            _mk_edit(read_last=True),
            "Rows are right-padded, so the last position is padding for most rows: return the logits at "
            "(b, positions[b]).",
        ),
    ],
    rtol=1e-3,
    atol=1e-3,
)
