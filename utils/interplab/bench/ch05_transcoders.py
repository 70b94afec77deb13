"""Benchmark: the replacement model built from the shipped transcoders.

    python -m interplab.bench.ch05_transcoders            # 100 test documents (as the chapter)
    python -m interplab.bench.ch05_transcoders --quick    # 40 documents

Every MLP of the bundled model is replaced at once by its shipped transcoder (and, in a
second run, by its skip transcoder); the figure is the fraction of the loss gap between
the clean model and the model with zero-ablated MLPs that the replacement model recovers
(`interplab.dictionaries.metrics.replacement_loss`).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ..dictionaries.data import tinyworld_dataset
from ..dictionaries.metrics import replacement_loss
from ..dictionaries.shipped import load_transcoders
from ..models import load_model
from .table import row

SECTION = __name__.rsplit(".", 1)[-1].split("_", 1)[1]  # the chapter's slug


# keyword arguments of run() in quick and in full mode
QUICK = {"quick": True}
FULL = {}


def run(quick: bool = False, threads: int | None = 2, verbose: bool = False) -> dict:
    """The replacement model's loss against clean and ablated, for the shipped transcoders and skip transcoders.

    Returns:
        {"loss_recovered", "ce_clean", "ce_replaced", "ce_ablated", "skip": {...the same for skip transcoders},
         "docs", "seconds"}.
    """
    if threads:
        torch.set_num_threads(threads)
    t0 = time.time()
    model = load_model("tinyworld", device="cpu")
    n_docs = 40 if quick else 100
    _, ids, mask = tinyworld_dataset(n_docs, seed=1, split="test")
    n = model.cfg.n_layers
    plain = replacement_loss(model, load_transcoders(n_layers=n), ids, mask)
    skip = replacement_loss(model, load_transcoders(skip=True, n_layers=n), ids, mask)
    out = {
        **{k: round(v, 4) for k, v in plain.items()},
        "skip": {k: round(v, 4) for k, v in skip.items()},
        "docs": n_docs,
        "seconds": round(time.time() - t0, 1),
    }
    if verbose:
        print(json.dumps(out, indent=1))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m interplab.bench.ch05_transcoders",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    run(quick=a.quick, verbose=True)


def rows(r: dict) -> list[dict]:
    s = SECTION
    return [
        row(
            s,
            "replacement model: loss recovered (transcoders)",
            r["loss_recovered"],
            None,
            f"every MLP replaced at once; target >= 0.80; CE clean {r['ce_clean']}, replaced {r['ce_replaced']}, "
            f"MLPs ablated {r['ce_ablated']}; {r['docs']} docs",
        ),
        row(
            s,
            "replacement model: loss recovered (skip transcoders)",
            r["skip"]["loss_recovered"],
            None,
            f"CE replaced {r['skip']['ce_replaced']}",
        ),
    ]


if __name__ == "__main__":
    main()
