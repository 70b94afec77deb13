"""Train the bundled TinyWorld model from scratch.

    python -m interplab.tinyworld.train                   # reproduce the bundled model
    python -m interplab.tinyworld.train --tokens 200000   # a quick, small run

A GPT-2-architecture network (4 layers, d_model 192, 4 heads, d_mlp 768, context 128)
from transformers, trained with AdamW on freshly generated TinyWorld documents, one
document per row, rows grouped by length so that little compute goes to padding.
The result is saved in Hugging Face format (config.json, model.safetensors,
tokenizer.json) with a checksum file, ready for `interplab.load_model`.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

from . import language as L
from .generator import TRAIN_MIX, generate
from ..weights import write_checksums
from .tokenizer import batch_tokens, save_tokenizer, token_id

DEFAULTS = dict(n_layer=4, n_embd=192, n_head=4, n_inner=768, n_positions=128)


def model_config(**overrides):
    """The GPT-2 config of the TinyWorld model."""
    from transformers import GPT2Config

    c = {**DEFAULTS, **overrides}
    pad, bos = token_id(L.PAD), token_id(L.BOS)
    return GPT2Config(
        vocab_size=len(L.vocabulary()), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=bos, eos_token_id=bos, pad_token_id=pad, activation_function="gelu_new",
        **c,
    )


# One phase over a mix that gives the in-context families (induction, room tracking)
# more weight than TRAIN_MIX: they form last. Small batches: in-context circuits form
# after a number of optimizer steps more than after a number of tokens.
RECIPE_MIX = {"ioi": 0.12, "induction": 0.28, "facts": 0.16, "rooms": 0.3, "reviews": 0.05, "truth": 0.09}
PHASES = [
    dict(tokens=19_000_000, lr=1e-3, seed=0, mix=RECIPE_MIX, batch_size=32),
]


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


def train(out: Path | None, tokens: int = 12_000_000, batch_size: int = 128, lr: float = 2e-3,
          seed: int = 0, threads: int | None = None, log_every: int = 50, quiet: bool = False,
          mix: dict[str, float] | None = None, init=None, log: list[dict] | None = None):
    """Train a TinyWorld model on about ``tokens`` real (non-padding) tokens; save it to ``out``.

    ``init`` continues from a model (a GPT2LMHeadModel or a folder) instead of a fresh one;
    ``mix`` overrides the family mix; ``log`` is extended (for multi-phase runs).
    """
    from tqdm.auto import tqdm
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    if init is None:
        model = GPT2LMHeadModel(model_config())
    elif isinstance(init, (str, Path)):
        model = GPT2LMHeadModel.from_pretrained(init, local_files_only=True)
    else:
        model = init
    phase_start = log[-1]["tokens"] if log else 0
    seconds_start = log[-1]["seconds"] if log else 0.0
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98))
    est_steps = max(1, tokens // (batch_size * 25))  # ~25 tokens per document on average
    warmup = min(200, est_steps // 10 + 1)

    def lr_at(step: int, seen: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        frac = min(1.0, seen / tokens)
        return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))

    log = log if log is not None else []
    seen, step, t0 = 0, 0, time.time()
    bar = tqdm(total=tokens, unit="tok", unit_scale=True, disable=quiet, desc="training TinyWorld")
    model.train()
    for ids, mask in batches(seed, batch_size, mix=mix):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, seen)
        labels = ids.masked_fill(~mask, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        n = int(mask.sum())
        seen += n
        step += 1
        bar.update(n)
        if step % log_every == 0 or seen >= tokens:
            log.append({"step": step, "tokens": phase_start + seen, "loss": round(loss.item(), 4),
                        "lr": round(opt.param_groups[0]["lr"], 6),
                        "seconds": round(seconds_start + time.time() - t0, 1)})
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if out is not None and step % (log_every * 10) == 0:
                _write_log(out, log)
                model.save_pretrained(out / "checkpoint", safe_serialization=True)
        if seen >= tokens:
            break
    bar.close()
    model.eval()
    info = {"seed": seed, "tokens": seen, "steps": step, "batch_size": batch_size, "lr": lr, "mix": mix or TRAIN_MIX,
            "wall_seconds": round(time.time() - t0, 1), "threads": torch.get_num_threads(),
            "config": DEFAULTS, "final_loss": log[-1]["loss"] if log else None}
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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m interplab.tinyworld.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("tinyworld-model"), help="output folder")
    p.add_argument("--tokens", type=int, default=None,
                   help="train ONE phase on this many tokens, with TRAIN_MIX (default: the bundled model's recipe, PHASES)")
    p.add_argument("--batch-size", type=int, default=128, help="documents per batch (for --tokens runs)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-from", type=Path, default=None, help="continue from a saved model folder")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-eval", action="store_true", help="skip the capability evaluation at the end")
    a = p.parse_args(argv)
    if a.tokens is not None:
        phases = [dict(tokens=a.tokens, lr=a.lr, seed=a.seed, mix=None, batch_size=a.batch_size)]
    else:
        phases = PHASES
    model, log, infos = a.init_from, [], []
    if a.init_from is not None and (a.init_from / "train_log.jsonl").exists():
        log = [json.loads(line) for line in (a.init_from / "train_log.jsonl").read_text().splitlines()]
        if (a.init_from / "training.json").exists():
            prev = json.loads((a.init_from / "training.json").read_text())
            infos = prev.get("phases", [prev])
    for i, ph in enumerate(phases):
        last = i == len(phases) - 1
        model, info = train(a.out if last else None, tokens=ph["tokens"], batch_size=ph["batch_size"], lr=ph["lr"],
                            seed=ph["seed"], threads=a.threads, mix=ph["mix"], init=model, log=log)
        infos.append(info)
    summary = {"command": "python -m interplab.tinyworld.train " + " ".join(argv if argv is not None else sys.argv[1:]),
               "phases": infos, "tokens": sum(x["tokens"] for x in infos),
               "wall_seconds": round(sum(x["wall_seconds"] for x in infos), 1)}
    (a.out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_checksums(a.out)
    print(json.dumps(summary, indent=2))
    if not a.no_eval:
        from ..models import load_model
        from .evaluate import evaluate

        scores = evaluate(load_model(Path(a.out)))
        (a.out / "evaluation.json").write_text(json.dumps(scores, indent=2) + "\n")
        write_checksums(a.out)
        print(json.dumps(scores, indent=2))
    print(f"saved to {a.out}")


if __name__ == "__main__":
    main()
