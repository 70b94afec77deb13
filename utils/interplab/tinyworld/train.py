"""Train the bundled TinyWorld model from scratch.

    interplab rebuild --only tinyworld                    # rebuild the bundled model in place
    python -m interplab.tinyworld.train --out DIR         # the same recipe, into another folder
    python -m interplab.tinyworld.train --tokens 200000   # a quick, small run (other settings: --help)

A GPT-2-architecture network (4 layers, d_model 192, 4 heads, d_mlp 768, context 128)
from transformers, trained with AdamW on freshly generated TinyWorld documents, one
document per row, rows grouped by length so that little compute goes to padding.
`TrainConfig` holds the recipe; its defaults are the bundled model's. The result is
saved in Hugging Face format (config.json, model.safetensors, tokenizer.json) with its
training log, training information, capability evaluation, provenance and a checksum
file, ready for `interplab.load_model`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import artifacts, weights
from ..models import load_model
from ..weights import write_checksums
from . import language as L
from .evaluate import evaluate
from .generator import generate
from .tokenizer import batch_tokens, save_tokenizer, token_id

ARTIFACT = "tinyworld"

# The family mix of the recipe: it gives the in-context families (induction, room tracking)
# more weight than the generator's TRAIN_MIX, since they form last.
RECIPE_MIX = {"ioi": 0.12, "induction": 0.28, "facts": 0.16, "rooms": 0.3, "reviews": 0.05, "truth": 0.09}
ARCHITECTURE_FIELDS = ("n_layer", "n_embd", "n_head", "n_inner", "n_positions")


@dataclass(frozen=True)
class TrainConfig:
    """The recipe of a TinyWorld model; the defaults are the bundled model's.

    One phase of AdamW over ``tokens`` real (non-padding) tokens of freshly generated
    documents drawn with ``mix``, in small batches (in-context circuits form after a number
    of optimizer steps more than after a number of tokens). The learning rate warms up
    linearly over min(``max_warmup_steps``, about a tenth of the steps) and then follows a
    cosine from ``lr`` down to ``final_lr_fraction`` * ``lr``. ``eval_docs`` documents per
    family measure the result (`interplab.tinyworld.evaluate`) when a model is built.
    """

    # architecture (a GPT-2)
    n_layer: int = 4
    n_embd: int = 192
    n_head: int = 4
    n_inner: int = 768
    n_positions: int = 128
    # data
    tokens: int = 19_000_000
    mix: dict[str, float] = field(default_factory=lambda: dict(RECIPE_MIX))
    seed: int = 0
    # optimisation
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    max_warmup_steps: int = 200
    final_lr_fraction: float = 0.05
    # evaluation of a built model
    eval_docs: int = 1000

    def architecture(self) -> dict[str, int]:
        """The GPT-2 sizes: n_layer, n_embd, n_head, n_inner, n_positions."""
        return {k: getattr(self, k) for k in ARCHITECTURE_FIELDS}

    def with_overrides(self, **overrides) -> TrainConfig:
        """A copy with some fields changed; a clear error names the fields when one is unknown."""
        fields = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(overrides) - set(fields))
        if unknown:
            raise TypeError(f"unknown training settings {unknown}; the settings are {fields}")
        return dataclasses.replace(self, **overrides)


def model_config(config: TrainConfig | None = None, **overrides):
    """The GPT-2 config of a TinyWorld model with ``config``'s sizes (default: the bundled model's)."""
    from transformers import GPT2Config  # heavy; only training needs it

    c = {**(config or TrainConfig()).architecture(), **overrides}
    pad, bos = token_id(L.PAD), token_id(L.BOS)
    return GPT2Config(
        vocab_size=len(L.vocabulary()),
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=bos,
        eos_token_id=bos,
        pad_token_id=pad,
        activation_function="gelu_new",
        **c,
    )


def batches(seed: int, batch_size: int, group: int = 32, mix: dict[str, float] | None = None):
    """Endless length-grouped batches of (ids, mask): `group` batches' worth of docs at a time."""
    chunk = 0
    while True:
        docs = generate(batch_size * group, seed=seed * 1_000_003 + chunk, split="train", mix=mix)
        docs.sort(key=len)
        order = list(range(group))
        random.Random(chunk).shuffle(order)
        for g in order:
            yield batch_tokens(docs[g * batch_size : (g + 1) * batch_size])
        chunk += 1


def train(
    config: TrainConfig | None = None,
    out: Path | None = None,
    *,
    threads: int | None = None,
    log_every: int = 50,
    quiet: bool = False,
    init=None,
    log: list[dict] | None = None,
):
    """Train a TinyWorld model with ``config`` (default: the bundled model's recipe); save it to ``out`` if given.

    ``init`` continues from a model (a GPT2LMHeadModel or a folder) instead of a fresh one;
    ``log`` is extended (to continue an earlier run's log). Returns (model, training information).
    """
    from transformers import GPT2LMHeadModel  # heavy; only training needs it
    from transformers.utils import logging as hf_logging

    cfg = config or TrainConfig()
    hf_logging.set_verbosity_error()
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    if init is None:
        model = GPT2LMHeadModel(model_config(cfg))
    elif isinstance(init, (str, Path)):
        model = GPT2LMHeadModel.from_pretrained(init, local_files_only=True)
    else:
        model = init
    phase_start = log[-1]["tokens"] if log else 0
    seconds_start = log[-1]["seconds"] if log else 0.0
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=tuple(cfg.betas),
    )
    est_steps = max(1, cfg.tokens // (cfg.batch_size * 25))  # ~25 tokens per document on average
    warmup = min(cfg.max_warmup_steps, est_steps // 10 + 1)

    def lr_at(step: int, seen: int) -> float:
        if step < warmup:
            return cfg.lr * (step + 1) / warmup
        frac = min(1.0, seen / cfg.tokens)
        low = cfg.final_lr_fraction
        return cfg.lr * (low + (1 - low) * 0.5 * (1 + math.cos(math.pi * frac)))

    log = log if log is not None else []
    seen, step, t0 = 0, 0, time.time()
    bar = tqdm(total=cfg.tokens, unit="tok", unit_scale=True, disable=quiet, desc="training TinyWorld")
    model.train()
    for ids, mask in batches(cfg.seed, cfg.batch_size, mix=cfg.mix):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, seen)
        labels = ids.masked_fill(~mask, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        n = int(mask.sum())
        seen += n
        step += 1
        bar.update(n)
        if step % log_every == 0 or seen >= cfg.tokens:
            log.append(
                {
                    "step": step,
                    "tokens": phase_start + seen,
                    "loss": round(loss.item(), 4),
                    "lr": round(opt.param_groups[0]["lr"], 6),
                    "seconds": round(seconds_start + time.time() - t0, 1),
                }
            )
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if out is not None and step % (log_every * 10) == 0:
                _write_log(out, log)
                model.save_pretrained(out / "checkpoint", safe_serialization=True)
        if seen >= cfg.tokens:
            break
    bar.close()
    model.eval()
    info = {
        "seed": cfg.seed,
        "tokens": seen,
        "steps": step,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "mix": dict(cfg.mix),
        "wall_seconds": round(time.time() - t0, 1),
        "threads": torch.get_num_threads(),
        "config": cfg.architecture(),
        "final_loss": log[-1]["loss"] if log else None,
    }
    if out is not None:
        save(model, out, info, log)
    return model, info


def _write_log(out: Path, log: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))


def save(model, out: Path, info: dict, log: list[dict]) -> None:
    """Save in Hugging Face format plus tokenizer.json, training info and checksums."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    gen_cfg = out / "generation_config.json"
    if gen_cfg.exists():
        gen_cfg.unlink()
    save_tokenizer(out)
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    _write_log(out, log)
    write_checksums(out)


def build_into(
    folder: str | Path,
    config: TrainConfig | None = None,
    *,
    progress: bool = True,
    threads: int | None = None,
    init: Path | None = None,
    run_evaluation: bool = True,
    command: str = f"interplab rebuild --only {ARTIFACT}",
) -> dict:
    """Train a model with ``config`` (default: the bundled recipe) and write a complete model folder.

    The folder gets the model (config.json, model.safetensors), its tokenizer, training.json,
    train_log.jsonl, evaluation.json (unless ``run_evaluation`` is False), provenance.json
    and SHA256SUMS. ``init`` continues from a saved model folder (and its log). Returns the
    training summary written to training.json.
    """
    cfg = config or TrainConfig()
    folder = Path(folder)
    log, infos = [], []
    if init is not None and (init / "train_log.jsonl").exists():
        log = [json.loads(line) for line in (init / "train_log.jsonl").read_text().splitlines()]
        if (init / "training.json").exists():
            prev = json.loads((init / "training.json").read_text())
            infos = prev.get("phases", [prev])
    _, info = train(cfg, folder, threads=threads, quiet=not progress, init=init, log=log)
    infos.append(info)
    shutil.rmtree(folder / "checkpoint", ignore_errors=True)  # a resume point while training; the run is complete
    summary = {
        "command": command,
        "phases": infos,
        "tokens": sum(x["tokens"] for x in infos),
        "wall_seconds": round(sum(x["wall_seconds"] for x in infos), 1),
    }
    (folder / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    if run_evaluation:
        write_checksums(folder)  # load_model verifies the folder
        scores = evaluate(load_model(folder, device="cpu"), n=cfg.eval_docs)
        (folder / "evaluation.json").write_text(json.dumps(scores, indent=2) + "\n")
    artifacts.write_provenance(folder, ARTIFACT, cfg)
    write_checksums(folder)
    return summary


def build_artifact(name: str = ARTIFACT, *, progress: bool = True, config: TrainConfig | None = None) -> None:
    """Rebuild the bundled model (`interplab rebuild --only tinyworld`) in ``WEIGHTS_DIR/tinyworld``.

    The new folder is written next to the old one and replaces it only once complete. Every
    artifact trained on the old weights then needs rebuilding too (`interplab rebuild` does all).
    """
    if name != ARTIFACT:
        raise ValueError(f"interplab.tinyworld.train builds the artifact {ARTIFACT!r}, not {name!r}")
    target = weights.WEIGHTS_DIR / ARTIFACT
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{ARTIFACT}-", dir=target.parent) as tmp:
        staged = Path(tmp) / ARTIFACT
        build_into(staged, config, progress=progress)
        if target.exists():
            shutil.rmtree(target)
        staged.rename(target)


def main(argv: list[str] | None = None) -> None:
    recipe = TrainConfig()
    p = argparse.ArgumentParser(
        prog="python -m interplab.tinyworld.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("tinyworld-model"), help="output folder")
    p.add_argument("--tokens", type=int, default=recipe.tokens, help="real tokens to train on (default: %(default)s)")
    p.add_argument(
        "--batch-size", type=int, default=recipe.batch_size, help="documents per batch (default: %(default)s)"
    )
    p.add_argument("--lr", type=float, default=recipe.lr, help="peak learning rate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=recipe.seed, help="seed of the data and the initialisation")
    p.add_argument("--init-from", type=Path, default=None, help="continue from a saved model folder")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-eval", action="store_true", help="skip the capability evaluation at the end")
    a = p.parse_args(argv)
    cfg = recipe.with_overrides(tokens=a.tokens, batch_size=a.batch_size, lr=a.lr, seed=a.seed)
    command = "python -m interplab.tinyworld.train " + " ".join(argv if argv is not None else sys.argv[1:])
    summary = build_into(
        a.out, cfg, threads=a.threads, init=a.init_from, run_evaluation=not a.no_eval, command=command.strip()
    )
    print(json.dumps(summary, indent=2))
    if not a.no_eval:
        print((a.out / "evaluation.json").read_text())
    print(f"saved to {a.out}")


if __name__ == "__main__":
    main()
