"""Chapter 01 (linear probes): reference solutions, and the helpers the chapter builds on.

The graded exercises are `room_query_labels`, `document_split`, `train_probe`,
`mass_mean_probe`, `auroc`, `control_task_labels` and `edited_logits`. Everything else
here (activation datasets for several latents, per-layer probe sweeps, the causal-edit
experiment) is helper code used by the notebook, written with the graded functions.

A probe is stored as a pair ``(W, b)`` with ``W`` of shape [d_model, n_classes] and
``b`` of shape [n_classes]: its logits are ``x @ W + b``. Binary latents (sentiment,
truth) use two classes, so every probe in the chapter has the same form.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from interplab.tinyworld import NAMES, RELATIONS, ROOMS, Doc
from jaxtyping import Bool, Float, Int
from torch import Tensor

# --- exercise 1: labels from TinyWorld's annotations ----------------------------------------------


def room_query_labels(docs: Sequence[Doc]) -> tuple[Int[Tensor, " n"], Int[Tensor, " n"], Int[Tensor, " n"], Int[Tensor, " n"]]:
    """Labelled examples of "the room person X is in", one per question "where is X".

    Go through the documents in order; skip every document whose family is not "rooms".
    In a rooms document a question is the three words "where is X", and the room X is in
    follows as the answer. For each question (in order of position) record:

    - doc: the index of the document in `docs` (counting every document, not only rooms ones),
    - position: the position of the name X (the last word of the question, where the model
      must produce the room),
    - label: the room X is in at that point, as a class index ROOMS.index(room);
      the annotation doc.rooms[position] maps each person to their current room,
    - person: the person asked about, as NAMES.index(X).

    Returns:
        (doc, position, label, person): four int64 tensors of length n_questions (empty
        tensors when there is no question).
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
    same side of the split. Draw the test documents like this:

        docs = torch.unique(doc)                          # sorted document ids
        perm = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed))
        n_test = round(test_fraction * len(docs))          # a number of DOCUMENTS
        test_docs = docs[perm[:n_test]]

    Args:
        doc: the document id of each example (ids need not be contiguous).
        test_fraction: the fraction of documents held out, strictly between 0 and 1.
        seed: seed of the permutation.

    Returns:
        is_test: True for every example whose document is a test document.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be strictly between 0 and 1, got {test_fraction}")
    docs = torch.unique(doc)
    perm = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed))
    n_test = round(test_fraction * len(docs))
    test_docs = docs[perm[:n_test]]
    return torch.isin(doc, test_docs)


# --- exercise 3: a logistic-regression probe --------------------------------------------------------


def probe_logits(W: Float[Tensor, "d k"], b: Float[Tensor, " k"], x: Float[Tensor, "n d"]) -> Float[Tensor, "n k"]:
    """The logits of a linear probe: x @ W + b."""
    return x @ W + b


def probe_loss(W: Float[Tensor, "d k"], b: Float[Tensor, " k"], x: Float[Tensor, "n d"], y: Int[Tensor, " n"],
               weight_decay: float) -> Tensor:
    """Mean cross-entropy of the probe plus weight_decay * (sum of squared weights); the bias is not decayed."""
    return F.cross_entropy(probe_logits(W, b, x), y) + weight_decay * W.pow(2).sum()


def train_probe(
    x: Float[Tensor, "n d"],
    y: Int[Tensor, " n"],
    n_classes: int,
    weight_decay: float = 3e-3,
    steps: int = 200,
    lr: float = 0.02,
) -> tuple[Float[Tensor, "d k"], Float[Tensor, " k"]]:
    """Fit a multinomial logistic-regression probe with full-batch Adam.

    The probe's logits are x @ W + b. The loss is the mean cross-entropy over all n
    examples plus weight_decay * (W ** 2).sum() (the bias is not decayed). W and b
    start at zero, so the fit is deterministic. Each of the `steps` steps: zero the
    gradients, compute the loss on all examples, backpropagate, and take one step of
    torch.optim.Adam([W, b], lr=lr) (put the weight decay in the loss, not in the
    optimizer). Gradients must be on during the fit even if the caller turned them off.

    Args:
        x: features (e.g. residual-stream activations), one row per example.
        y: class labels in 0 .. n_classes - 1.
        n_classes: number of classes k.
        weight_decay: strength of the L2 penalty on W.
        steps: number of optimizer steps.
        lr: Adam's learning rate.

    Returns:
        (W, b), detached, with the dtype of x.
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
            loss = probe_loss(W, b, x, y, weight_decay)
            loss.backward()
            opt.step()
    return W.detach(), b.detach()


def probe_accuracy(W: Float[Tensor, "d k"], b: Float[Tensor, " k"], x: Float[Tensor, "n d"], y: Int[Tensor, " n"]) -> float:
    """Fraction of examples whose highest-scoring class is the label."""
    return (probe_logits(W, b, x).argmax(-1) == y).float().mean().item()


# --- exercise 4: the difference-of-means ("mass-mean") probe ----------------------------------------


def mass_mean_probe(x: Float[Tensor, "n d"], y: Int[Tensor, " n"], n_classes: int) -> tuple[Float[Tensor, "d k"], Float[Tensor, " k"]]:
    """A probe from class means alone (no training): the nearest-class-mean classifier.

    With mu_c the mean of the rows of x whose label is c, the probe is
    W[:, c] = mu_c and b[c] = -0.5 * ||mu_c||^2, so that argmax_c (x @ W + b)[c] is the
    class whose mean is nearest to x. For two classes the probe's decision direction
    W[:, 1] - W[:, 0] = mu_1 - mu_0 is the difference of means, and the boundary lies
    halfway between the two means.

    Args:
        x: features, one row per example.
        y: class labels in 0 .. n_classes - 1; every class must occur.
        n_classes: number of classes k.

    Returns:
        (W, b) with W of shape [d, k] and b of shape [k].
    """
    counts = torch.bincount(y, minlength=n_classes)
    if len(counts) > n_classes or (counts == 0).any():
        missing = [c for c in range(n_classes) if c >= len(counts) or counts[c] == 0]
        raise ValueError(f"every class 0 .. {n_classes - 1} needs at least one example; missing or invalid: "
                         f"{missing or sorted(set(y.tolist()) - set(range(n_classes)))}")
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
    arbitrary).

    Args:
        scores: one score per example; higher means "more likely positive".
        labels: 0/1 or False/True; both classes must occur.

    Returns:
        The AUROC as a Python float in [0, 1].
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

    Each type (here: the person a question is about) gets one class drawn at random,
    and every example of that type gets that class. A probe can only do well on this
    task by memorising type -> label; how well it does measures the probe's capacity
    to memorise, not what the model represents.

        table = torch.randint(0, n_classes, (types.max() + 1,), generator=torch.Generator().manual_seed(seed))

    and the label of example i is table[types[i]] (index the table by the type id itself).

    Args:
        types: the type id (>= 0) of each example.
        n_classes: number of classes.
        seed: seed of the random table.

    Returns:
        The control label of each example (int64).
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
) -> Float[Tensor, "batch vocab"]:
    """The model's logits at chosen positions after editing the residual stream along a direction.

    Hook `blocks.{layer}.hook_resid_post` and change only the vector v at
    (row b, positions[b]) of each row, leaving every other position alone:

    - "add":         v + alpha * direction
    - "subtract":    v - alpha * direction
    - "project_out": v - (v . u) u, with u = direction / ||direction|| (alpha is ignored)

    Args:
        model: a HookedTransformer.
        tokens: token ids (rows may be right-padded).
        layer: the block after which to edit.
        positions: one position per row.
        direction: the direction to edit along (not necessarily of norm 1).
        mode: "add", "subtract" or "project_out".
        alpha: the multiple of `direction` to add or subtract.

    Returns:
        The logits at (b, positions[b]) for each row b: [batch, vocab].
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

    logits = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.hook_resid_post", hook)])
    return logits[rows, positions]


# === helpers used by the notebook (not graded) ========================================================

LATENTS = {
    # latent: (family, positions, classes)
    "room": ("rooms", ("before", "question"), ROOMS),
    "sentiment": ("reviews", ("review end", "answer"), ["negative", "positive"]),
    "truth": ("truth", ("value", "answer"), ["false", "true"]),
}


def latent_examples(docs: Sequence[Doc], latent: str, where: str) -> dict[str, Tensor]:
    """Labelled positions for one latent: {"doc", "position", "label", "type", "group"} (int64 tensors).

    - room: the room of the person asked about (ROOMS index); where = "question" (the name
      X that ends "where is X") or "before" (the "is" just before it, where the text has not
      yet said who is asked about: a control); type = group = NAMES.index(X).
    - sentiment: 1 for a positive review, 0 for a negative one; where = "review end" (the
      "." that ends the last review sentence) or "answer" (the ":" of "overall :");
      type = token id of the review's last adjective; group = 1 if any sentence is negated.
    - truth: 1 for a true claim, 0 for a false one; where = "value" (the claimed value,
      e.g. "Paris" in "Alice lives in Paris") or "answer" (the "is" of "this is");
      type = token id of the claimed value; group = the relation's index in RELATIONS.

    `type` is what a control task assigns random labels to (a word a probe could memorise
    the label from); `group` is what the generalisation tests hold out.
    """
    from interplab.tinyworld import token_id

    if latent not in LATENTS:
        raise ValueError(f"latent must be one of {list(LATENTS)}, not {latent!r}")
    family, wheres, _ = LATENTS[latent]
    if where not in wheres:
        raise ValueError(f"for {latent!r}, where must be one of {wheres}, not {where!r}")
    keys = ("doc", "position", "label", "type", "group")
    if latent == "room":
        doc, pos, label, person = room_query_labels(docs)
        return dict(zip(keys, (doc, pos - int(where == "before"), label, person, person.clone())))
    rows = []
    for i, d in enumerate(docs):
        if d.family != family:
            continue
        answer = d.answer_positions[-1]
        if latent == "sentiment":
            end = answer - 2  # the "." before "overall :"
            pos = end if where == "review end" else answer
            rows.append((i, pos, int(d.meta["sentiment"] > 0), token_id(d.tokens[end - 1]), int(any(d.meta["negated"]))))
        else:
            value = d.tokens.index(d.meta["value"], 3)
            pos = value if where == "value" else answer
            rows.append((i, pos, d.meta["truth"], token_id(d.meta["value"]), list(RELATIONS).index(d.meta["relation"])))
    cols = list(zip(*rows)) if rows else [[]] * len(keys)
    return {k: torch.tensor(v, dtype=torch.long) for k, v in zip(keys, cols)}


def resid_hook_names(model) -> list[str]:
    """The residual stream at every depth: the embeddings, then the output of each block."""
    return ["blocks.0.hook_resid_pre"] + [f"blocks.{l}.hook_resid_post" for l in range(model.cfg.n_layers)]


@torch.no_grad()
def residual_dataset(model, docs: Sequence[Doc], doc: Int[Tensor, " n"], position: Int[Tensor, " n"],
                     batch_size: int = 128) -> Float[Tensor, "depth n d_model"]:
    """Residual-stream vectors at (doc[i], word position[i]) at every depth (see `resid_hook_names`).

    Positions count TinyWorld words. The documents go through the model's own tokenizer
    (`interplab.tinyworld.tokens_for`), and each word is read at its last token, where
    the whole word has been seen: with TinyWorld's tokenizer that is the word itself,
    with GPT-2's it may be the last of several pieces. Only the documents that occur in
    `doc` are run, and only the asked-for positions are kept, so memory grows with the
    number of examples.
    """
    from interplab.activations import collect
    from interplab.tinyworld import tokens_for

    used = torch.unique(doc)
    mt = tokens_for(model, [docs[i] for i in used.tolist()])
    row = torch.searchsorted(used, doc)
    token_pos = mt.last[row, position]
    if (token_pos < 0).any():
        raise ValueError("a position lies past the end of its document")
    mask = torch.zeros(mt.ids.shape, dtype=torch.bool)
    mask[row, token_pos] = True
    if int(mask.sum()) != len(doc):
        raise ValueError("two examples share a (document, position); each must be unique")
    acts = collect(model, mt.ids, resid_hook_names(model), mask=mask, batch_size=batch_size, progress=False)
    # collect keeps positions in (row, position) order; put them back in the examples' order
    order = torch.argsort(row * mt.ids.shape[1] + token_pos)
    out = torch.empty(len(acts), len(doc), model.cfg.d_model)
    for depth, name in enumerate(resid_hook_names(model)):
        out[depth, order] = acts[name]
    return out


def latent_dataset(model, docs: Sequence[Doc], latent: str) -> dict[str, tuple[dict[str, Tensor], Tensor]]:
    """For each position of a latent (see `LATENTS`): its examples and their residual vectors at every depth.

    Returns {where: (examples, acts)}, examples as from `latent_examples` and acts of shape
    [depth, n, d_model]; all positions come from one pass over the documents.
    """
    wheres = LATENTS[latent][1]
    examples = {w: latent_examples(docs, latent, w) for w in wheres}
    acts = residual_dataset(model, docs, torch.cat([e["doc"] for e in examples.values()]),
                            torch.cat([e["position"] for e in examples.values()]))
    out, start = {}, 0
    for w, e in examples.items():
        n = len(e["doc"])
        out[w] = (e, acts[:, start : start + n])
        start += n
    return out


def standardize(x_train: Float[Tensor, "n d"], *others: Tensor, eps: float = 1e-6) -> tuple[Tensor, ...]:
    """Centre and scale every feature with the TRAINING set's mean and std (applied to all sets)."""
    mean, std = x_train.mean(0), x_train.std(0) + eps
    return tuple((x - mean) / std for x in (x_train, *others))


def raw_space_probe(x_train: Float[Tensor, "n d"], y: Int[Tensor, " n"], n_classes: int,
                    fit=None) -> tuple[Float[Tensor, "d k"], Float[Tensor, " k"]]:
    """A probe fit on standardized features, rewritten to act on raw residual vectors.

    With z = (x - mean) / std, z @ W + b = x @ (W / std) + (b - (mean / std) @ W), so the
    returned (W', b') classify raw vectors exactly as (W, b) classifies standardized ones;
    the columns of W' are the probe's directions in the residual stream itself.
    `fit(z, y, n_classes) -> (W, b)` defaults to `train_probe` (e.g. `mass_mean_probe`).
    """
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    W, b = (fit or train_probe)((x_train - mean) / std, y, n_classes)
    return W / std[:, None], b - (mean / std) @ W


def random_like(direction: Float[Tensor, " d"], seed: int = 0) -> Float[Tensor, " d"]:
    """A random direction (isotropic Gaussian) with the same norm as `direction`."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(direction.shape, generator=g, dtype=direction.dtype)
    return r / r.norm() * direction.norm()


def random_directions(d: int, k: int, seed: int = 0) -> Float[Tensor, "d k"]:
    """k random Gaussian directions in d dimensions (columns), e.g. a random subspace to compare with a probe's."""
    return torch.randn(d, k, generator=torch.Generator().manual_seed(seed))


def _answers(model, tokens, positions, class_tokens, hook_name=None, edit=None, chunk: int = 32) -> Tensor:
    """The model's answer (index into class_tokens) at each example's position.

    With `edit(v, rows) -> v'`, the vectors v at (b, positions[b]) of `hook_name` are replaced
    first. Examples are run in chunks of similar length, each cut after its last position,
    so that little time goes into padding.
    """
    order = torch.argsort(positions)
    answers = torch.empty(len(positions), dtype=torch.long)
    for start in range(0, len(order), chunk):
        idx = order[start : start + chunk]
        pos = positions[idx]
        toks = tokens[idx, : int(pos.max()) + 1]
        rows = torch.arange(len(idx))
        hooks = []
        if edit is not None:
            def hook(resid, hook, idx=idx, pos=pos, rows=rows):
                resid = resid.clone()
                resid[rows, pos] = edit(resid[rows, pos], idx)
                return resid
            hooks = [(hook_name, hook)]
        logits = model.run_with_hooks(toks, fwd_hooks=hooks)[rows, pos]
        answers[idx] = logits[:, list(class_tokens)].argmax(-1).cpu()
    return answers


@torch.no_grad()
def steering_effect(model, tokens: Int[Tensor, "batch pos"], positions: Int[Tensor, " batch"],
                    labels: Int[Tensor, " batch"], probes: dict[int, dict[str, Float[Tensor, "d k"]]],
                    class_tokens: Sequence[int], scale: float = 0.5, seed: int = 0) -> dict:
    """Push each example from its true class s towards t = (s + 1) % k along each probe's directions.

    For each layer in `probes` ({layer: {name: W}}), after that block, at each example's
    position, add a vector of norm `scale` x (the mean residual norm there) along
    W[:, t] - W[:, s]; the baseline "random" adds a random direction of the same norm
    (one per example). The model's answer is its highest logit among `class_tokens`.

    Returns {"clean": accuracy without edits, layer: {name: {"to_target": fraction of
    answers that become t, "still_correct": fraction that stay s}}} with "random" among
    the names.
    """
    from interplab.activations import collect

    targets = (labels + 1) % len(class_tokens)
    rows = torch.arange(len(tokens))
    names = [f"blocks.{layer}.hook_resid_post" for layer in probes]
    at = torch.zeros(tokens.shape, dtype=torch.bool)
    at[rows, positions.cpu()] = True
    resid = collect(model, tokens, names, mask=at, batch_size=32, progress=False)  # only these hooks, only these positions
    out: dict = {"clean": (_answers(model, tokens, positions, class_tokens) == labels).float().mean().item()}
    gen = torch.Generator().manual_seed(seed)
    for layer, by_name in probes.items():
        hook_name = f"blocks.{layer}.hook_resid_post"
        norm = resid[hook_name].norm(dim=-1).mean()
        edits = {}
        for name, W in by_name.items():
            d = (W[:, targets] - W[:, labels]).T.float()
            edits[name] = d / d.norm(dim=-1, keepdim=True) * scale * norm
        r = torch.randn(len(tokens), model.cfg.d_model, generator=gen)
        edits["random"] = r / r.norm(dim=-1, keepdim=True) * scale * norm
        out[layer] = {}
        for name, e in edits.items():
            answer = _answers(model, tokens, positions, class_tokens, hook_name,
                              lambda v, idx, e=e: v + e[idx].to(v.device, v.dtype))
            out[layer][name] = {"to_target": (answer == targets).float().mean().item(),
                                "still_correct": (answer == labels).float().mean().item()}
    return out


def orthonormal_basis(directions: Float[Tensor, "d k"]) -> Float[Tensor, "d r"]:
    """An orthonormal basis of the span of the columns (QR; near-zero columns dropped)."""
    q, r = torch.linalg.qr(directions)
    keep = r.diagonal().abs() > 1e-6 * r.diagonal().abs().max()
    return q[:, keep]


@torch.no_grad()
def ablated_accuracy(model, tokens: Int[Tensor, "batch pos"], positions: Int[Tensor, " batch"],
                     labels: Int[Tensor, " batch"], layer: int, directions: Float[Tensor, "d k"],
                     class_tokens: Sequence[int]) -> float:
    """The model's accuracy (among the class tokens) after projecting out the span of `directions`.

    The edit is the same as `edited_logits`'s "project_out", for a whole subspace at once:
    v - Q Q^T v with Q an orthonormal basis of the span, at each example's position after
    block `layer`.
    """
    q = orthonormal_basis(directions.to(torch.float32))

    def project_out(v, idx):
        qq = q.to(v.device, v.dtype)
        return v - (v @ qq) @ qq.T

    answers = _answers(model, tokens, positions, class_tokens, f"blocks.{layer}.hook_resid_post", project_out)
    return (answers == labels).float().mean().item()


def prefix_tokens(model, docs: Sequence[Doc], doc: Int[Tensor, " n"],
                  position: Int[Tensor, " n"]) -> tuple[Int[Tensor, "n pos"], Int[Tensor, " n"]]:
    """Each example's document as `model`'s tokens, one row per example, and where its word position went.

    Positions count TinyWorld words; the returned token positions are each word's last
    token (see `residual_dataset`), where the model predicts the next word. Rows are
    right-padded and cut after the last asked-for position; the ids are on the model's
    device.

    Returns:
        (ids [n, pos], token_positions [n]).
    """
    from interplab.tinyworld import tokens_for

    mt = tokens_for(model, [docs[i] for i in doc.tolist()])
    token_pos = mt.last[torch.arange(len(doc)), position]
    if (token_pos < 0).any():
        raise ValueError("a position lies past the end of its document")
    return mt.ids[:, : int(token_pos.max()) + 1].to(model.cfg.device), token_pos


def word_token_ids(model, words: Sequence[str]) -> list[int]:
    """For each word, the token the model predicts to start it in running text (its answer token).

    With TinyWorld's tokenizer this is the word's own id. With a subword tokenizer it is
    the first token of the word after a space (" kitchen" in GPT-2), as the word appears
    mid-sentence. Raises ValueError when two words start with the same token: the model's
    logits could not tell them apart.
    """
    from interplab.tinyworld import tokens_for

    mt = tokens_for(model, [["<bos>", "the", w] for w in words])
    ids = [int(mt.ids[i, mt.first[i, 2]]) for i in range(len(words))]
    if len(set(ids)) < len(ids):
        clash = [w for w, i in zip(words, ids) if ids.count(i) > 1]
        raise ValueError(f"these words start with the same token for {model.cfg.model_name}: {clash}")
    return ids
