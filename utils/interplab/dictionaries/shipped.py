"""The SAEs and transcoders shipped with the course: their recipes, how to load them, how they are built.

    interplab rebuild --only sae_topk                           # retrain one artifact from its recipe
    python -m interplab.dictionaries.shipped --evaluate saes          # metrics and recovery of the shipped SAEs
    python -m interplab.dictionaries.shipped --evaluate transcoders   # the transcoder-vs-SAE table, the replacement model

Each artifact of `interplab.artifacts.REGISTRY` built here has a typed recipe whose defaults are
the shipped recipe (`TopKSAERecipe`, `BatchTopKSAERecipe`, `StandardSAERecipe`, `SAESweepRecipe`,
`TranscoderRecipe`, `SkipTranscoderRecipe`, `MLPOutSAERecipe`); `build_artifact(name)` trains it on
the bundled model and writes its folders. The loaders verify every folder's checksums and refuse
one trained on other model weights.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import artifacts, weights
from ..models import load_model
from .config import DEFAULT_HOOK, SAEConfig, TranscoderConfig, mlp_out_hook
from .data import collect_acts, collect_pairs, tinyworld_dataset, training_activations
from .io import load_shipped
from .latents import recovery_summary, recovery_table, tinyworld_latents
from .metrics import METHOD_NAMES, compare_layer, evaluate_sae, replacement_loss
from .modules import SAE, Transcoder
from .training import train_dictionary

SHIPPED_SAES = {
    "topk": "sae_tinyworld_resid1_topk",
    "standard": "sae_tinyworld_resid1_standard",
    "batchtopk": "sae_tinyworld_resid1_batchtopk",
}
SWEEP_FOLDER = "sae_tinyworld_resid1_sweep"  # the sparsity-fidelity sweep (sweep.json), not an SAE
TRANSCODER_PREFIX = "transcoder_tinyworld_mlp"
KINDS = ("transcoder", "skip", "sae")  # the plain transcoders, the skip transcoders, the SAE baselines on mlp_out


# =====================================================================================
# Recipes: the defaults are the shipped artifacts' recipes
# =====================================================================================


@dataclass(frozen=True)
class SAERecipe:
    """How a shipped SAE on the residual stream is trained (shared by the three architectures).

    Attributes:
        architecture, d_sae, k, l1_coeff: the SAE (see `SAEConfig`); d_in is the model's d_model.
        hook_name: where it reads.
        n_docs: fresh training-split TinyWorld documents whose activations it trains on.
        steps, batch_size, lr, seed, dead_after, resample_every: the optimisation (`train_dictionary`).
        eval_docs, eval_seed: the test documents its recorded metrics are measured on.
    """

    architecture: str = "topk"
    d_sae: int = 768
    k: int = 16
    l1_coeff: float = 1.0
    hook_name: str = DEFAULT_HOOK
    n_docs: int = 12_000
    steps: int = 1200
    batch_size: int = 1024
    lr: float = 2e-3
    seed: int = 0
    dead_after: int = 200
    resample_every: int = 250
    eval_docs: int = 400
    eval_seed: int = 1

    def config(self, d_in: int) -> SAEConfig:
        return SAEConfig(
            d_in=d_in,
            d_sae=self.d_sae,
            architecture=self.architecture,
            k=self.k,
            l1_coeff=self.l1_coeff,
            hook_name=self.hook_name,
        )

    def train_kwargs(self, progress: bool = True) -> dict:
        return {
            "steps": self.steps,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "seed": self.seed,
            "dead_after": self.dead_after,
            "resample_every": self.resample_every,
            "progress": progress,
        }


@dataclass(frozen=True)
class TopKSAERecipe(SAERecipe):
    """The shipped TopK SAE (artifact sae_topk): k = 16 of 768 features."""

    architecture: str = "topk"


@dataclass(frozen=True)
class BatchTopKSAERecipe(SAERecipe):
    """The shipped BatchTopK SAE (artifact sae_batchtopk): k = 16 on average, a JumpReLU at inference."""

    architecture: str = "batchtopk"


@dataclass(frozen=True)
class StandardSAERecipe(SAERecipe):
    """The shipped standard SAE (artifact sae_standard): ReLU and an L1 penalty of 8."""

    architecture: str = "standard"
    l1_coeff: float = 8.0


@dataclass(frozen=True)
class SAESweepRecipe:
    """The sparsity-fidelity sweep (artifact sae_sweep): TopK SAEs for several k, standard SAEs for several L1."""

    ks: tuple[int, ...] = (2, 4, 8, 16, 32, 64)
    l1_coeffs: tuple[float, ...] = (2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
    d_sae: int = 768
    hook_name: str = DEFAULT_HOOK
    n_docs: int = 12_000
    steps: int = 600
    batch_size: int = 1024
    lr: float = 2e-3
    seed: int = 0
    eval_docs: int = 400
    eval_seed: int = 1

    def settings(self) -> list[SAERecipe]:
        common = {
            "d_sae": self.d_sae,
            "hook_name": self.hook_name,
            "n_docs": self.n_docs,
            "steps": self.steps,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "seed": self.seed,
        }
        return [SAERecipe(architecture="topk", k=k, **common) for k in self.ks] + [
            SAERecipe(architecture="standard", l1_coeff=c, **common) for c in self.l1_coeffs
        ]


@dataclass(frozen=True)
class MLPRecipe:
    """How the shipped dictionaries of every MLP layer are trained (chapter 5).

    Attributes:
        architecture, d_sae, k, l1_coeff: the dictionary.
        layers: which MLP layers (None: every layer of the model).
        n_docs: fresh training-split documents whose MLP inputs and outputs they train on.
        steps, batch_size, lr, seed, dead_after, resample_every: the optimisation (`train_dictionary`).
        eval_docs, eval_seed: the test documents their recorded metrics are measured on.
    """

    architecture: str = "batchtopk"
    d_sae: int = 768
    k: int = 16
    l1_coeff: float = 1.0
    layers: tuple[int, ...] | None = None
    n_docs: int = 4000
    steps: int = 800
    batch_size: int = 1024
    lr: float = 2e-3
    seed: int = 0
    dead_after: int = 200
    resample_every: int = 250
    eval_docs: int = 300
    eval_seed: int = 1

    KIND = ""  # "transcoder", "skip" or "sae": set by the subclasses

    def train_kwargs(self, progress: bool = True) -> dict:
        return {
            "steps": self.steps,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "seed": self.seed,
            "dead_after": self.dead_after,
            "resample_every": self.resample_every,
            "progress": progress,
        }

    def config(self, layer: int, d_in: int, d_out: int) -> SAEConfig:
        common = {"d_sae": self.d_sae, "architecture": self.architecture, "k": self.k, "l1_coeff": self.l1_coeff}
        if self.KIND == "sae":
            return SAEConfig(d_in=d_out, hook_name=mlp_out_hook(layer), **common)
        return TranscoderConfig(d_in=d_in, d_out=d_out, skip=self.KIND == "skip", layer=layer, **common)


@dataclass(frozen=True)
class TranscoderRecipe(MLPRecipe):
    """The shipped transcoders (artifact transcoders): BatchTopK, k = 16 of 768 features, every MLP."""

    KIND = "transcoder"


@dataclass(frozen=True)
class SkipTranscoderRecipe(MLPRecipe):
    """The shipped skip transcoders (artifact skip_transcoders): the transcoders' recipe with a linear skip path."""

    KIND = "skip"


@dataclass(frozen=True)
class MLPOutSAERecipe(MLPRecipe):
    """The SAE baselines (artifact mlp_out_saes): SAEs on every MLP's output, with the transcoders' recipe."""

    KIND = "sae"


RECIPES = {
    "sae_topk": TopKSAERecipe,
    "sae_batchtopk": BatchTopKSAERecipe,
    "sae_standard": StandardSAERecipe,
    "sae_sweep": SAESweepRecipe,
    "transcoders": TranscoderRecipe,
    "skip_transcoders": SkipTranscoderRecipe,
    "mlp_out_saes": MLPOutSAERecipe,
}


# =====================================================================================
# Loading
# =====================================================================================


def shipped_folder(name: str = "topk") -> Path:
    """The folder of a shipped SAE ("topk", "standard", "batchtopk") or of the sweep ("sweep")."""
    if name == "sweep":
        return weights.WEIGHTS_DIR / SWEEP_FOLDER
    if name not in SHIPPED_SAES:
        raise KeyError(f"no shipped SAE called {name!r}; choose one of {sorted(SHIPPED_SAES)} (or 'sweep')")
    return weights.WEIGHTS_DIR / SHIPPED_SAES[name]


def load_sae(name: str = "topk", device: str | None = None) -> SAE:
    """One of the SAEs shipped for the bundled model ("topk", "standard" or "batchtopk"), verified."""
    if name not in SHIPPED_SAES:
        raise KeyError(f"no shipped SAE called {name!r}; choose one of {sorted(SHIPPED_SAES)}")
    return load_shipped(SAE, shipped_folder(name), device=device)


def transcoder_folder(layer: int, kind: str = "transcoder") -> Path:
    """The folder of a shipped transcoder ("transcoder" or "skip") or SAE baseline ("sae") of one MLP layer."""
    if kind not in KINDS:
        raise KeyError(f"kind must be one of {KINDS}, not {kind!r}")
    return weights.WEIGHTS_DIR / (f"{TRANSCODER_PREFIX}{layer}" + ("" if kind == "transcoder" else f"_{kind}"))


def load_transcoder(layer: int, skip: bool = False, device: str | None = None) -> Transcoder:
    """The transcoder shipped for the MLP of ``layer`` of the bundled model, verified."""
    return load_shipped(Transcoder, transcoder_folder(layer, "skip" if skip else "transcoder"), device=device)


def load_transcoders(skip: bool = False, n_layers: int = 4, device: str | None = None) -> list[Transcoder]:
    """The shipped transcoders of every MLP layer, in layer order."""
    return [load_transcoder(L, skip=skip, device=device) for L in range(n_layers)]


def load_sae_baseline(layer: int, device: str | None = None) -> SAE:
    """The SAE shipped as a baseline: trained on the output of the MLP of ``layer`` with the transcoders' recipe."""
    return load_shipped(SAE, transcoder_folder(layer, "sae"), device=device)


# =====================================================================================
# Building
# =====================================================================================


def _finish(folder: Path, artifact: str, recipe) -> None:
    artifacts.write_provenance(folder, artifact, recipe)
    weights.write_checksums(folder)


def build_sae(
    recipe: SAERecipe, folder: Path, model=None, progress: bool = True, artifact: str | None = None
) -> tuple[SAE, dict]:
    """Train one SAE from ``recipe`` and write it to ``folder`` (with provenance when ``artifact`` is named)."""
    model = model or load_model("tinyworld", device="cpu")
    t0, cpu0 = time.time(), time.process_time()
    acts = training_activations(model, recipe.n_docs, seed=recipe.seed, hook=recipe.hook_name)
    collected = time.time() - t0
    sae = train_dictionary(acts, recipe.config(acts.shape[-1]), **recipe.train_kwargs(progress))
    seconds, cpu_seconds = time.time() - t0, time.process_time() - cpu0
    _, ids, mask = tinyworld_dataset(recipe.eval_docs, seed=recipe.eval_seed, split="test")
    metrics = evaluate_sae(model, sae, ids, mask)
    info = {
        **sae.info,
        "training_tokens_available": int(acts.shape[0]),
        "n_docs": recipe.n_docs,
        "collect_seconds": round(collected, 1),
        "total_seconds": round(seconds, 1),
        "cpu_seconds": round(cpu_seconds, 1),
        "threads": torch.get_num_threads(),
        "eval": {"docs": recipe.eval_docs, "seed": recipe.eval_seed, "split": "test", **metrics},
    }
    sae.save(folder, extra=info)
    if artifact:
        _finish(folder, artifact, recipe)
    return sae, info


def build_sweep(
    recipe: SAESweepRecipe, folder: Path, model=None, progress: bool = False, artifact: str | None = None
) -> list[dict]:
    """Run the sparsity-fidelity sweep and write ``sweep.json`` into ``folder``."""
    model = model or load_model("tinyworld", device="cpu")
    acts = training_activations(model, recipe.n_docs, seed=recipe.seed, hook=recipe.hook_name)
    _, ids, mask = tinyworld_dataset(recipe.eval_docs, seed=recipe.eval_seed, split="test")
    x = collect_acts(model, ids, mask, recipe.hook_name)
    rows = []
    for setting in recipe.settings():
        sae = train_dictionary(acts, setting.config(acts.shape[-1]), **setting.train_kwargs(progress))
        m = evaluate_sae(model, sae, ids, mask, acts=x)
        extra = {"k": setting.k} if setting.architecture == "topk" else {"l1_coeff": setting.l1_coeff}
        rows.append(
            {
                "architecture": setting.architecture,
                **extra,
                **{k: m[k] for k in ("l0", "explained_variance", "loss_recovered", "kl_sae", "mse", "dead_features")},
            }
        )
        if progress:
            print(json.dumps(rows[-1]))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sweep.json").write_text(json.dumps(rows, indent=1) + "\n")
    if artifact:
        _finish(folder, artifact, recipe)
    else:
        weights.write_checksums(folder)
    return rows


def build_mlp_dictionaries(
    recipe: MLPRecipe, out_dir: Path, model=None, progress: bool = True, artifact: str | None = None
) -> dict:
    """Train one dictionary of kind ``recipe.KIND`` for every MLP layer; write each into its folder under ``out_dir``.

    Every module is trained from its own seed on the same cached pairs, so building the
    transcoders, the skip transcoders and the SAE baselines separately gives the same weights
    as building them together.
    """
    model = model or load_model("tinyworld", device="cpu")
    layers = list(range(model.cfg.n_layers)) if recipe.layers is None else list(recipe.layers)
    t0 = time.time()
    _, ids, mask = tinyworld_dataset(recipe.n_docs, seed=recipe.seed, split="train")
    pairs = collect_pairs(model, ids, mask, layers, progress=progress)
    del ids, mask
    _, eval_ids, eval_mask = tinyworld_dataset(recipe.eval_docs, seed=recipe.eval_seed, split="test")
    report = {"collect_seconds": round(time.time() - t0, 1), "tokens": int(pairs[layers[0]][0].shape[0]), "layers": {}}
    kind = recipe.KIND
    for L in layers:
        x, y = pairs[L]
        cfg = recipe.config(L, x.shape[-1], y.shape[-1])
        module = train_dictionary(
            y if kind == "sae" else x, cfg, target=None if kind == "sae" else y, **recipe.train_kwargs(progress)
        )
        made = {"transcoder": None, "skip": None, "sae": None, kind: module}
        ev = compare_layer(model, L, made["transcoder"], eval_ids, eval_mask, skip=made["skip"], sae=made["sae"])
        report["layers"][L] = ev
        row = next(r for r in ev if r["method"] == METHOD_NAMES[kind])
        info = {
            **module.info,
            "n_docs": recipe.n_docs,
            "training_tokens": int(x.shape[0]),
            "eval": {"docs": recipe.eval_docs, "seed": recipe.eval_seed, "split": "test", **row},
        }
        folder = Path(out_dir) / transcoder_folder(L, kind).name
        module.save(folder, extra=info)
        if artifact:
            _finish(folder, artifact, recipe)
        if progress:
            print(json.dumps(ev))
    report["total_seconds"] = round(time.time() - t0, 1)
    return report


def build_artifact(name: str, *, progress: bool = True, out_dir: Path | None = None) -> None:
    """Build registry artifact ``name`` with its shipped recipe and write its folders under ``out_dir``.

    ``out_dir`` defaults to the package's weights folder (`interplab.weights.WEIGHTS_DIR`).
    """
    if name not in RECIPES:
        raise KeyError(f"{name!r} is not built here; this module builds {', '.join(RECIPES)}")
    recipe = RECIPES[name]()
    out_dir = Path(out_dir) if out_dir is not None else weights.WEIGHTS_DIR
    if isinstance(recipe, MLPRecipe):
        build_mlp_dictionaries(recipe, out_dir, progress=progress, artifact=name)
        return
    (folder,) = artifacts.get(name).folders
    if isinstance(recipe, SAERecipe):
        build_sae(recipe, out_dir / folder, progress=progress, artifact=name)
    else:
        build_sweep(recipe, out_dir / folder, progress=progress, artifact=name)


# =====================================================================================
# Evaluating
# =====================================================================================


@torch.no_grad()
def evaluate_saes(model=None, n_docs: int = 400, seed: int = 1) -> dict:
    """Metrics and ground-truth recovery of every shipped SAE on ``n_docs`` test documents."""
    model = model or load_model("tinyworld", device="cpu")
    docs, ids, mask = tinyworld_dataset(n_docs, seed=seed, split="test")
    names, labels = tinyworld_latents(docs)
    x = collect_acts(model, ids, mask)
    out = {}
    for name in SHIPPED_SAES:
        sae = load_sae(name)
        out[name] = {
            "metrics": evaluate_sae(model, sae, ids, mask, acts=x),
            "recovery": recovery_summary(recovery_table(sae.encode(x), labels, names)),
        }
    return out


@torch.no_grad()
def evaluate_transcoders(model=None, n_docs: int = 100, seed: int = 1) -> dict:
    """The chapter's headline numbers for the shipped transcoders: the per-layer table and the replacement model."""
    model = model or load_model("tinyworld", device="cpu")
    _, ids, mask = tinyworld_dataset(n_docs, seed=seed, split="test")
    n = model.cfg.n_layers
    table = []
    for L in range(n):
        table += compare_layer(
            model, L, load_transcoder(L), ids, mask, skip=load_transcoder(L, skip=True), sae=load_sae_baseline(L)
        )
    return {
        "table": table,
        "replacement": replacement_loss(model, load_transcoders(n_layers=n), ids, mask),
        "replacement_skip": replacement_loss(model, load_transcoders(skip=True, n_layers=n), ids, mask),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m interplab.dictionaries.shipped",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--evaluate",
        choices=["saes", "transcoders"],
        required=True,
        help="which shipped dictionaries to measure (rebuild them with `interplab rebuild`)",
    )
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    result = evaluate_saes() if a.evaluate == "saes" else evaluate_transcoders()
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
