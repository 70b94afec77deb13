"""Activations on disk: write them chunk by chunk, read them back memory-mapped.

The course's SAEs and transcoders train on a few million activations, which fit in
memory. A longer run does not have to: `write_store` runs the model over token
batches and appends each batch's activations to a float32 file on disk as it goes
(it never holds more than one batch), and `open_store` maps those files back as
torch tensors that `interplab.dictionaries.train_dictionary` (SAEs) and
`interplab.dictionaries.train_transcoder` take as they are. The operating
system pages rows in as training samples them, so the store can be larger than memory.

    >>> store = write_store("acts/resid1", model, ids, "blocks.1.hook_resid_post", mask=mask)  # doctest: +SKIP
    >>> store = open_store("acts/resid1")                                                     # doctest: +SKIP
    >>> sae = train_dictionary(store["blocks.1.hook_resid_post"], cfg, steps=1200)            # doctest: +SKIP
    >>> pairs = write_mlp_pairs("acts/mlp0", model, ids, layer=0, mask=mask)                  # doctest: +SKIP
    >>> tc = train_transcoder(*pairs.pair(0), tc_cfg)                                         # doctest: +SKIP

A store is a folder: one raw float32 file per hook (``<hook>.f32``, row-major
[n_rows, d]) and ``header.json`` (format, model, hooks, shapes, dtype, SHA-256 of each
file). The header is written last, so a folder without one is an interrupted write;
`open_store` refuses it, and refuses files whose size does not match the header
(truncated), and checks the contents cheaply by default (small stores re-hashed, large ones
sampled); ``verify=True`` re-hashes everything (corrupt).

For runs that outgrow the course's trainer, `saelens_config` writes the SAELens 6
training configuration with the same hyperparameters as `train_dictionary`, and `run_saelens`
hands it to SAELens's own runner:

    python -m interplab.activation_store saelens-config --architecture topk --d-sae 768 -k 16 \\
        --steps 1200 --batch-size 1024 --lr 2e-3 --out saelens_cfg.json
    python -m interplab.activation_store saelens-train saelens_cfg.json --output-path saelens_out
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from . import tinyworld
from .activations import iter_activations
from .dictionaries import DEFAULT_HOOK, SAEConfig, mlp_in_hook, mlp_out_hook
from .dictionaries.data import sae_token_mask
from .models import load_model

FORMAT = "interplab-activation-store"
VERSION = 1
HEADER = "header.json"
DTYPE = "float32"
_ITEMSIZE = 4


class StoreError(ValueError):
    """The folder is not a complete, intact activation store."""


def _file_name(hook: str) -> str:
    return hook.replace("/", "_") + ".f32"


def _as_chunks(tokens, mask) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    if isinstance(tokens, torch.Tensor):
        yield tokens, mask
        return
    if mask is not None:
        raise ValueError("pass the mask inside each (tokens, mask) chunk when tokens is an iterable of chunks")
    for chunk in tokens:
        if isinstance(chunk, torch.Tensor):
            yield chunk, None
        else:
            ids, m = chunk
            yield ids, m


def write_store(
    path: str | Path,
    model,
    tokens: torch.Tensor | Iterable[torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]],
    hooks: str | Sequence[str],
    *,
    mask: torch.Tensor | None = None,
    batch_size: int = 64,
    model_name: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ActivationStore:
    """Run `model` over `tokens` and append the activations at `hooks` to files under `path`.

    Memory holds one batch of activations at a time (`interplab.activations.iter_activations`);
    each batch is written and flushed before the next forward pass.

    Args:
        path: the store's folder (created).
        model: a HookedTransformer.
        tokens: [n_seq, pos] token ids, or an iterable of chunks, each [n_seq, pos] ids or an
            (ids, mask) pair: a dataset whose tokens do not fit in memory either can be generated
            chunk by chunk.
        hooks: one hook name or several; every hook gets one file, and row i of every file comes
            from the same token (e.g. a transcoder's MLP input and output).
        mask: with a tensor of tokens, [n_seq, pos] bool: keep only these positions.
        batch_size: sequences per forward pass.
        model_name: recorded in the header (default: model.cfg.model_name).
        overwrite: replace an existing store at `path`.
        progress: a progress bar over chunks.

    Returns:
        The store, opened (memory-mapped).
    """
    from tqdm.auto import tqdm

    names = [hooks] if isinstance(hooks, str) else list(hooks)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"hooks must be one or more distinct hook names, got {names}")
    folder = Path(path)
    if (folder / HEADER).exists() and not overwrite:
        raise FileExistsError(f"{folder} already holds an activation store; pass overwrite=True to replace it")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / HEADER).unlink(missing_ok=True)  # the header is written last: no header = incomplete
    files = {n: open(folder / _file_name(n), "wb") for n in names}
    hashes = {n: hashlib.sha256() for n in names}
    widths: dict[str, int] = {}
    n_rows, n_seq, t0 = 0, 0, time.time()
    try:
        for ids, m in tqdm(_as_chunks(tokens, mask), disable=not progress, desc="writing activations", unit="chunk"):
            n_seq += ids.shape[0]
            for batch in iter_activations(
                model, ids, names, mask=m, batch_size=batch_size, dtype=torch.float32, progress=False
            ):
                rows = None
                for n in names:
                    a = batch[n]
                    a = a.reshape(a.shape[0] * a.shape[1], -1) if m is None else a.reshape(a.shape[0], -1)
                    if widths.setdefault(n, a.shape[1]) != a.shape[1]:
                        raise ValueError(f"{n}: rows of width {a.shape[1]} after rows of width {widths[n]}")
                    if rows is not None and a.shape[0] != rows:
                        raise ValueError("hooks gave different numbers of rows for one batch")
                    rows = a.shape[0]
                    buf = a.contiguous().numpy()
                    files[n].write(buf.data)
                    hashes[n].update(buf.data)
                    files[n].flush()
                n_rows += rows or 0
    finally:
        for f in files.values():
            f.close()
    if n_rows == 0:
        raise ValueError("no activations were written (empty tokens or an all-False mask)")
    header = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": DTYPE,
        "rows": n_rows,
        "sequences": n_seq,
        "model": model_name or getattr(model.cfg, "model_name", None),
        "d_model": int(model.cfg.d_model),
        "hooks": {
            n: {
                "file": _file_name(n),
                "shape": [n_rows, widths[n]],
                "sha256": hashes[n].hexdigest(),
                "sample_sha256": _sample_hash(folder / _file_name(n)),
            }
            for n in names
        },
        "seconds": round(time.time() - t0, 1),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    tmp = folder / (HEADER + ".tmp")
    tmp.write_text(json.dumps(header, indent=1) + "\n")
    tmp.replace(folder / HEADER)
    return open_store(folder)


def write_mlp_pairs(path: str | Path, model, tokens, layer: int, **kwargs) -> ActivationStore:
    """`write_store` for a transcoder: the MLP's normalised input and its output at `layer`, row-aligned."""
    return write_store(path, model, tokens, [mlp_in_hook(layer), mlp_out_hook(layer)], **kwargs)


def tinyworld_chunks(n_docs: int, seed: int = 0, split: str = "train", docs_per_chunk: int = 256):
    """(ids, mask) chunks of fresh TinyWorld documents, generated lazily; mask keeps real tokens but <bos>.

    Documents are generated ``docs_per_chunk`` at a time (so the token ids never exist all at
    once either); the same ``(n_docs, seed, split)`` gives the same documents as
    ``tinyworld.generate(n_docs, seed=seed, split=split)``.
    """
    docs = tinyworld.generate(n_docs, seed=seed, split=split)
    for start in range(0, len(docs), docs_per_chunk):
        ids, mask = tinyworld.batch_tokens(docs[start : start + docs_per_chunk])
        yield ids, sae_token_mask(ids, mask)


class ActivationStore:
    """An opened store: ``store[hook]`` is a memory-mapped [n_rows, d] float32 torch tensor.

    The mapping is copy-on-write: writing into the tensor changes memory, never the file.
    """

    def __init__(self, path: Path, header: dict):
        self.path, self.header = path, header
        self._tensors: dict[str, torch.Tensor] = {}
        self._arrays: dict[str, np.memmap] = {}

    @property
    def hooks(self) -> list[str]:
        return list(self.header["hooks"])

    def __len__(self) -> int:
        return int(self.header["rows"])

    def __contains__(self, hook: str) -> bool:
        return hook in self.header["hooks"]

    def __getitem__(self, hook: str) -> torch.Tensor:
        if hook not in self.header["hooks"]:
            raise KeyError(f"{hook!r} is not in this store; it holds {self.hooks}")
        if hook not in self._tensors:
            self._tensors[hook] = torch.from_numpy(self.array(hook))
        return self._tensors[hook]

    def array(self, hook: str) -> np.memmap:
        """The numpy memory map behind ``store[hook]`` (they share memory)."""
        if hook not in self._arrays:
            info = self.header["hooks"][hook]
            self._arrays[hook] = np.memmap(
                self.path / info["file"], dtype=np.float32, mode="c", shape=tuple(info["shape"])
            )
        return self._arrays[hook]

    def pair(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(MLP input, MLP output) of `layer`, for `train_transcoder(x, y, cfg)`."""
        return self[mlp_in_hook(layer)], self[mlp_out_hook(layer)]

    def verify(self, chunk_rows: int = 65_536) -> None:
        """Re-hash every file in chunks against the header; raise StoreError on a mismatch."""
        for info in self.header["hooks"].values():
            h, d = hashlib.sha256(), info["shape"][1]
            with open(self.path / info["file"], "rb") as f:
                while block := f.read(chunk_rows * d * _ITEMSIZE):
                    h.update(block)
            if h.hexdigest() != info["sha256"]:
                raise StoreError(
                    f"{self.path / info['file']} is corrupt: its SHA-256 does not match header.json. "
                    f"Write the store again with write_store(..., overwrite=True)."
                )

    def __repr__(self) -> str:
        shapes = ", ".join(f"{h}: {tuple(i['shape'])}" for h, i in self.header["hooks"].items())
        return f"ActivationStore({str(self.path)!r}, model={self.header.get('model')!r}, {shapes})"


QUICK_VERIFY_BYTES = 256 << 20  # stores up to this size are fully re-hashed on every open (well under a second)
_SAMPLES, _SAMPLE_BYTES = 64, 1 << 16


def _sample_hash(path: Path) -> str:
    """SHA-256 of 64 evenly spaced 64 KB blocks of a file: a cheap check for flipped or zeroed bytes."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for k in range(_SAMPLES):
            f.seek(max(0, (size - _SAMPLE_BYTES) * k // max(1, _SAMPLES - 1)))
            h.update(f.read(_SAMPLE_BYTES))
    return h.hexdigest()


def _damaged(hp: Path, what: str) -> StoreError:
    return StoreError(
        f"{hp} is damaged: {what}. The store cannot be read safely; write it again with "
        f"write_store(..., overwrite=True) (or `python -m interplab.activation_store write ...`)."
    )


def _check_header(header, folder: Path, hp: Path) -> None:
    """Every field open_store relies on, with the store's own error for anything malformed."""
    if not isinstance(header, dict):
        raise _damaged(hp, "it is not a JSON object")
    if header.get("format") != FORMAT or header.get("dtype") != DTYPE:
        raise StoreError(f"{hp} is not an {FORMAT} header of {DTYPE} data")
    version = header.get("version", 0)
    if not isinstance(version, int):
        raise _damaged(hp, f"its version is {version!r}, not a number")
    if version > VERSION:
        raise StoreError(f"{folder} was written by a newer interplab (store version {version})")
    hooks = header.get("hooks")
    if not isinstance(hooks, dict) or not hooks:
        raise _damaged(hp, "it lists no hooks")
    rows = header.get("rows")
    for hook, info in hooks.items():
        if not isinstance(info, dict):
            raise _damaged(hp, f"the entry of {hook!r} is not an object")
        name, shape, digest = info.get("file"), info.get("shape"), info.get("sha256")
        if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
            raise _damaged(
                hp,
                f"the file of {hook!r} is {name!r}, not a file name inside the store "
                f"(a store never reads outside its own folder)",
            )
        if not (isinstance(shape, list) and len(shape) == 2 and all(type(x) is int and x >= 0 for x in shape)):
            raise _damaged(hp, f"the shape of {hook!r} is {shape!r}, not [rows, width]")
        if not (isinstance(digest, str) and len(digest) == 64):
            raise _damaged(hp, f"the sha256 of {hook!r} is missing or malformed")
        if type(rows) is int and shape[0] != rows:
            raise _damaged(hp, f"{hook!r} has {shape[0]} rows but the store says {rows}")
    if type(rows) is not int:
        raise _damaged(hp, f"its row count is {rows!r}, not a number")


def open_store(path: str | Path, verify: bool | None = None) -> ActivationStore:
    """Open a store written by `write_store`, checking its header, file sizes and contents.

    ``verify=None`` (the default) is a cheap check: stores up to 256 MB are fully re-hashed, larger
    ones are checked on 64 sampled blocks per file; ``verify=True`` re-hashes everything,
    ``verify=False`` checks sizes only.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise StoreError(f"{folder} is not a folder (an activation store is a folder with {HEADER})")
    hp = folder / HEADER
    if not hp.exists():
        raise StoreError(
            f"{folder} has no {HEADER}: the write was interrupted or this is not an activation "
            f"store. Write it again with write_store(..., overwrite=True)."
        )
    try:
        header = json.loads(hp.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{hp} is not valid JSON ({e})") from e
    _check_header(header, folder, hp)
    for hook, info in header["hooks"].items():
        f = folder / info["file"]
        n, d = info["shape"]
        want = n * d * _ITEMSIZE
        have = f.stat().st_size if f.exists() else None
        if have is None:
            raise StoreError(f"{f} is missing (store of {hook})")
        if have != want:
            raise StoreError(
                f"{f} has {have:,} bytes, but header.json says {n:,} x {d} float32 = {want:,}: "
                f"the file is {'truncated' if have < want else 'longer than recorded'}"
            )
    store = ActivationStore(folder, header)
    total = sum(i["shape"][0] * i["shape"][1] * _ITEMSIZE for i in header["hooks"].values())
    if verify or (verify is None and total <= QUICK_VERIFY_BYTES):
        store.verify()
    elif verify is None:
        for hook, info in header["hooks"].items():
            if (
                isinstance(info.get("sample_sha256"), str)
                and _sample_hash(folder / info["file"]) != info["sample_sha256"]
            ):
                raise StoreError(
                    f"{folder / info['file']} is corrupt: sampled blocks do not match header.json "
                    f"(store of {hook}). Write the store again with write_store(..., overwrite=True)."
                )
    return store


# =====================================================================================
# Handing a long run to SAELens
# =====================================================================================


def saelens_config(
    sae_cfg,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    hook_name: str | None = None,
    model_name: str | None = None,
    dataset_path: str = "",
    context_size: int = 128,
    seed: int = 0,
    dead_after: int = 200,
    device: str = "cpu",
    **overrides,
):
    """The SAELens 6 `LanguageModelSAERunnerConfig` that trains `sae_cfg` with `train_dictionary`'s hyperparameters.

    Mapping (interplab -> SAELens):

    - architecture "standard" / "topk" / "batchtopk" -> StandardTrainingSAEConfig(l1_coefficient=l1_coeff)
      / TopKTrainingSAEConfig(k) / BatchTopKTrainingSAEConfig(k); d_in, d_sae, apply_b_dec_to_input as is.
      Both libraries weight the L1 penalty by decoder-row norms and sum the squared error over
      the last dimension, so l1_coeff carries over unchanged.
    - steps x batch_size -> training_tokens; batch_size -> train_batch_size_tokens; lr -> lr.
    - the schedule (constant, then linear decay to 0 over the last 20% of the steps) ->
      lr_scheduler_name="constant", lr_warm_up_steps=0, lr_decay_steps=steps - int(0.8 * steps).
    - Adam's betas (0.9, 0.999) are both libraries' defaults; seed -> seed.
    - dead_after -> dead_feature_window. SAELens 6 does not resample dead features; its TopK and
      BatchTopK trainers use an auxiliary loss for them instead (a difference in recipe, not a setting).

    Args:
        sae_cfg: an `interplab.dictionaries.SAEConfig` (an SAE; SAELens 6 trains no transcoders).
        steps, batch_size, lr, seed, dead_after: as given to `train_dictionary`.
        hook_name: default sae_cfg.hook_name.
        model_name: a TransformerLens model name (default sae_cfg.model_name). For the bundled
            model, pass ``override_model=interplab.load_model("tinyworld")`` to SAELens's runner.
        dataset_path: a Hugging Face dataset (or pass ``override_dataset`` to the runner).
        context_size: tokens per sequence SAELens feeds the model.
        device: where SAELens trains.
        **overrides: any other LanguageModelSAERunnerConfig field.
    """
    from sae_lens import (
        BatchTopKTrainingSAEConfig,
        LanguageModelSAERunnerConfig,
        LoggingConfig,
        StandardTrainingSAEConfig,
        TopKTrainingSAEConfig,
    )

    if getattr(sae_cfg, "is_transcoder", False) or getattr(sae_cfg, "d_out", sae_cfg.d_in) != sae_cfg.d_in:
        raise NotImplementedError(
            "SAELens 6's training runner trains SAEs only, not transcoders; train "
            "transcoders with interplab.dictionaries.train_transcoder on a store"
        )
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be at least 1, got {steps}, {batch_size}")
    common = dict(
        d_in=sae_cfg.d_in,
        d_sae=sae_cfg.d_sae,
        apply_b_dec_to_input=sae_cfg.apply_b_dec_to_input,
        device=device,
        dtype="float32",
    )
    if sae_cfg.architecture == "standard":
        sae = StandardTrainingSAEConfig(l1_coefficient=sae_cfg.l1_coeff, **common)
    elif sae_cfg.architecture == "topk":
        sae = TopKTrainingSAEConfig(k=sae_cfg.k, **common)
    elif sae_cfg.architecture == "batchtopk":
        sae = BatchTopKTrainingSAEConfig(k=sae_cfg.k, **common)
    else:  # pragma: no cover - SAEConfig validates its architecture
        raise ValueError(f"no SAELens mapping for architecture {sae_cfg.architecture!r}")
    kwargs = dict(
        sae=sae,
        model_name=model_name or sae_cfg.model_name,
        hook_name=hook_name or sae_cfg.hook_name,
        dataset_path=dataset_path,
        context_size=context_size,
        training_tokens=steps * batch_size,
        train_batch_size_tokens=batch_size,
        lr=lr,
        lr_end=lr,
        lr_scheduler_name="constant",
        lr_warm_up_steps=0,
        lr_decay_steps=steps - int(0.8 * steps),
        adam_beta1=0.9,
        adam_beta2=0.999,
        dead_feature_window=dead_after,
        seed=seed,
        device=device,
        dtype="float32",
        logger=LoggingConfig(log_to_wandb=False),
        checkpoint_path=None,
        verbose=False,
    )
    kwargs.update(overrides)
    return LanguageModelSAERunnerConfig(**kwargs)


def tinyworld_token_dataset(n_docs: int, context_size: int = 128, seed: int = 0, split: str = "train"):
    """TinyWorld text as a pretokenized Hugging Face dataset for SAELens: an "input_ids" column of
    `context_size`-token windows, documents (each starting with <bos>) packed end to end."""
    from datasets import Dataset

    ids, mask = tinyworld.batch_tokens(tinyworld.generate(n_docs, seed=seed, split=split))
    stream = torch.cat([row[keep] for row, keep in zip(ids, mask)])
    n = len(stream) // context_size * context_size
    if n == 0:
        raise ValueError(f"{n_docs} documents hold fewer than context_size={context_size} tokens")
    return Dataset.from_dict({"input_ids": stream[:n].view(-1, context_size).tolist()})


def run_saelens(cfg_path: str | Path, output_path: str | Path | None = None, n_docs: int = 20_000):
    """Train with SAELens's own runner from a config written by `saelens-config`; return the SAE.

    For ``model_name == "tinyworld"`` the bundled model and `tinyworld_token_dataset(n_docs)`
    are passed to the runner (they are not on a hub); any other model and dataset are
    loaded by SAELens from the names in the config.
    """
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner

    d = json.loads(Path(cfg_path).read_text())
    if output_path is not None:
        d["output_path"] = str(output_path)
    cfg = LanguageModelSAERunnerConfig.from_dict(d)
    kwargs = {}
    if cfg.model_name == "tinyworld":
        kwargs = dict(
            override_model=load_model("tinyworld", device=cfg.device),
            override_dataset=tinyworld_token_dataset(n_docs, cfg.context_size, seed=cfg.seed),
        )
    return LanguageModelSAETrainingRunner(cfg, **kwargs).run()


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m interplab.activation_store",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    w = sub.add_parser("write", help="write TinyWorld activations at hooks to a store on disk")
    w.add_argument("path")
    w.add_argument("--hook", action="append", help="hook name (repeatable; default blocks.1.hook_resid_post)")
    w.add_argument("--mlp-layer", type=int, help="write a transcoder's MLP input/output pairs of this layer instead")
    w.add_argument("--docs", type=int, default=12_000, help="training-split TinyWorld documents")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--overwrite", action="store_true")

    i = sub.add_parser("info", help="print a store's header (and, with --verify, check its hashes)")
    i.add_argument("path")
    i.add_argument("--verify", action="store_true")

    c = sub.add_parser(
        "saelens-config", help="write the SAELens 6 training config matching train_dictionary's settings"
    )
    c.add_argument("--architecture", default="topk", choices=["standard", "topk", "batchtopk"])
    c.add_argument("--d-in", type=int, default=None, help="default: the bundled model's d_model")
    c.add_argument("--d-sae", type=int, default=768)
    c.add_argument("-k", type=int, default=16)
    c.add_argument("--l1-coeff", type=float, default=8.0)
    c.add_argument("--steps", type=int, default=1200)
    c.add_argument("--batch-size", type=int, default=1024)
    c.add_argument("--lr", type=float, default=2e-3)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--hook", default=None, help="default blocks.1.hook_resid_post")
    c.add_argument("--model-name", default="tinyworld")
    c.add_argument("--dataset-path", default="")
    c.add_argument("--context-size", type=int, default=128)
    c.add_argument("--device", default="cpu")
    c.add_argument("--out", default="-", help="JSON file (default: stdout)")
    r = sub.add_parser("saelens-train", help="train with SAELens's runner from a saelens-config JSON")
    r.add_argument("config")
    r.add_argument("--output-path", default=None, help="where SAELens writes the SAE (default: the config's)")
    r.add_argument("--docs", type=int, default=20_000, help="TinyWorld documents (for model_name tinyworld)")
    a = p.parse_args(argv)

    if a.cmd == "write":
        model = load_model("tinyworld", device="cpu")
        chunks = tinyworld_chunks(a.docs, seed=a.seed, split="train")
        if a.mlp_layer is not None:
            store = write_mlp_pairs(a.path, model, chunks, a.mlp_layer, overwrite=a.overwrite)
        else:
            store = write_store(a.path, model, chunks, a.hook or ["blocks.1.hook_resid_post"], overwrite=a.overwrite)
        print(store)
        return 0
    if a.cmd == "saelens-train":
        t0 = time.time()
        sae = run_saelens(a.config, a.output_path, a.docs)
        print(f"SAELens trained a {type(sae).__name__} with {sae.cfg.d_sae} features in {time.time() - t0:.0f} s")
        return 0
    if a.cmd == "info":
        store = open_store(a.path, verify=a.verify)
        print(json.dumps(store.header, indent=1))
        if a.verify:
            print("hashes verified")
        return 0

    d_in = a.d_in
    if d_in is None:
        d_in = load_model("tinyworld", device="cpu").cfg.d_model
    sae_cfg = SAEConfig(
        d_in=d_in,
        d_sae=a.d_sae,
        architecture=a.architecture,
        k=a.k,
        l1_coeff=a.l1_coeff,
        hook_name=a.hook or DEFAULT_HOOK,
        model_name=a.model_name,
    )
    cfg = saelens_config(
        sae_cfg,
        steps=a.steps,
        batch_size=a.batch_size,
        lr=a.lr,
        seed=a.seed,
        dataset_path=a.dataset_path,
        context_size=a.context_size,
        device=a.device,
    )
    text = json.dumps(_jsonable(cfg.to_dict()), indent=1) + "\n"
    if a.out == "-":
        sys.stdout.write(text)
    else:
        Path(a.out).write_text(text)
        print(f"wrote {a.out} (load it with LanguageModelSAERunnerConfig.from_dict(json.load(open({a.out!r}))))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
