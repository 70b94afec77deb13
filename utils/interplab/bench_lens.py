"""Benchmark of chapter 2: how long the tuned lens takes to train, and how much it beats the logit lens.

    python -m interplab.bench_lens             # prints a table and the JSON

`bench_lens()` returns the figures as a dict, for `interplab bench`.
"""

from __future__ import annotations

import json
import time


def bench_lens(threads: int = 1, eval_docs: int = 500) -> dict:
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
    import torch

    from .models import load_model
    from .solutions import lens as L

    model = load_model("tinyworld", device="cpu")
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        c0, t0 = time.process_time(), time.perf_counter()
        tuned, info = L.train_tuned_lens(model, progress=False)
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    finally:
        torch.set_num_threads(old)
    metrics = L.evaluate_lenses(model, tuned, L.lens_docs(eval_docs, seed=0, split="test"))
    return {"train_seconds_wall": round(wall, 2),
            "train_seconds_cpu": round(cpu, 2),
            "threads": threads, "n_train_positions": info["n_positions"], "steps": info["steps"], **metrics}


def main() -> None:
    out = bench_lens()
    print(f"tuned lens trained in {out['train_seconds_wall']} s wall ({out['train_seconds_cpu']} s CPU, "
          f"{out['threads']} threads)")
    for i, label in enumerate(out["labels"]):
        print(f"{label:<14} KL logit {out['kl_logit'][i]:.4f}  tuned {out['kl_tuned'][i]:.4f}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
