"""Benchmark: the library's probe fit against scikit-learn, on the same data, at the same objective.

    python -m interplab.bench.ch01_probes            # or, from Python: run()

For the room latent of chapter 01 (residual vectors at the name X of "where is X", at
every depth of the bundled model), fit one probe per depth with `fit_probe` (full-batch
L-BFGS in torch) and with scikit-learn's LogisticRegression (L-BFGS) at the same
regularisation and the same stopping rule, and print the training time and test accuracy
of each. Both sides run on one thread (torch's and the BLAS/OpenMP pools scikit-learn
uses), which is scikit-learn's own setting for this solver on small problems and keeps the
comparison fair on a shared machine. scikit-learn is only needed here (it is a test
dependency of the course, not a requirement).
"""

from __future__ import annotations

import time

import torch

from .. import probes, tinyworld
from ..models import load_model
from .table import mean, row

SECTION = __name__.rsplit(".", 1)[-1].split("_", 1)[1]  # the chapter's slug


# keyword arguments of run() in quick and in full mode
QUICK = {"n_docs": 400}
FULL = {}


def run(
    n_docs: int = 600,
    weight_decay: float = 3e-3,
    tol: float = 1e-4,
    repeats: int = 3,
    seed: int = 0,
    quiet: bool = False,
) -> dict:
    """Time per-depth probe training, torch (`fit_probe`) vs scikit-learn, on the same features, one thread each.

    Args:
        n_docs: rooms documents to draw (about 1.7 questions each).
        weight_decay: the torch probe's L2 strength; scikit-learn gets C = 1 / (2 * weight_decay * n_train),
            the same objective up to a constant factor.
        tol: both fits stop when no gradient entry exceeds it (scikit-learn's default, 1e-4).
        repeats: each fit is timed this many times, alternating the two sides; the fastest counts.
        seed: seed of the documents and of the split.
        quiet: do not print the table.

    Returns:
        {"torch_seconds", "sklearn_seconds"} (totals over all depths), {"torch_accuracy",
        "sklearn_accuracy", "torch_objective", "sklearn_objective"} (lists, one per depth;
        the objective is `probes.probe_loss` on the training set), "n_train", "n_test",
        "hooks" and "threads".
    """
    try:
        from sklearn.linear_model import LogisticRegression
        from threadpoolctl import threadpool_limits  # a dependency of scikit-learn
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the benchmark compares with scikit-learn: pip install scikit-learn") from e
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")

    model = load_model("tinyworld", device="cpu")
    docs = tinyworld.generate(n_docs, seed=seed, split="test", families=["rooms"])
    ex, acts = probes.latent_dataset(model, docs, "room")["question"]
    is_test = probes.document_split(ex["doc"], 0.25, seed=seed)
    y = ex["label"]
    k = len(tinyworld.ROOMS)
    out = {
        "torch_seconds": 0.0,
        "sklearn_seconds": 0.0,
        "torch_accuracy": [],
        "sklearn_accuracy": [],
        "torch_objective": [],
        "sklearn_objective": [],
        "n_train": int((~is_test).sum()),
        "n_test": int(is_test.sum()),
        "hooks": probes.resid_hook_names(model),
        "threads": 1,
    }
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            for x in acts:
                x_tr, x_te = probes.standardize(x[~is_test], x[is_test])
                y_tr, y_te = y[~is_test], y[is_test]
                x_np, y_np = x_tr.numpy(), y_tr.numpy()
                best_torch = best_sklearn = float("inf")
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    W, b = probes.fit_probe(x_tr, y_tr, k, weight_decay=weight_decay, tol=tol)
                    best_torch = min(best_torch, time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    clf = LogisticRegression(C=1.0 / (2 * weight_decay * len(x_tr)), tol=tol, max_iter=5000)
                    clf.fit(x_np, y_np)
                    best_sklearn = min(best_sklearn, time.perf_counter() - t0)
                out["torch_seconds"] += best_torch
                out["sklearn_seconds"] += best_sklearn
                out["torch_accuracy"].append(probes.probe_accuracy(W, b, x_te, y_te))
                out["sklearn_accuracy"].append(float(clf.score(x_te.numpy(), y_te.numpy())))
                Ws = torch.tensor(clf.coef_.T, dtype=x_tr.dtype)
                bs = torch.tensor(clf.intercept_, dtype=x_tr.dtype)
                out["torch_objective"].append(probes.probe_loss(W, b, x_tr, y_tr, weight_decay).item())
                out["sklearn_objective"].append(probes.probe_loss(Ws, bs, x_tr, y_tr, weight_decay).item())
    finally:
        torch.set_num_threads(torch_threads)
    if not quiet:
        print(
            f"room probes at '?' on {out['n_train']} train / {out['n_test']} test questions, "
            f"one per depth ({len(acts)} depths), one thread each"
        )
        print(f"{'hook':<26} {'torch acc':>9} {'sklearn acc':>11} {'torch loss':>11} {'sklearn loss':>12}")
        for name, a, s, lt, ls in zip(
            out["hooks"],
            out["torch_accuracy"],
            out["sklearn_accuracy"],
            out["torch_objective"],
            out["sklearn_objective"],
        ):
            print(f"{name:<26} {a:9.3f} {s:11.3f} {lt:11.5f} {ls:12.5f}")
        print(
            f"training time, all depths (best of {repeats}): torch (fit_probe, L-BFGS) {out['torch_seconds']:.3f} s, "
            f"scikit-learn (L-BFGS) {out['sklearn_seconds']:.3f} s, ratio {out['torch_seconds'] / out['sklearn_seconds']:.2f}"
        )
    return out


def rows(r: dict) -> list[dict]:
    s = SECTION
    n = len(r["torch_accuracy"])
    return [
        row(
            s,
            f"training time, {n} depths (s)",
            round(r["torch_seconds"], 3),
            round(r["sklearn_seconds"], 3),
            f"fit_probe (torch L-BFGS) vs peer scikit-learn L-BFGS, same objective and tol, "
            f"{r.get('threads', 1)} thread each, best of repeats; lower is better; "
            f"{r['n_train']} train / {r['n_test']} test; objective, mean over depths: "
            f"{mean(r['torch_objective']) if 'torch_objective' in r else '?'} vs "
            f"{mean(r['sklearn_objective']) if 'sklearn_objective' in r else '?'}",
        ),
        row(
            s,
            "test accuracy, mean over depths",
            mean(r["torch_accuracy"]),
            mean(r["sklearn_accuracy"]),
            "higher is better",
        ),
        row(
            s,
            "test accuracy, best depth",
            round(max(r["torch_accuracy"]), 4),
            round(max(r["sklearn_accuracy"]), 4),
            "higher is better",
        ),
    ]


if __name__ == "__main__":
    run()
