"""Ground truth: did a dictionary find the latents TinyWorld's generator planted?

- `tinyworld_latents`: the true labels of every token (family, entity, room, sentiment, truth,
  induction).
- `feature_aurocs`, `auroc_matrix`, `max_f1`: how well a feature, used as a score, detects a latent.
- `recovery_table`, `recovery_summary`: the best feature for every latent (chosen on training
  tokens, scored on held-out ones), and counts by kind.
- `best_threshold`, `f1_at`: an F1 threshold chosen on some tokens and applied to others.
- `probe_direction`: the class-mean probe the features are compared with.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from ..tinyworld import FAMILIES, NAMES, ROOMS
from ..tinyworld.language import NEGATIVE_ADJ, POSITIVE_ADJ


def tinyworld_latents(docs, min_count: int = 5) -> tuple[list[str], Bool[Tensor, "n_tokens n_latents"]]:
    """Ground-truth labels of TinyWorld latents at every SAE position (real tokens but <bos>, doc by doc).

    Latents (name "kind:value"):

    - ``family:<f>``: the token belongs to a document of task family f;
    - ``entity:<name>``: the token names this person;
    - ``room:<room>``: at the name X ending a question "where is X", X is in this room (the
      model must have tracked it to answer);
    - ``sentiment:positive`` / ``negative``: a review token from its first adjective
      on (from there the label is determined), in a review with this overall label;
    - ``truth:true`` / ``false``: a claim token from the claimed value on, in a true / false claim;
    - ``induction:repeat``: a token of the repeated half of an induction sequence.

    Latents with fewer than ``min_count`` positive tokens are left out.
    """
    names = (
        [f"family:{f}" for f in FAMILIES]
        + [f"entity:{n}" for n in NAMES]
        + [f"room:{r}" for r in ROOMS]
        + ["sentiment:positive", "sentiment:negative", "truth:true", "truth:false", "induction:repeat"]
    )
    col = {n: i for i, n in enumerate(names)}
    rows = []
    adjectives = set(POSITIVE_ADJ + NEGATIVE_ADJ)
    for d in docs:
        n = len(d.tokens)
        lab = torch.zeros(n, len(names), dtype=torch.bool)
        lab[1:, col[f"family:{d.family}"]] = True
        for i, e in enumerate(d.entity):
            if e >= 0:
                lab[i, col[f"entity:{NAMES[e]}"]] = True
        if d.family == "rooms":
            for i, a in enumerate(d.answer):
                if a is not None and d.tokens[i - 2 : i] == ["where", "is"]:
                    lab[i, col[f"room:{a}"]] = True
        elif d.family == "reviews":
            first = next(i for i, t in enumerate(d.tokens) if t in adjectives)
            lab[first:, col["sentiment:positive" if d.meta["sentiment"] > 0 else "sentiment:negative"]] = True
        elif d.family == "truth":
            start = d.tokens.index(d.meta["value"], 3)
            lab[start:, col["truth:true" if d.meta["truth"] else "truth:false"]] = True
        elif d.family == "induction":
            lab[d.meta["repeat_start"] :, col["induction:repeat"]] = True
        rows.append(lab[1:])
    labels = torch.cat(rows)
    keep = [i for i in range(len(names)) if labels[:, i].sum() >= min_count]
    return [names[i] for i in keep], labels[:, keep]


def average_ranks(scores: Float[Tensor, "n d"]) -> Float[Tensor, "d n"]:
    """1-based ranks of each column's values, ties sharing their average rank (float64), as [d, n]."""
    cols = scores.T.contiguous().double()
    sorted_cols = cols.sort(dim=-1).values
    lo = torch.searchsorted(sorted_cols, cols, right=False)
    hi = torch.searchsorted(sorted_cols, cols, right=True)
    return (lo + hi + 1).double() / 2


def feature_aurocs(acts: Float[Tensor, "n d_sae"], labels: Bool[Tensor, " n"]) -> Float[Tensor, " d_sae"]:
    """The AUROC of every feature as a detector of the labels (ties count one half), float32."""
    labels = labels.bool()
    n_pos = int(labels.sum())
    n_neg = labels.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("labels need at least one positive and one negative token")
    rank_sum = average_ranks(acts)[:, labels].sum(dim=-1)
    return ((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)).float()


@torch.no_grad()
def auroc_matrix(
    acts: Float[Tensor, "n d_sae"], labels: Bool[Tensor, "n n_latents"]
) -> Float[Tensor, "d_sae n_latents"]:
    """The AUROC of every feature for every latent at once (`feature_aurocs`, with the ranks computed once)."""
    ranks = average_ranks(acts)  # [d_sae, n]
    lab = labels.to(ranks.device).double()
    n_pos = lab.sum(0)
    n_neg = lab.shape[0] - n_pos
    if bool(((n_pos == 0) | (n_neg == 0)).any()):
        raise ValueError("every latent needs at least one positive and one negative token")
    return ((ranks @ lab - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)).float()


def max_f1(scores: Float[Tensor, " n"], labels: Bool[Tensor, " n"]) -> float:
    """The best F1 of "score >= t" as a detector of the labels, over every threshold t among the scores."""
    labels = labels.bool()
    n_pos = int(labels.sum())
    if n_pos == 0:
        raise ValueError("labels need at least one positive token")
    order = scores.argsort(descending=True)
    s, y = scores[order], labels[order].double()
    tp = y.cumsum(0)
    predicted = torch.arange(1, len(s) + 1, dtype=torch.float64, device=s.device)
    end_of_group = torch.ones(len(s), dtype=torch.bool, device=s.device)
    end_of_group[:-1] = s[:-1] != s[1:]
    return (2 * tp / (predicted + n_pos))[end_of_group].max().item()


def best_threshold(scores: Float[Tensor, " n"], labels: Bool[Tensor, " n"]) -> tuple[float, float]:
    """(threshold, F1): the threshold t among the scores where "score >= t" has its best F1 on these rows."""
    labels = labels.bool()
    n_pos = int(labels.sum())
    if n_pos == 0:
        raise ValueError("labels need at least one positive token")
    order = scores.argsort(descending=True)
    s, y = scores[order], labels[order].double()
    f1 = 2 * y.cumsum(0) / (torch.arange(1, len(s) + 1, dtype=torch.float64, device=s.device) + n_pos)
    end_of_group = torch.ones(len(s), dtype=torch.bool, device=s.device)
    end_of_group[:-1] = s[:-1] != s[1:]
    f1 = torch.where(end_of_group, f1, torch.zeros_like(f1))
    i = int(f1.argmax())
    return float(s[i]), float(f1[i])


def f1_at(scores: Float[Tensor, " n"], labels: Bool[Tensor, " n"], threshold: float) -> float:
    """The F1 of "score >= threshold" as a detector of the labels."""
    pred, labels = scores >= threshold, labels.bool()
    tp = int((pred & labels).sum())
    return 2 * tp / max(1, int(pred.sum()) + int(labels.sum()))


@torch.no_grad()
def recovery_table(
    acts: Float[Tensor, "n d_sae"],
    labels: Bool[Tensor, "n n_latents"],
    names: Sequence[str],
    threshold: float = 0.9,
    top_n: int = 20,
    select_acts: Float[Tensor, "m d_sae"] | None = None,
    select_labels: Bool[Tensor, "m n_latents"] | None = None,
) -> list[dict]:
    """For every latent: the best-matching feature and how well it detects the latent.

    Each row has the feature with the highest AUROC ("feature", "auroc", and "f1"), the
    most *specific* feature (the best F1 among the ``top_n`` features by AUROC:
    "specific_feature", "specific_auroc", "specific_f1"), whether the latent is recovered
    (the best feature's AUROC >= threshold) and how many features reach the threshold
    ("features_above": more than one suggests the SAE split the latent).

    With ``select_acts`` and ``select_labels`` (training tokens, the same latents as
    ``labels``), the features and the F1 thresholds are chosen there and every score in the
    row is measured on ``acts`` / ``labels`` (held-out tokens): a choice among 768 features
    made on the scored tokens would favour the one that fits them by chance. Without
    them, choice and score use the same tokens (and "f1" is the best F1 over thresholds).
    """
    aucs = auroc_matrix(acts, labels)
    held_out = select_acts is not None
    if held_out:
        if select_labels is None or select_labels.shape[1] != labels.shape[1]:
            raise ValueError("select_labels must hold the same latents (columns) as labels")
        choose_aucs = auroc_matrix(select_acts, select_labels)
    else:
        select_acts, select_labels, choose_aucs = acts, labels, aucs
    rows = []
    for j, name in enumerate(names):
        lab, choose_lab = labels[:, j], select_labels[:, j].to(select_acts.device)
        top = choose_aucs[:, j].topk(min(top_n, choose_aucs.shape[0])).indices.tolist()
        if held_out:
            cuts = [best_threshold(select_acts[:, i], choose_lab) for i in top]
            f1s = [f1_at(acts[:, i], lab, t) for i, (t, _) in zip(top, cuts)]
            spec = max(range(len(top)), key=lambda t: cuts[t][1])
        else:
            f1s = [max_f1(acts[:, i], lab) for i in top]
            spec = max(range(len(top)), key=lambda t: f1s[t])
        best = top[0]
        rows.append(
            {
                "latent": name,
                "kind": name.split(":")[0],
                "positives": int(lab.sum()),
                "feature": best,
                "auroc": round(float(aucs[best, j]), 4),
                "f1": round(f1s[0], 4),
                "specific_feature": top[spec],
                "specific_auroc": round(float(aucs[top[spec], j]), 4),
                "specific_f1": round(f1s[spec], 4),
                "recovered": bool(aucs[best, j] >= threshold),
                "features_above": int((aucs[:, j] >= threshold).sum()),
            }
        )
    return rows


def recovery_summary(rows: list[dict]) -> dict[str, dict]:
    """Per kind of latent (and "all"): latents, how many recovered, mean AUROC, mean F1 (best and specific feature)."""
    out = {}
    for kind in ["all"] + sorted({r["kind"] for r in rows}):
        sel = [r for r in rows if kind == "all" or r["kind"] == kind]
        n = len(sel)
        out[kind] = {
            "latents": n,
            "recovered": sum(r["recovered"] for r in sel),
            "fraction": round(sum(r["recovered"] for r in sel) / n, 3),
            "mean_auroc": round(sum(r["auroc"] for r in sel) / n, 3),
            "mean_f1": round(sum(r["f1"] for r in sel) / n, 3),
            "mean_specific_f1": round(sum(r["specific_f1"] for r in sel) / n, 3),
        }
    return out


def probe_direction(acts: Float[Tensor, "n d"], labels: Bool[Tensor, " n"]) -> Float[Tensor, " d"]:
    """The simplest linear probe of chapter 1: the unit difference of the class means."""
    d = acts[labels].mean(0) - acts[~labels].mean(0)
    return d / d.norm()
