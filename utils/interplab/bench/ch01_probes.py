"""Benchmark: training the chapter's torch probes against scikit-learn, on the same data.

    python -m interplab.bench.ch01_probes            # or, from Python: run()

For the room latent of chapter 01 (residual vectors at the name X of "where is X", at
every depth of the bundled model), fit one probe per depth with `train_probe` (full-batch
Adam) and with scikit-learn's LogisticRegression (L-BFGS) at the same regularisation,
and print the training time and test accuracy of each. scikit-learn is only needed
here (it is a test dependency of the course, not a requirement).
"""

from __future__ import annotations

import time

from .. import probes, tinyworld
from ..models import load_model
from .table import mean, row

SECTION = __name__.rsplit(".", 1)[-1].split("_", 1)[1]  # the chapter's slug


# keyword arguments of run() in quick and in full mode
QUICK = {"n_docs": 400}
FULL = {}


def run(n_docs: int = 600, weight_decay: float = 3e-3, steps: int = 200, seed: int = 0, quiet: bool = False) -> dict:
    """Time per-depth probe training, torch vs scikit-learn, on the same features.

    Args:
        n_docs: rooms documents to draw (about 1.7 questions each).
        weight_decay: the torch probe's L2 strength; scikit-learn gets C = 1 / (2 * weight_decay * n_train),
            the same objective up to a constant factor.
        steps: Adam steps of the torch probe.
        seed: seed of the documents and of the split.
        quiet: do not print the table.

    Returns:
        {"torch_seconds", "sklearn_seconds"} (totals over all depths), {"torch_accuracy",
        "sklearn_accuracy"} (lists, one per depth), "n_train", "n_test" and "hooks".
    """
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the benchmark compares with scikit-learn: pip install scikit-learn") from e

    model = load_model("tinyworld", device="cpu")
    docs = tinyworld.generate(n_docs, seed=seed, split="test", families=["rooms"])
    ex, acts = probes.latent_dataset(model, docs, "room")["question"]
    is_test = probes.document_split(ex["doc"], 0.25, seed=seed)
    y = ex["label"]
    out = {
        "torch_seconds": 0.0,
        "sklearn_seconds": 0.0,
        "torch_accuracy": [],
        "sklearn_accuracy": [],
        "n_train": int((~is_test).sum()),
        "n_test": int(is_test.sum()),
        "hooks": probes.resid_hook_names(model),
    }
    for x in acts:
        x_tr, x_te = probes.standardize(x[~is_test], x[is_test])
        t0 = time.perf_counter()
        W, b = probes.train_probe(x_tr, y[~is_test], len(tinyworld.ROOMS), weight_decay=weight_decay, steps=steps)
        out["torch_seconds"] += time.perf_counter() - t0
        out["torch_accuracy"].append(probes.probe_accuracy(W, b, x_te, y[is_test]))
        t0 = time.perf_counter()
        clf = LogisticRegression(C=1.0 / (2 * weight_decay * len(x_tr)), max_iter=5000)
        clf.fit(x_tr.numpy(), y[~is_test].numpy())
        out["sklearn_seconds"] += time.perf_counter() - t0
        out["sklearn_accuracy"].append(float(clf.score(x_te.numpy(), y[is_test].numpy())))
    if not quiet:
        print(
            f"room probes at '?' on {out['n_train']} train / {out['n_test']} test questions, "
            f"one per depth ({len(acts)} depths)"
        )
        print(f"{'hook':<26} {'torch acc':>9} {'sklearn acc':>11}")
        for name, a, s in zip(out["hooks"], out["torch_accuracy"], out["sklearn_accuracy"]):
            print(f"{name:<26} {a:9.3f} {s:11.3f}")
        print(
            f"training time, all depths: torch (Adam, {steps} steps) {out['torch_seconds']:.2f} s, "
            f"scikit-learn (L-BFGS) {out['sklearn_seconds']:.2f} s"
        )
    return out


def rows(r: dict) -> list[dict]:
    s = SECTION
    n = len(r["torch_accuracy"])
    return [
        row(
            s,
            f"training time, {n} depths (s)",
            round(r["torch_seconds"], 2),
            round(r["sklearn_seconds"], 2),
            f"peer: scikit-learn L-BFGS; lower is better; {r['n_train']} train / {r['n_test']} test",
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
