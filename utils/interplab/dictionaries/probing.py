"""Probing with a dictionary's latents: k-sparse probes against the dense probe, and a dataset with a planted cue.

- `sparse_probe`: a logistic-regression probe that may read only k latents, chosen on the
  training rows by the gap between the class means (Gao et al. 2024; Kantamneni et al. 2025).
- `dense_probe`: the same probe reading every latent (or every dimension of an activation).
- `probe_tasks`: the chapter's probing tasks: for each TinyWorld latent, the tokens where the
  question makes sense and the label there.
- `compare_probes`, `probe_scores`: held-out AUROC (or log-odds) of the k-sparse probes (several k)
  and of the dense probe, on the same latents and splits; `kind_summary`: their means by kind of
  latent, with intervals over documents.
- `cued_reviews`: review sentences signed by a name; in the training split the name gives the
  label away (a planted spurious cue), in the test split it does not.
- `auroc`, `auroc_se`, `bootstrap_ci`, `wilson_interval`: scores and their uncertainty.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..probes import fit_probe
from ..tinyworld import Doc
from ..tinyworld import language as L
from .latents import feature_aurocs, tinyworld_latents

# The L2 penalty of every probe here, on standardized columns: weak, so that a probe fits what it can,
# but enough to keep the weights finite when a few columns separate the classes perfectly.
WEIGHT_DECAY = 1e-3


# --- probes ------------------------------------------------------------------------------------------------


def _standardize(x: Tensor) -> tuple[Tensor, Tensor]:
    """The training columns' mean and spread (1 for a column that never changes: a dead latent)."""
    mean = x.mean(0)
    std = x.std(0, unbiased=False)
    return mean, torch.where(std > 1e-6 * (1 + mean.abs()), std, torch.ones_like(std))


def _logistic(x: Tensor, y: Tensor, weight_decay: float) -> tuple[Tensor, Tensor]:
    """(w [d], b []) of a binary logistic regression on raw columns, fitted on standardized ones."""
    x = x.double()
    mean, std = _standardize(x)
    W, b = fit_probe((x - mean) / std, y.long(), 2, weight_decay=weight_decay)
    w_std = W[:, 1] - W[:, 0]  # the two-class probe's log-odds: the difference of its two classes' logits
    b_std = b[1] - b[0]
    w = w_std / std
    return w.float(), (b_std - (mean * w).sum()).float()


def sparse_probe(
    acts: Float[Tensor, "n d_sae"], labels: Bool[Tensor, " n"], k: int, weight_decay: float = WEIGHT_DECAY
) -> tuple[Int[Tensor, " k"], Float[Tensor, " k"], Float[Tensor, ""]]:
    """A logistic-regression probe that reads only ``k`` latents: (features, w, b).

    The k latents are those whose mean activation differs most between the classes (the
    absolute gap of the class means) on these rows; the probe's log-odds of the positive
    class are ``acts[:, features] @ w + b``. The library's version of chapter 4's exercise.
    """
    _check_probe_input(acts, labels, k)
    labels = labels.bool()
    gap = (acts[labels].double().mean(0) - acts[~labels].double().mean(0)).abs()
    features = gap.topk(k).indices
    with torch.no_grad():
        w, b = _logistic(acts[:, features].detach(), labels, weight_decay)
    return features, w, b


def dense_probe(
    acts: Float[Tensor, "n d"], labels: Bool[Tensor, " n"], weight_decay: float = WEIGHT_DECAY
) -> tuple[Float[Tensor, " d"], Float[Tensor, ""]]:
    """The same logistic regression reading every column: (w, b), log-odds ``acts @ w + b``."""
    _check_probe_input(acts, labels, 1)
    with torch.no_grad():
        return _logistic(acts.detach(), labels.bool(), weight_decay)


def _check_probe_input(acts: Tensor, labels: Tensor, k: int) -> None:
    if acts.ndim != 2 or labels.shape != acts.shape[:1]:
        raise ValueError(
            f"acts must be [n, d] and labels [n], one label per row; got {tuple(acts.shape)} and {tuple(labels.shape)}"
        )
    if not 1 <= k <= acts.shape[1]:
        raise ValueError(f"k must be between 1 and the number of latents ({acts.shape[1]}), got {k}")
    n_pos = int(labels.bool().sum())
    if n_pos == 0 or n_pos == len(labels):
        raise ValueError(f"a probe needs both classes among its training rows; got {n_pos} positive of {len(labels)}")


# --- scores and their uncertainty -------------------------------------------------------------------------


def auroc(scores: Float[Tensor, " n"], labels: Bool[Tensor, " n"]) -> float:
    """The AUROC of one score (ties count one half)."""
    return float(feature_aurocs(scores.reshape(-1, 1).float(), labels.bool())[0])


def auroc_se(auc: float, n_pos: int, n_neg: int) -> float:
    """Hanley & McNeil's (1982) standard error of an AUROC measured on n_pos positives and n_neg negatives."""
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc * auc) + (n_neg - 1) * (q2 - auc * auc)) / (n_pos * n_neg)
    return math.sqrt(max(var, 0.0))


def min_positives(auc: float = 0.9, se: float = 0.03, n_neg: int = 5000) -> int:
    """The fewest positives for which an AUROC of ``auc`` has a standard error of at most ``se``."""
    n = 1
    while auroc_se(auc, n, n_neg) > se:
        n += 1
    return n


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95% by default) of a rate successes / n."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_ci(
    statistic: Callable[[Tensor], float], groups: Int[Tensor, " n"], n_boot: int = 200, seed: int = 0
) -> tuple[float, float]:
    """A 95% percentile interval of ``statistic(rows)`` over resamples of whole groups (documents).

    ``statistic`` takes the indices of the resampled rows (a group drawn twice counts twice).
    """
    g = torch.Generator().manual_seed(seed)
    ids, inverse = torch.unique(groups, return_inverse=True)
    members = [torch.nonzero(inverse == i)[:, 0] for i in range(len(ids))]
    values = []
    for _ in range(n_boot):
        pick = torch.randint(len(ids), (len(ids),), generator=g)
        values.append(statistic(torch.cat([members[int(i)] for i in pick])))
    values = torch.tensor([v for v in values if v == v])
    return float(values.quantile(0.025)), float(values.quantile(0.975))


# --- the chapter's probing tasks ------------------------------------------------------------------------


def probe_tasks(
    docs: Sequence[Doc], min_positives: int = 1
) -> dict[str, tuple[Bool[Tensor, " n"], Bool[Tensor, " n"]]]:
    """{latent: (rows, labels)}: for each TinyWorld latent, the tokens where the question is asked and the label.

    Rows index the SAE positions of `tinyworld_latents` (real tokens but <bos>, document by
    document). Each latent is probed against the alternatives it has to be told apart from:

    - ``family:<f>``, ``entity:<name>``: every token (one family or one name against the rest);
    - ``room:<room>``: the names ending a question "where is X" (this room against the other seven);
    - ``sentiment:positive``: review tokens from the first adjective on (positive against negative);
    - ``truth:true``: claim tokens from the claimed value on (true against false);
    - ``induction:repeat``: tokens of induction documents (the repeated half against the first).

    Latents with fewer than ``min_positives`` positive or negative rows are left out.
    """
    names, labels = tinyworld_latents(docs, min_count=1)
    col = {n: i for i, n in enumerate(names)}
    every = torch.ones(labels.shape[0], dtype=torch.bool)
    family_col = labels[:, [col[n] for n in names if n.startswith("family:")]]
    room_rows = labels[:, [col[n] for n in names if n.startswith("room:")]].any(1)
    tasks = {}
    for n in names:
        kind = n.split(":")[0]
        if kind in ("family", "entity"):
            rows = every
        elif kind == "room":
            rows = room_rows
        elif n == "sentiment:positive":
            rows = labels[:, col[n]] | labels[:, col.get("sentiment:negative", col[n])]
        elif n == "truth:true":
            rows = labels[:, col[n]] | labels[:, col.get("truth:false", col[n])]
        elif n == "induction:repeat":
            rows = family_col[:, [f for f in names if f.startswith("family:")].index("family:induction")]
        else:
            continue
        y = labels[:, col[n]]
        if int(y[rows].sum()) >= min_positives and int((~y[rows]).sum()) >= min_positives:
            tasks[n] = (rows, y)
    return tasks


def document_index(docs: Sequence[Doc]) -> Int[Tensor, " n"]:
    """The document of every SAE position (real tokens but <bos>), in the order of `tinyworld_latents`."""
    return torch.cat([torch.full((len(d.tokens) - 1,), i) for i, d in enumerate(docs)])


def compare_probes(
    train_acts: Float[Tensor, "n d"],
    train_labels: Bool[Tensor, " n"],
    test_acts: Float[Tensor, "m d"],
    test_labels: Bool[Tensor, " m"],
    ks: Sequence[int] = (1, 2, 4, 8, 16),
    fit_sparse: Callable = sparse_probe,
) -> dict[str, float]:
    """Test AUROC of the k-sparse probes (one per k) and of the dense probe, all fitted on the training rows.

    ``fit_sparse(acts, labels, k) -> (features, w, b)`` is the sparse probe to use (the
    learner's, in the chapter). Keys: "k=1", "k=2", ..., "dense".
    """
    out = {}
    for k in ks:
        features, w, b = fit_sparse(train_acts, train_labels, k)
        out[f"k={k}"] = auroc(test_acts[:, features] @ w + b, test_labels)
    w, b = dense_probe(train_acts, train_labels)
    out["dense"] = auroc(test_acts @ w + b, test_labels)
    return out


def probe_scores(
    train_acts: Float[Tensor, "n d"],
    train_labels: Bool[Tensor, " n"],
    test_acts: Float[Tensor, "m d"],
    ks: Sequence[int] = (1, 2, 4, 8, 16),
    fit_sparse: Callable = sparse_probe,
) -> tuple[list[str], Float[Tensor, "m p"]]:
    """(probe names, held-out log-odds [m, one column per probe]) of the k-sparse probes and the dense probe.

    Every probe is fitted on the training rows only; ``fit_sparse(acts, labels, k) -> (features, w, b)``
    is the sparse probe (the learner's, in the chapter).
    """
    columns, names = [], []
    for k in ks:
        features, w, b = fit_sparse(train_acts, train_labels, k)
        columns.append(test_acts[:, torch.as_tensor(features).long()].float() @ w.float() + b.float())
        names.append(f"k={k}")
    w, b = dense_probe(train_acts, train_labels)
    columns.append(test_acts.float() @ w + b)
    names.append("dense")
    return names, torch.stack(columns, 1)


def kind_summary(
    results: dict[str, dict], n_boot: int = 200, seed: int = 0
) -> dict[str, dict[str, tuple[float, float, float]]]:
    """{kind: {probe: (mean held-out AUROC over the kind's latents, 95% interval low, high)}}.

    ``results[latent]`` holds "scores" [m, probes], "labels" [m], "docs" [m] (held-out rows) and
    "probes" (the column names); the interval resamples held-out documents (the same draw for
    every latent of a kind, so the kind's latents move together as they would in a new sample).
    """
    by_kind: dict[str, list[str]] = {}
    for latent in results:
        by_kind.setdefault(latent.split(":")[0], []).append(latent)
    out = {}
    for kind, latents in by_kind.items():
        probes = results[latents[0]]["probes"]
        point = torch.stack([feature_aurocs(results[n]["scores"], results[n]["labels"]) for n in latents]).mean(0)
        g = torch.Generator().manual_seed(seed)
        n_docs = int(max(int(results[n]["docs"].max()) for n in latents)) + 1
        draws = []
        for _ in range(n_boot):
            weight = torch.bincount(torch.randint(n_docs, (n_docs,), generator=g), minlength=n_docs)
            per_latent = []
            for n in latents:
                r = results[n]
                idx = torch.repeat_interleave(torch.arange(len(r["docs"])), weight[r["docs"]])
                y = r["labels"][idx]
                if y.all() or not y.any():
                    break
                per_latent.append(feature_aurocs(r["scores"][idx], y))
            else:
                draws.append(torch.stack(per_latent).mean(0))
        draws = torch.stack(draws)
        lo, hi = draws.quantile(0.025, dim=0), draws.quantile(0.975, dim=0)
        out[kind] = {p: (float(point[i]), float(lo[i]), float(hi[i])) for i, p in enumerate(probes)}
    return out


# --- a probing dataset with a planted spurious cue ---------------------------------------------------------


def cued_reviews(
    n: int, seed: int, cue: tuple[str, str] | None, names: Sequence[str] = L.CAST
) -> tuple[list[Doc], Bool[Tensor, " n"], list[str]]:
    """Review sentences signed by a name: (documents, labels, signers).

    Each document is "review : the <aspect> was [not] <adjective> . <name>" and the example
    is read at its last token, the name. The label is the sentence's sentiment (a negated
    adjective flips it). With ``cue = (positive_name, negative_name)`` every positive review
    is signed by the first name and every negative one by the second: the name gives the
    label away (a spurious cue). With ``cue=None`` the signer is drawn from ``names``
    independently of the label.
    """
    rng = random.Random(seed)
    docs, labels, signers = [], [], []
    for _ in range(n):
        label = rng.choice([1, -1])
        negate = rng.random() < 0.4
        polarity = -label if negate else label
        adj = rng.choice(L.POSITIVE_ADJ if polarity > 0 else L.NEGATIVE_ADJ)
        signer = (cue[0] if label > 0 else cue[1]) if cue else rng.choice(list(names))
        d = Doc("reviews", meta={"sentiment": label, "negated": [negate], "signer": signer})
        d.add("review :", sentiment=label)
        d.add(
            L.REVIEW_SENTENCE.format(aspect=rng.choice(L.ASPECTS), neg="not " if negate else "", adj=adj),
            sentiment=label,
        )
        d.add(signer, sentiment=label)
        docs.append(d)
        labels.append(label > 0)
        signers.append(signer)
    return docs, torch.tensor(labels), signers


__all__ = [
    "WEIGHT_DECAY",
    "auroc",
    "auroc_se",
    "bootstrap_ci",
    "compare_probes",
    "cued_reviews",
    "dense_probe",
    "document_index",
    "min_positives",
    "kind_summary",
    "probe_scores",
    "probe_tasks",
    "sparse_probe",
    "wilson_interval",
]
