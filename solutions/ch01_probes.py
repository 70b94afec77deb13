"""Chapter 01 (linear probes): reference solutions of the exercises.

The exercises are `room_query_labels`, `document_split`, `train_probe`,
`mass_mean_probe`, `auroc`, `control_task_labels` and `edited_logits`. The datasets,
residual vectors and causal experiments the chapter builds on live in `interplab.probes`.

A probe is stored as a pair ``(W, b)`` with ``W`` of shape [d_model, n_classes] and
``b`` of shape [n_classes]: its logits are ``x @ W + b``. Binary latents (sentiment,
truth) use two classes, so every probe in the chapter has the same form.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from interplab import hooks
from interplab.tinyworld import NAMES, ROOMS, Doc

# --- exercise 1: labels from TinyWorld's annotations ----------------------------------------------


def room_query_labels(
    docs: Sequence[Doc],
) -> tuple[Int[Tensor, " n"], Int[Tensor, " n"], Int[Tensor, " n"], Int[Tensor, " n"]]:
    """Labelled examples of "the room person X is in", one per question "where is X".

    A rooms document asks questions "where is X" whose next word is the room X is in.
    There is one example per such question in the rooms documents of `docs` (documents
    of other families contribute none), ordered by document and, within a document, by
    position. Each example records:

    - doc: the index of its document in `docs` (other families count too, so that doc
      indexes `docs` itself),
    - position: the position of the name X, the last word of the question: where the
      model must produce the room, before the text says it,
    - label: the room X is in at that moment as a class 0 .. 7 (its index in ROOMS), as
      the generator annotated it (`Doc.rooms`); people move, so it is not always the
      first or the last room mentioned,
    - person: who is asked about, as an index in NAMES.

    Returns:
        (doc, position, label, person): four integer tensors of length n_questions, empty
        when no document asks a question.
    """
    doc_index, positions, labels, persons = [], [], [], []
    for i, d in enumerate(docs):
        if d.family != "rooms":
            continue
        for pos in range(2, len(d.tokens)):
            if d.tokens[pos - 2] == "where" and d.tokens[pos - 1] == "is":
                person = d.tokens[pos]
                doc_index.append(i)
                positions.append(pos)
                labels.append(ROOMS.index(d.rooms[pos][person]))
                persons.append(NAMES.index(person))
    columns = (doc_index, positions, labels, persons)
    return tuple(torch.tensor(column, dtype=torch.long) for column in columns)


# --- exercise 2: a split that holds out whole documents -------------------------------------------


def document_split(doc: Int[Tensor, " n"], test_fraction: float = 0.25, seed: int = 0) -> Bool[Tensor, " n"]:
    """Which examples go to the test set, holding out whole documents (no leakage).

    Examples from the same document share their context, so they must all land on the
    same side of the split: a probe tested on a document it was trained on can score by
    recognising the document. The held-out documents are a random draw, uniform over the
    distinct document ids, of test_fraction times their number, rounded to an integer.
    The draw depends only on `seed`: the same seed gives the same split (experiments
    are reproducible), another seed in general another one.

    Args:
        doc: the document id of each example (ids need not be contiguous or sorted).
        test_fraction: the fraction of documents held out, strictly between 0 and 1.
        seed: seed of the random draw.

    Returns:
        is_test: a bool mask over the examples, True for every example whose document
        is held out.

    Raises:
        ValueError: when test_fraction is not strictly between 0 and 1.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be strictly between 0 and 1, got {test_fraction}")
    docs = torch.unique(doc)
    perm = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed))
    n_test = round(test_fraction * len(docs))
    test_docs = docs[perm[:n_test]]
    return torch.isin(doc, test_docs)


# --- exercise 3: a logistic-regression probe --------------------------------------------------------


def train_probe(
    x: Float[Tensor, "n d"],
    y: Int[Tensor, " n"],
    n_classes: int,
    weight_decay: float = 3e-3,
    steps: int = 200,
    lr: float = 0.02,
) -> tuple[Float[Tensor, "d k"], Float[Tensor, " k"]]:
    """Fit a multinomial logistic-regression probe with full-batch Adam.

    The probe's logits are x W + b. The objective is the mean cross-entropy over the n
    examples plus weight_decay times the sum of the squared entries of W (the bias is not
    penalised: shifting every logit of a class is free). Minimise it with exactly `steps`
    steps of Adam (torch's defaults besides the learning rate `lr`), each on the whole
    batch, from W = 0 and b = 0: the fit is then deterministic, and probes fitted at
    different depths are comparable. The penalty belongs in the objective, not in the
    optimizer (Adam's own weight decay would decay the bias and rescale the penalty).
    The fit must happen even when the caller has turned gradients off.

    Args:
        x: features (e.g. residual-stream activations), one row per example.
        y: class labels in 0 .. n_classes - 1.
        n_classes: number of classes k (a class may have no example).
        weight_decay: strength of the L2 penalty on W.
        steps: number of optimizer steps.
        lr: Adam's learning rate.

    Returns:
        (W, b): float tensors of shape [d, k] and [k] in the floating dtype of x, detached
        from any graph. A correct fit reaches the objective of the reference fit within
        a small margin, whatever the order of the rows or the precision used inside.
    """
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= n_classes):
        raise ValueError(f"labels must lie in 0 .. {n_classes - 1}, got values from {int(y.min())} to {int(y.max())}")
    x = x.detach()
    W = torch.zeros(x.shape[1], n_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    b = torch.zeros(n_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    opt = torch.optim.Adam([W, b], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            loss = F.cross_entropy(x @ W + b, y) + weight_decay * W.pow(2).sum()
            loss.backward()
            opt.step()
    return W.detach(), b.detach()


# --- exercise 4: the difference-of-means ("mass-mean") probe ----------------------------------------


def mass_mean_probe(
    x: Float[Tensor, "n d"], y: Int[Tensor, " n"], n_classes: int
) -> tuple[Float[Tensor, "d k"], Float[Tensor, " k"]]:
    """A probe from class means alone (no training): the nearest-class-mean classifier.

    With mu_c the mean of the rows of x whose label is c, the probe's column c is mu_c
    and its bias for class c is minus half the squared norm of mu_c. Expanding the
    squared distance from x to mu_c shows why: the class with the highest logit is then
    the class whose mean is nearest to x. For two classes the decision direction (column
    1 minus column 0) is the difference of means mu_1 - mu_0, and the boundary lies
    halfway between the two means.

    Args:
        x: features, one row per example.
        y: class labels in 0 .. n_classes - 1; every class must occur.
        n_classes: number of classes k.

    Returns:
        (W, b): float tensors of shape [d, k] (the class means as columns) and [k].

    Raises:
        ValueError: when a class has no example (its mean does not exist).
    """
    counts = torch.bincount(y, minlength=n_classes)
    if len(counts) > n_classes or (counts == 0).any():
        missing = [c for c in range(n_classes) if c >= len(counts) or counts[c] == 0]
        raise ValueError(
            f"every class 0 .. {n_classes - 1} needs at least one example; missing or invalid: "
            f"{missing or sorted(set(y.tolist()) - set(range(n_classes)))}"
        )
    sums = torch.zeros(n_classes, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, y, x)
    means = sums / counts[:, None].to(x.dtype)
    return means.T.contiguous(), -0.5 * means.pow(2).sum(-1)


# --- exercise 5: AUROC -----------------------------------------------------------------------------------


def auroc(scores: Float[Tensor, " n"], labels: Int[Tensor, " n"]) -> float:
    """Area under the ROC curve of a binary score.

    It equals the probability that a randomly chosen positive example (label 1 or True)
    scores higher than a randomly chosen negative one (label 0 or False), with ties
    counting one half. Unlike accuracy it needs no threshold, so it is the fair way to
    compare a probe's raw scores (e.g. a difference of means, whose scale and offset are
    arbitrary). It depends only on the order of the scores.

    Args:
        scores: one score per example; higher means "more likely positive".
        labels: 0/1 or False/True; both classes must occur.

    Returns:
        The AUROC as a Python float in [0, 1]; 0.5 for a score that is constant.

    Raises:
        ValueError: when only one class occurs, or a label is not 0/1.
    """
    labels = labels.bool() if labels.dtype == torch.bool else labels
    if labels.dtype != torch.bool:
        if not torch.isin(labels, torch.tensor([0, 1], device=labels.device)).all():
            raise ValueError("labels must be 0/1 or booleans")
        labels = labels == 1
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs at least one positive and one negative example")
    _, inverse, counts = torch.unique(scores.double(), return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    average_rank = ends - (counts.double() - 1) / 2  # 1-based ranks, ties share the average rank
    rank_sum = average_rank[inverse][labels].sum().item()
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


# --- exercise 6: control tasks ---------------------------------------------------------------------------


def control_task_labels(types: Int[Tensor, " n"], n_classes: int, seed: int = 0) -> Int[Tensor, " n"]:
    """Labels of a control task (Hewitt and Liang, 2019): one random class per type.

    Each type (here: the person a question is about) gets one class drawn uniformly at
    random, independently of the other types, and every example of that type gets that
    class. A probe can only do well on this task by memorising type -> label; how well it
    does measures the probe's capacity to memorise, not what the model represents. The
    draw depends only on `seed`: the same seed gives the same labels, another seed in
    general other ones.

    Args:
        types: the type id (>= 0) of each example (ids need not be contiguous).
        n_classes: number of classes.
        seed: seed of the random draw.

    Returns:
        An integer tensor of control labels in 0 .. n_classes - 1, one per example, equal
        for examples of the same type; empty for no examples.
    """
    if len(types) == 0:
        return torch.zeros(0, dtype=torch.long)
    if int(types.min()) < 0:
        raise ValueError("type ids must be >= 0")
    table = torch.randint(0, n_classes, (int(types.max()) + 1,), generator=torch.Generator().manual_seed(seed))
    return table[types.cpu()].to(types.device)


# --- exercise 7: a causal edit along a direction -------------------------------------------------------


def edited_logits(
    model,
    tokens: Int[Tensor, "batch pos"],
    layer: int,
    positions: Int[Tensor, " batch"],
    direction: Float[Tensor, " d_model"],
    mode: str = "add",
    alpha: float = 1.0,
    read_positions: Int[Tensor, " batch"] | None = None,
) -> Float[Tensor, "batch vocab"]:
    """The model's logits after editing the residual stream along a direction at one position per row.

    After block `layer` (at blocks.{layer}.hook_resid_post), the residual vector v at
    (row b, positions[b]) of each row is replaced, and every other vector is left alone:

    - "add":         v + alpha * direction
    - "subtract":    v - alpha * direction
    - "project_out": v with its component along `direction` removed (alpha is ignored),
      so the edited vector is orthogonal to the direction whatever its norm.

    The rest of the forward pass runs on the edited stream. The edit may be read later
    in the sequence: the logits are returned at read_positions (default: the edited
    positions), e.g. at the answer a few words after the edited word. It works under
    torch.no_grad() and leaves no hook on the model.

    Args:
        model: a HookedTransformer.
        tokens: token ids (rows may be right-padded).
        layer: the block after which to edit.
        positions: the position to edit in each row.
        direction: the direction to edit along (not necessarily of norm 1).
        mode: "add", "subtract" or "project_out".
        alpha: the multiple of `direction` to add or subtract.
        read_positions: the position to read in each row (default: positions).

    Returns:
        A float tensor [batch, vocab]: row b holds the logits of row b at its read position.

    Raises:
        ValueError: for any other mode.
    """
    if mode not in ("add", "subtract", "project_out"):
        raise ValueError(f"mode must be 'add', 'subtract' or 'project_out', not {mode!r}")
    rows = torch.arange(tokens.shape[0])

    def hook(resid, hook):
        resid = resid.clone()
        v = resid[rows, positions]
        d = direction.to(v.device, v.dtype)
        if mode == "add":
            v = v + alpha * d
        elif mode == "subtract":
            v = v - alpha * d
        else:
            u = d / d.norm()
            v = v - (v @ u)[:, None] * u
        resid[rows, positions] = v
        return resid

    logits = model.run_with_hooks(tokens, fwd_hooks=[(hooks.act_name("resid_post", layer), hook)])
    return logits[rows, positions if read_positions is None else read_positions]
