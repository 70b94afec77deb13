"""Benchmark: interplab's SAE trainer against SAELens's, on the same activations.

    python -m interplab.bench.ch04_saes                    # TopK, k=16, 768 features, 600 steps of 1024 tokens
    python -m interplab.bench.ch04_saes --steps 200        # quicker

Both trainers see the same cached residual-stream activations of the bundled model,
in the same order, in batches of the same size, for the same number of steps, with
the same learning rate schedule (constant, then a linear decay over the last 20% of
the steps); then both SAEs are measured by the same code on the same test
tokens (explained variance, L0, loss recovered, KL). SAELens's trainer keeps its own
defaults otherwise (its TopK auxiliary loss for dead features, gradient clipping,
decoder initialisation), so this compares two reasonable recipes, not two identical
ones. Throughput is training tokens per second of wall time.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ..dictionaries import DEFAULT_HOOK, SAEConfig, train_dictionary
from ..dictionaries.data import collect_acts, tinyworld_dataset, training_activations
from ..dictionaries.metrics import explained_variance, reconstruction_metrics, spliced_loss
from ..models import load_model
from .table import row

SECTION = __name__.rsplit(".", 1)[-1].split("_", 1)[1]  # the chapter's slug


class _SAELensAsModule:
    """Lets a SAELens SAE go through interplab's metrics (which expect .cfg.hook_name, encode, decode)."""

    def __init__(self, sae, hook_name: str):
        self.sae = sae
        self.cfg = type("Cfg", (), {"hook_name": hook_name, "d_sae": sae.cfg.d_sae})()

    def encode(self, x):
        return self.sae.encode(x)

    def decode(self, f):
        return self.sae.decode(f)

    def __call__(self, x):
        return self.sae.decode(self.sae.encode(x))


# keyword arguments of run() in quick and in full mode
QUICK = {"steps": 100, "n_docs": 1500}
FULL = {}


def _quality(model, sae, x, ids, mask) -> dict[str, float]:
    with torch.no_grad():
        f = sae.encode(x)
        x_hat = sae.decode(f)
    rec = reconstruction_metrics(x, x_hat, f)
    spliced = spliced_loss(model, sae, ids, mask)
    return {
        "explained_variance": round(explained_variance(x, x_hat), 4),
        "l0": round(rec["l0"], 2),
        "loss_recovered": round(spliced["loss_recovered"], 4),
        "kl_sae": round(spliced["kl_sae"], 5),
    }


def run(
    steps: int = 600,
    batch_size: int = 1024,
    d_sae: int = 768,
    k: int = 16,
    lr: float = 2e-3,
    n_docs: int = 12_000,
    threads: int | None = 2,
    seed: int = 0,
    verbose: bool = True,
) -> dict:
    """Train interplab's TopK SAE and SAELens's TopK SAE on the same activations; return and print both.

    Returns:
        {"interplab": {...}, "sae_lens": {...}, "setup": {...}}, each side with
        tokens_per_second, seconds, explained_variance, l0, loss_recovered and kl_sae.
    """
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    if threads:
        torch.set_num_threads(threads)
    model = load_model("tinyworld", device="cpu")
    acts = training_activations(model, n_docs, seed=seed)
    _, ids, mask = tinyworld_dataset(400, seed=1, split="test")
    x_test = collect_acts(model, ids, mask)
    d_in = acts.shape[-1]

    # the same batches, in the same order, for both trainers
    g = torch.Generator().manual_seed(seed)
    perm, cursor, order = torch.randperm(len(acts), generator=g), 0, []
    for _ in range(steps):
        if cursor + batch_size > len(perm):
            perm, cursor = torch.randperm(len(acts), generator=g), 0
        order.append(perm[cursor : cursor + batch_size])
        cursor += batch_size

    out: dict = {
        "setup": {
            "steps": steps,
            "batch_size": batch_size,
            "tokens": steps * batch_size,
            "d_sae": d_sae,
            "k": k,
            "lr": lr,
            "hook": DEFAULT_HOOK,
            "threads": torch.get_num_threads(),
        }
    }

    t0 = time.time()
    ours = train_dictionary(
        acts,
        SAEConfig(d_in=d_in, d_sae=d_sae, architecture="topk", k=k),
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        progress=False,
    )
    t_ours = time.time() - t0
    out["interplab"] = {
        "seconds": round(t_ours, 1),
        "tokens_per_second": round(steps * batch_size / t_ours),
        **_quality(model, ours, x_test, ids, mask),
    }

    torch.manual_seed(seed)
    cfg = TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k, device="cpu")
    cfg.metadata.hook_name = DEFAULT_HOOK
    theirs = TopKTrainingSAE(cfg)
    # the same schedule as interplab's: constant, then a linear decay over the last 20% of the steps
    trainer_cfg = SAETrainerConfig(
        total_training_samples=steps * batch_size,
        train_batch_size_samples=batch_size,
        lr=lr,
        lr_end=lr,
        lr_decay_steps=steps // 5,
        device="cpu",
        dead_feature_window=200,
        feature_sampling_window=10**9,
    )
    provider = (acts[idx] for idx in order)
    t0 = time.time()
    import contextlib
    import io

    with contextlib.redirect_stderr(io.StringIO()):  # its tqdm bar
        SAETrainer(trainer_cfg, theirs, provider).fit()
    t_theirs = time.time() - t0
    theirs.eval()
    out["sae_lens"] = {
        "seconds": round(t_theirs, 1),
        "tokens_per_second": round(steps * batch_size / t_theirs),
        **_quality(model, _SAELensAsModule(theirs, DEFAULT_HOOK), x_test, ids, mask),
    }
    if verbose:
        keys = ["tokens_per_second", "seconds", "explained_variance", "l0", "loss_recovered", "kl_sae"]
        print(
            f"TopK SAE, k={k}, {d_sae} features, {steps} steps x {batch_size} tokens at {DEFAULT_HOOK}, "
            f"{out['setup']['threads']} threads"
        )
        print(f"{'':>20}{'interplab':>14}{'SAELens':>14}")
        for key in keys:
            print(f"{key:>20}{out['interplab'][key]:>14}{out['sae_lens'][key]:>14}")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m interplab.bench.ch04_saes",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--d-sae", type=int, default=768)
    p.add_argument("-k", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    print(json.dumps(run(steps=a.steps, batch_size=a.batch_size, d_sae=a.d_sae, k=a.k, threads=a.threads)))


def rows(r: dict) -> list[dict]:
    s, a, b = SECTION, r["interplab"], r["sae_lens"]
    st = r["setup"]
    setup = f"TopK k={st['k']}, {st['d_sae']} features, {st['steps']} steps x {st['batch_size']} tokens"
    return [
        row(
            s,
            "training throughput (tokens/s)",
            a["tokens_per_second"],
            b["tokens_per_second"],
            f"peer: SAELens SAETrainer; higher is better; {setup}",
        ),
        row(s, "explained variance", a["explained_variance"], b["explained_variance"], "higher is better"),
        row(s, "L0 (active features per token)", a["l0"], b["l0"], f"target k={st['k']}"),
        row(s, "loss recovered", a["loss_recovered"], b["loss_recovered"], "higher is better"),
    ]


if __name__ == "__main__":
    main()
