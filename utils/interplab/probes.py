"""Linear probes and the experiments around them (chapter 01): labelled datasets, residual vectors, probes, edits.

- Labels: `room_query_labels` ("where is X" questions and X's room), `latent_examples` and
  `LATENTS` (room, sentiment, truth at two positions each, with the type a control task
  memorises and the group a generalisation test holds out).
- Activations: `residual_dataset` (the residual stream at every depth, at chosen word
  positions, through any model's tokenizer), `latent_dataset`, `prefix_tokens`, `word_token_ids`.
- Probes: `fit_probe` (logistic regression fitted to its optimum with full-batch L-BFGS,
  as fast as scikit-learn's), `train_probe` (the same loss, a fixed number of full-batch
  Adam steps: the chapter's exercise), `probe_logits`, `probe_loss`, `probe_accuracy`,
  `standardize`, `raw_space_probe`, `document_split`.
- Causal tests: `dose_response` (edits along probe directions at several sizes, run by any
  implementation of the chapter's `edited_logits`, with per-example margins and log-probabilities),
  `ablation_effect` (project out a probe's subspace; accuracy, margin and probability),
  `shuffled_label_probe` (a matched baseline direction), `bootstrap_ci` (intervals over documents),
  `steering_effect`, `ablated_accuracy`, `orthonormal_basis`, `random_like`, `random_directions`.

A probe is a pair ``(W, b)`` with ``W`` of shape [d_model, n_classes] and ``b`` of shape
[n_classes]: its logits are ``x @ W + b``. Binary latents (sentiment, truth) use two
classes, so every probe has the same form.

`room_query_labels`, `document_split` and `train_probe` are also exercises of chapter 01:
the versions here are the library's own, and tests hold them to the exercises' cases
(so `train_probe` stays a plain gradient loop; `fit_probe` is the fit to use for speed).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from .activations import collect
from .hooks import act_name
from .tinyworld import NAMES, RELATIONS, ROOMS, Doc, token_id, tokens_for

# --- labels and splits ----------------------------------------------------------------------------------


def room_query_labels(
    docs: Sequence[Doc],
) -> tuple[Int[Tensor, " n"], Int[Tensor, " n"], Int[Tensor, " n"], Int[Tensor, " n"]]:
    """One labelled example per question "where is X" of the rooms documents among ``docs``.

    Returns (doc, position, label, person), four int64 tensors: the index of the document
    in ``docs``, the position of the name X, X's room there (ROOMS index, from the
    annotation ``doc.rooms[position]``) and NAMES.index(X).
    """
    rows = []
    for i, d in enumerate(docs):
        if d.family != "rooms":
            continue
        for pos in range(2, len(d.tokens)):
            if d.tokens[pos - 2 : pos] == ["where", "is"]:
                person = d.tokens[pos]
                rows.append((i, pos, ROOMS.index(d.rooms[pos][person]), NAMES.index(person)))
    columns = list(zip(*rows)) if rows else [(), (), (), ()]
    return tuple(torch.tensor(column, dtype=torch.long) for column in columns)


def document_split(doc: Int[Tensor, " n"], test_fraction: float = 0.25, seed: int = 0) -> Bool[Tensor, " n"]:
    """A test-set mask that holds out whole documents: round(test_fraction * n_documents) of them, drawn with ``seed``.

    Examples of one document share their context, so they all land on the same side.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be strictly between 0 and 1, got {test_fraction}")
    ids = torch.unique(doc)
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))
    return torch.isin(doc, ids[order[: round(test_fraction * len(ids))]])


# --- probes ------------------------------------------------------------------------------------------------


def probe_logits(W: Float[Tensor, "d k"], b: Float[Tensor, " k"], x: Float[Tensor, "n d"]) -> Float[Tensor, "n k"]:
    """The logits of a linear probe: x @ W + b."""
    return x @ W + b


def probe_loss(
    W: Float[Tensor, "d k"], b: Float[Tensor, " k"], x: Float[Tensor, "n d"], y: Int[Tensor, " n"], weight_decay: float
) -> Tensor:
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
    """A multinomial logistic-regression probe (W, b), fitted with full-batch Adam from zero.

    The loss is `probe_loss` (mean cross-entropy plus ``weight_decay`` * ||W||^2, the bias
    not decayed); `steps` steps of Adam at ``lr``, with gradients on even if the caller
    turned them off. Returns (W, b), detached, with the dtype of x.
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


def _lbfgs(closure, theta: Tensor, grad: Tensor, tol: float, max_iter: int, history: int = 10) -> int:
    """Minimise a smooth convex function of the flat tensor ``theta`` in place with L-BFGS; returns the iterations.

    ``closure()`` returns the loss at the current ``theta`` and writes its gradient into
    ``grad``. Stops when no gradient entry exceeds ``tol`` in absolute value (as
    scipy's L-BFGS-B, which scikit-learn uses), after ``max_iter`` iterations, or when a
    backtracking line search (Armijo, halving) cannot decrease the loss any more. Written
    out because torch.optim.LBFGS's general machinery costs more per iteration than a
    small probe's loss and gradient do.
    """
    loss = float(closure())
    g = grad.clone()
    s_hist: list[Tensor] = []
    y_hist: list[Tensor] = []
    rho_hist: list[float] = []
    slack = 16 * torch.finfo(theta.dtype).eps  # the loss is only known to about this relative precision
    for it in range(max_iter):
        if float(g.abs().max()) <= tol:
            return it
        # two-loop recursion: direction = -H g, with H the L-BFGS inverse-Hessian estimate
        direction = g.neg()
        alphas = []
        for s_k, y_k, rho in zip(reversed(s_hist), reversed(y_hist), reversed(rho_hist)):
            alpha = rho * float(s_k.dot(direction))
            direction.add_(y_k, alpha=-alpha)
            alphas.append(alpha)
        if s_hist:
            direction.mul_(1.0 / (rho_hist[-1] * float(y_hist[-1].dot(y_hist[-1]))))
        else:  # first step: a gradient step short enough not to overshoot wildly
            direction.mul_(min(1.0, 1.0 / float(g.abs().sum())))
        for s_k, y_k, rho, alpha in zip(s_hist, y_hist, rho_hist, reversed(alphas)):
            beta = rho * float(y_k.dot(direction))
            direction.add_(s_k, alpha=alpha - beta)
        slope = float(g.dot(direction))
        if slope >= 0:  # not a descent direction (rounding): restart from the gradient
            s_hist, y_hist, rho_hist = [], [], []
            direction = g.neg()
            slope = -float(g.dot(g))
        start = theta.clone()
        step = 1.0
        while True:
            torch.add(start, direction, alpha=step, out=theta)
            new_loss = float(closure())
            if new_loss <= loss + 1e-4 * step * slope + slack * abs(loss):
                break
            step *= 0.5
            if step < 1e-10:  # no decrease possible at this precision: as close to the optimum as it gets
                theta.copy_(start)
                return it
        new_g = grad.clone()
        y_k, s_k = new_g - g, direction.mul_(step)
        sy = float(s_k.dot(y_k))
        if sy > 1e-10 * float(y_k.dot(y_k)):  # keep only pairs that carry curvature
            s_hist.append(s_k)
            y_hist.append(y_k)
            rho_hist.append(1.0 / sy)
            if len(s_hist) > history:
                s_hist.pop(0), y_hist.pop(0), rho_hist.pop(0)
        loss, g = new_loss, new_g
    return max_iter


def fit_probe(
    x: Float[Tensor, "n d"],
    y: Int[Tensor, " n"],
    n_classes: int,
    weight_decay: float = 3e-3,
    tol: float = 1e-4,
    max_iter: int = 1000,
) -> tuple[Float[Tensor, "d k"], Float[Tensor, " k"]]:
    """The same probe as `train_probe`, fitted to its optimum with full-batch L-BFGS: the library's fast fit.

    Minimises `probe_loss` (mean cross-entropy plus ``weight_decay`` * ||W||^2, the bias not
    decayed) from zero with ``torch.optim.LBFGS`` (strong-Wolfe line search, 10 stored
    pairs), stopping when no gradient entry exceeds ``tol`` in absolute value (or after
    ``max_iter`` iterations). The loss is convex and strictly convex in W, so the result
    depends only on the data: it is deterministic, and it is the optimum that
    scikit-learn's ``LogisticRegression(C=1 / (2 * weight_decay * n))`` finds (its
    ``tol`` means the same thing). The gradient is computed in closed form, so the fit
    works whatever the caller's autograd state (no_grad, inference mode).

    Returns (W, b) with the dtype and device of x.
    """
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= n_classes):
        raise ValueError(f"labels must lie in 0 .. {n_classes - 1}, got values from {int(y.min())} to {int(y.max())}")
    if len(y) != len(x):
        raise ValueError(f"x has {len(x)} rows but y has {len(y)} labels; give one label per row")
    if len(y) == 0:
        raise ValueError("no examples to fit: x and y are empty")
    if weight_decay < 0 or tol <= 0 or max_iter < 1:
        raise ValueError(f"need weight_decay >= 0, tol > 0 and max_iter >= 1, got {weight_decay}, {tol} and {max_iter}")
    k = n_classes
    with torch.inference_mode(False), torch.no_grad():
        # Work with the transposes: logits.T = W.T @ x.T + b is [k, n], and every reduction over
        # the classes runs along long contiguous rows; this layout is the fastest on a CPU.
        x = x.detach().clone()
        xt = x.T.contiguous()
        n, d = x.shape
        minus_onehot_t = -F.one_hot(y.to(x.device), k).to(x.dtype).T.contiguous() / n  # [k, n]
        # one flat parameter, W.T [k, d] then b: fewer tensors for L-BFGS to gather each iteration
        theta = torch.zeros(k * d + k, dtype=x.dtype, device=x.device)
        grad = torch.empty_like(theta)
        w_t, bias = theta[: k * d].view(k, d), theta[k * d :]
        w_grad, b_grad = grad[: k * d].view(k, d), grad[k * d :]

        def closure() -> Tensor:
            # probe_loss and its gradient in closed form: d(mean CE)/d(logits) = (softmax - onehot) / n
            logits_t = torch.addmm(bias[:, None], w_t, xt)
            logits_t.sub_(logits_t.max(0).values)  # stable: subtract each example's largest logit
            p = logits_t.exp()
            z = p.sum(0)
            loss = (logits_t * minus_onehot_t).sum() + z.log().sum() / n + weight_decay * w_t.pow(2).sum()
            delta = p.div_(z * n).add_(minus_onehot_t)
            torch.mm(delta, x, out=w_grad)
            w_grad.add_(w_t, alpha=2 * weight_decay)
            torch.sum(delta, 1, out=b_grad)
            return loss

        _lbfgs(closure, theta, grad, tol, max_iter)
    return theta[: k * d].view(k, d).T.contiguous(), theta[k * d :].clone()


def probe_accuracy(
    W: Float[Tensor, "d k"], b: Float[Tensor, " k"], x: Float[Tensor, "n d"], y: Int[Tensor, " n"]
) -> float:
    """Fraction of examples whose highest-scoring class is the label."""
    return (probe_logits(W, b, x).argmax(-1) == y).float().mean().item()


# --- datasets of latents ---------------------------------------------------------------------------------

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
            rows.append(
                (i, pos, int(d.meta["sentiment"] > 0), token_id(d.tokens[end - 1]), int(any(d.meta["negated"])))
            )
        else:
            value = d.tokens.index(d.meta["value"], 3)
            pos = value if where == "value" else answer
            rows.append((i, pos, d.meta["truth"], token_id(d.meta["value"]), list(RELATIONS).index(d.meta["relation"])))
    cols = list(zip(*rows)) if rows else [[]] * len(keys)
    return {k: torch.tensor(v, dtype=torch.long) for k, v in zip(keys, cols)}


def resid_hook_names(model) -> list[str]:
    """The residual stream at every depth: the embeddings, then the output of each block."""
    return [act_name("resid_pre", 0)] + [act_name("resid_post", layer) for layer in range(model.cfg.n_layers)]


@torch.no_grad()
def residual_dataset(
    model,
    docs: Sequence[Doc],
    doc: Int[Tensor, " n"],
    position: Int[Tensor, " n"],
    batch_size: int = 128,
    progress: bool = False,
) -> Float[Tensor, "depth n d_model"]:
    """Residual-stream vectors at (doc[i], word position[i]) at every depth (see `resid_hook_names`).

    Positions count TinyWorld words. The documents go through the model's own tokenizer
    (`interplab.tinyworld.tokens_for`), and each word is read at its last token, where
    the whole word has been seen: with TinyWorld's tokenizer that is the word itself,
    with GPT-2's it may be the last of several pieces. Only the documents that occur in
    `doc` are run, and only the asked-for positions are kept, so memory grows with the
    number of examples. ``progress`` shows a progress bar over the batches.
    """
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
    acts = collect(model, mt.ids, resid_hook_names(model), mask=mask, batch_size=batch_size, progress=progress)
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
    acts = residual_dataset(
        model,
        docs,
        torch.cat([e["doc"] for e in examples.values()]),
        torch.cat([e["position"] for e in examples.values()]),
    )
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


def raw_space_probe(
    x_train: Float[Tensor, "n d"], y: Int[Tensor, " n"], n_classes: int, fit=None
) -> tuple[Float[Tensor, "d k"], Float[Tensor, " k"]]:
    """A probe fit on standardized features, rewritten to act on raw residual vectors.

    With z = (x - mean) / std, z @ W + b = x @ (W / std) + (b - (mean / std) @ W), so the
    returned (W', b') classify raw vectors exactly as (W, b) classifies standardized ones;
    the columns of W' are the probe's directions in the residual stream itself.
    `fit(z, y, n_classes) -> (W, b)` defaults to `train_probe` (e.g. `mass_mean_probe`).
    """
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    W, b = (fit or train_probe)((x_train - mean) / std, y, n_classes)
    return W / std[:, None], b - (mean / std) @ W


# --- causal tests: steering and ablating along probe directions ------------------------------------------


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
def steering_effect(
    model,
    tokens: Int[Tensor, "batch pos"],
    positions: Int[Tensor, " batch"],
    labels: Int[Tensor, " batch"],
    probes: dict[int, dict[str, Float[Tensor, "d k"]]],
    class_tokens: Sequence[int],
    scale: float = 0.5,
    seed: int = 0,
) -> dict:
    """Push each example from its true class s towards t = (s + 1) % k along each probe's directions.

    For each layer in `probes` ({layer: {name: W}}), after that block, at each example's
    position, add a vector of norm `scale` x (the mean residual norm there) along
    W[:, t] - W[:, s]; the baseline "random" adds a random direction of the same norm
    (one per example). The model's answer is its highest logit among `class_tokens`.

    Returns {"clean": accuracy without edits, layer: {name: {"to_target": fraction of
    answers that become t, "still_correct": fraction that stay s}}} with "random" among
    the names.
    """
    targets = (labels + 1) % len(class_tokens)
    rows = torch.arange(len(tokens))
    names = [act_name("resid_post", layer) for layer in probes]
    at = torch.zeros(tokens.shape, dtype=torch.bool)
    at[rows, positions.cpu()] = True
    resid = collect(
        model, tokens, names, mask=at, batch_size=32, progress=False
    )  # only these hooks, only these positions
    out: dict = {"clean": (_answers(model, tokens, positions, class_tokens) == labels).float().mean().item()}
    gen = torch.Generator().manual_seed(seed)
    for layer, by_name in probes.items():
        hook_name = act_name("resid_post", layer)
        norm = resid[hook_name].norm(dim=-1).mean()
        edits = {}
        for name, W in by_name.items():
            d = (W[:, targets] - W[:, labels]).T.float()
            edits[name] = d / d.norm(dim=-1, keepdim=True) * scale * norm
        r = torch.randn(len(tokens), model.cfg.d_model, generator=gen)
        edits["random"] = r / r.norm(dim=-1, keepdim=True) * scale * norm
        out[layer] = {}
        for name, e in edits.items():
            answer = _answers(
                model, tokens, positions, class_tokens, hook_name, lambda v, idx, e=e: v + e[idx].to(v.device, v.dtype)
            )
            out[layer][name] = {
                "to_target": (answer == targets).float().mean().item(),
                "still_correct": (answer == labels).float().mean().item(),
            }
    return out


def orthonormal_basis(directions: Float[Tensor, "d k"]) -> Float[Tensor, "d r"]:
    """An orthonormal basis of the span of the columns (QR; near-zero columns dropped)."""
    q, r = torch.linalg.qr(directions)
    keep = r.diagonal().abs() > 1e-6 * r.diagonal().abs().max()
    return q[:, keep]


@torch.no_grad()
def ablated_accuracy(
    model,
    tokens: Int[Tensor, "batch pos"],
    positions: Int[Tensor, " batch"],
    labels: Int[Tensor, " batch"],
    layer: int,
    directions: Float[Tensor, "d k"],
    class_tokens: Sequence[int],
) -> float:
    """The model's accuracy (among the class tokens) after projecting out the span of `directions`.

    The edit is the same as `edited_logits`'s "project_out", for a whole subspace at once:
    v - Q Q^T v with Q an orthonormal basis of the span, at each example's position after
    block `layer`.
    """
    q = orthonormal_basis(directions.to(torch.float32))

    def project_out(v, idx):
        qq = q.to(v.device, v.dtype)
        return v - (v @ qq) @ qq.T

    answers = _answers(model, tokens, positions, class_tokens, act_name("resid_post", layer), project_out)
    return (answers == labels).float().mean().item()


# --- examples as any model's tokens ---------------------------------------------------------------------


def prefix_tokens(
    model, docs: Sequence[Doc], doc: Int[Tensor, " n"], position: Int[Tensor, " n"]
) -> tuple[Int[Tensor, "n pos"], Int[Tensor, " n"]]:
    """Each example's document as `model`'s tokens, one row per example, and where its word position went.

    Positions count TinyWorld words; the returned token positions are each word's last
    token (see `residual_dataset`), where the model predicts the next word. Rows are
    right-padded and cut after the last asked-for position; the ids are on the model's
    device.

    Returns:
        (ids [n, pos], token_positions [n]).
    """
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
    mt = tokens_for(model, [["<bos>", "the", w] for w in words])
    ids = [int(mt.ids[i, mt.first[i, 2]]) for i in range(len(words))]
    if len(set(ids)) < len(ids):
        clash = [w for w, i in zip(words, ids) if ids.count(i) > 1]
        raise ValueError(f"these words start with the same token for {model.cfg.model_name}: {clash}")
    return ids


# --- causal tests with non-saturating metrics, driven by any edit function ----------------------------------


def bootstrap_ci(
    values: Float[Tensor, " n"], groups: Int[Tensor, " n"] | None = None, n_boot: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """The mean of ``values`` and a 95% percentile-bootstrap interval, resampling whole ``groups`` (e.g. documents).

    Examples of one document are not independent (they share a context), so the
    resampling unit is the group: each bootstrap sample draws as many groups as there
    are, with replacement, and averages all their examples. Without ``groups`` every
    example is its own group. Returns (mean, low, high).
    """
    values = values.detach().double().cpu()
    if groups is None:
        groups = torch.arange(len(values))
    _, inverse = torch.unique(groups.cpu(), return_inverse=True)
    n_groups = int(inverse.max()) + 1
    sums = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, inverse, values)
    counts = torch.bincount(inverse, minlength=n_groups).double()
    draw = torch.randint(0, n_groups, (n_boot, n_groups), generator=torch.Generator().manual_seed(seed))
    means = sums[draw].sum(1) / counts[draw].sum(1)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return float(values.mean()), low, high


def shuffled_label_probe(
    x: Float[Tensor, "n d"], y: Int[Tensor, " n"], n_classes: int, fit=None, seed: int = 0
) -> tuple[Float[Tensor, "d k"], Float[Tensor, " k"]]:
    """A probe fit, like `raw_space_probe`, on the same vectors with the labels randomly permuted.

    Its directions W[:, t] - W[:, s] are what the same fitting procedure finds when the
    labels carry no information: the matched baseline for a causal edit along a probe's
    directions (same norm, same kind of direction, no latent behind it).
    """
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return raw_space_probe(x, y[perm.to(y.device)], n_classes, fit)


def _edit_metrics(logits: Tensor, source: Tensor, target: Tensor, class_tokens: Sequence[int]) -> dict[str, Tensor]:
    """Per-example metrics of logits [n, vocab] for moving the answer from class source to class target."""
    logits = logits.detach().double().cpu()
    cls = logits[:, list(class_tokens)]
    rows = torch.arange(len(logits))
    return {
        "to_target": (cls.argmax(-1) == target).double(),
        "margin": cls[rows, target] - cls[rows, source],
        "logprob": logits.log_softmax(-1)[rows, torch.tensor(class_tokens)[target]],
    }


@torch.no_grad()
def dose_response(
    edit,
    model,
    tokens: Int[Tensor, "batch pos"],
    positions: Int[Tensor, " batch"],
    labels: Int[Tensor, " batch"],
    layer: int,
    probes: dict[str, Float[Tensor, "d k"]],
    doses: Sequence[float],
    norm: float,
    class_tokens: Sequence[int],
    read_positions: Int[Tensor, " batch"] | None = None,
    progress=None,
) -> dict[str, dict[str, Tensor]]:
    """Push each example from its class s towards t = (s + 1) % k along each probe's W[:, t] - W[:, s], at several sizes.

    `edit(model, tokens, layer, positions, direction, mode, alpha, read_positions)` is an
    implementation of the chapter's `edited_logits`: it runs the whole experiment. For each
    probe in ``probes`` ({name: W [d, k]}; a random Gaussian matrix gives the random
    baseline), each dose and each pair (s, t), the direction W[:, t] - W[:, s] is scaled to
    norm ``norm`` and added with alpha = dose after block ``layer`` at ``positions``; the
    logits are read at ``read_positions`` (default: ``positions``).

    Returns {name: {metric: tensor [n_doses, batch]}}, per example, with the metrics
    - "to_target": 1.0 when the answer (the highest logit among ``class_tokens``) is t,
    - "margin": logit of t minus logit of s (does not saturate, unlike the top answer),
    - "logprob": log-probability of t over the whole vocabulary.
    ``progress(iterable, total=..., desc=...)`` may wrap the loop over probes and doses.
    """
    k = len(class_tokens)
    read_positions = positions if read_positions is None else read_positions
    targets = (labels + 1) % k
    jobs = [(name, j) for name in probes for j in range(len(doses))]
    out = {name: {m: torch.empty(len(doses), len(labels), dtype=torch.float64) for m in _METRICS} for name in probes}
    for name, j in progress(jobs, total=len(jobs), desc=f"edits after L{layer}") if progress else jobs:
        W = probes[name]
        for s in labels.unique().tolist():
            rows = (labels == s).nonzero()[:, 0]
            t = (s + 1) % k
            d = (W[:, t] - W[:, s]).float()
            d = d / d.norm() * norm
            toks = tokens[rows.to(tokens.device), : int(read_positions[rows].max()) + 1]
            logits = edit(model, toks, layer, positions[rows], d, "add", float(doses[j]), read_positions[rows])
            for m, v in _edit_metrics(logits, labels[rows], targets[rows], class_tokens).items():
                out[name][m][j, rows] = v
    return out


_METRICS = ("to_target", "margin", "logprob")


@torch.no_grad()
def ablation_effect(
    model,
    tokens: Int[Tensor, "batch pos"],
    positions: Int[Tensor, " batch"],
    labels: Int[Tensor, " batch"],
    layer: int,
    directions: Float[Tensor, "d k"] | None,
    class_tokens: Sequence[int],
) -> dict[str, Tensor]:
    """Per-example effect of projecting out the span of ``directions`` after block ``layer`` (None: no edit).

    Returns {"correct": 1.0 when the answer among ``class_tokens`` is the label, "margin":
    logit of the label minus the best other class logit, "p_correct": probability of the
    label among the class tokens}, each a tensor [batch]. Unlike accuracy, the margin and
    the probability show an edit that weakens the answer without flipping it.
    """
    hooks = []
    rows = torch.arange(len(labels))
    if directions is not None:
        q = orthonormal_basis(directions.to(torch.float32))

        def project_out(resid, hook):
            resid = resid.clone()
            v = resid[rows, positions]
            qq = q.to(v.device, v.dtype)
            resid[rows, positions] = v - (v @ qq) @ qq.T
            return resid

        hooks = [(act_name("resid_post", layer), project_out)]
    logits = model.run_with_hooks(tokens, fwd_hooks=hooks)[rows, positions][:, list(class_tokens)].double().cpu()
    right = logits[rows, labels]
    others = logits.clone()
    others[rows, labels] = -torch.inf
    return {
        "correct": (logits.argmax(-1) == labels).double(),
        "margin": right - others.max(-1).values,
        "p_correct": logits.softmax(-1)[rows, labels],
    }
