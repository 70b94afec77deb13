"""Benchmark of chapter 2: how long the tuned lens takes to train, and how much it beats the logit lens.

    python -m interplab.bench.ch02_lenses             # prints a table and the JSON

`run()` returns the figures as a dict, for `interplab bench`.
"""

from __future__ import annotations

import json
import time

import torch

from .. import lenses
from ..models import load_model
from .table import row

SECTION = __name__.rsplit(".", 1)[-1].split("_", 1)[1]  # the chapter's slug


# keyword arguments of run() in quick and in full mode
QUICK = {"threads": 2, "eval_docs": 250}
FULL = {}


def run(threads: int = 1, eval_docs: int = 500) -> dict:
    """Train the tuned lens of the bundled model with the shipped settings and evaluate both lenses.

    Args:
        threads: torch CPU threads while training (1 by default: its CPU time is an honest measure of the
            cost even on a busy machine; the budget is 60 s on 2 cores).
        eval_docs: test-split documents to evaluate on.

    Returns:
        {"train_seconds_wall", "train_seconds_cpu", "threads", "n_positions", "labels",
        "kl_logit", "kl_tuned", "ce_logit", "ce_tuned", ...}: one value per read-out point
        for the per-point lists.
    """
    model = load_model("tinyworld", device="cpu")
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        c0, t0 = time.process_time(), time.perf_counter()
        tuned, info = lenses.train_tuned_lens(model, progress=False)
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    finally:
        torch.set_num_threads(old)
    metrics = lenses.evaluate_lenses(model, tuned, lenses.lens_docs(eval_docs, seed=0, split="test"))
    return {
        "train_seconds_wall": round(wall, 2),
        "train_seconds_cpu": round(cpu, 2),
        "threads": threads,
        "n_train_positions": info["n_positions"],
        "steps": info["steps"],
        **metrics,
    }


def main() -> None:
    out = run()
    print(
        f"tuned lens trained in {out['train_seconds_wall']} s wall ({out['train_seconds_cpu']} s CPU, "
        f"{out['threads']} threads)"
    )
    for i, label in enumerate(out["labels"]):
        print(f"{label:<14} KL logit {out['kl_logit'][i]:.4f}  tuned {out['kl_tuned'][i]:.4f}")
    print(json.dumps(out))


def rows(r: dict) -> list[dict]:
    s = SECTION
    out = [
        row(
            s,
            "tuned-lens training time (s)",
            r["train_seconds_wall"],
            None,
            f"{r['steps']} steps, {r['threads']} thread(s), {r['train_seconds_cpu']} s CPU; no peer",
        )
    ]
    for label, kt, kl in zip(r["labels"], r["kl_tuned"], r["kl_logit"]):
        out.append(row(s, f"KL to the output at {label} (nats)", kt, kl, "peer: the logit lens; lower is better"))
    return out


if __name__ == "__main__":
    main()
