"""Every shipped artifact: what it is, what it depends on, how it is built, and whether it fits the model.

The bundled TinyWorld model feeds everything else the course ships (the tuned lens, the SAEs,
the transcoders, ...). Each artifact is one entry of `REGISTRY`: the folders it writes under
``interplab/weights/``, the artifacts it is trained on, the function that builds it and the
typed config whose defaults are its shipped recipe.

    interplab rebuild --check                 # verify every artifact without training
    interplab rebuild --only tuned_lens       # rebuild one (and nothing else)
    interplab rebuild                         # rebuild everything, in dependency order

Every artifact folder holds a ``provenance.json``: the SHA-256 of the model weights it was
trained on, its recipe and the package version. Loaders call `require_model_match`, so an
artifact trained on other weights is refused with a message naming both hashes and the
command that rebuilds it, instead of giving quietly wrong results.

A builder is ``build(name: str, *, progress: bool = True) -> None``: it trains artifact
``name`` with its recipe on the bundled model and writes its folders (files, then
`write_provenance`, then `weights.write_checksums`).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .weights import WEIGHTS_DIR, CorruptedFileError, read_checksums, verify

PROVENANCE_FILE = "provenance.json"
MODEL_ARTIFACT = "tinyworld"
MODEL_FILE = "model.safetensors"


@dataclass(frozen=True)
class Artifact:
    """One shipped artifact."""

    name: str
    folders: tuple[str, ...]  # under WEIGHTS_DIR
    depends: tuple[str, ...]  # artifacts it is trained on
    build: str  # "module:function", called as function(name, progress=...)
    config: str  # "module:Class": Class() is the shipped recipe
    about: str = ""
    minutes: float = 0.0  # rough build time on 2 idle CPU cores, shown before building

    def paths(self, weights_dir: Path | None = None) -> list[Path]:
        return [(weights_dir or WEIGHTS_DIR) / f for f in self.folders]


def _mlp_folders(suffix: str) -> tuple[str, ...]:
    return tuple(f"transcoder_tinyworld_mlp{layer}{suffix}" for layer in range(4))


_DICT = "interplab.dictionaries.shipped"
REGISTRY: dict[str, Artifact] = {
    a.name: a
    for a in [
        Artifact(
            "tinyworld",
            ("tinyworld",),
            (),
            "interplab.tinyworld.train:build_artifact",
            "interplab.tinyworld.train:TrainConfig",
            "the bundled TinyWorld model",
            55,
        ),
        Artifact(
            "tuned_lens",
            ("tuned_lens",),
            ("tinyworld",),
            "interplab.lenses:build_artifact",
            "interplab.lenses:TunedLensConfig",
            "tuned-lens translators (chapter 02)",
            1,
        ),
        Artifact(
            "sae_topk",
            ("sae_tinyworld_resid1_topk",),
            ("tinyworld",),
            f"{_DICT}:build_artifact",
            f"{_DICT}:TopKSAERecipe",
            "TopK SAE on blocks.1.hook_resid_post (chapter 04)",
            2,
        ),
        Artifact(
            "sae_batchtopk",
            ("sae_tinyworld_resid1_batchtopk",),
            ("tinyworld",),
            f"{_DICT}:build_artifact",
            f"{_DICT}:BatchTopKSAERecipe",
            "BatchTopK SAE on blocks.1.hook_resid_post (chapter 04)",
            2,
        ),
        Artifact(
            "sae_standard",
            ("sae_tinyworld_resid1_standard",),
            ("tinyworld",),
            f"{_DICT}:build_artifact",
            f"{_DICT}:StandardSAERecipe",
            "standard (L1) SAE on blocks.1.hook_resid_post (chapter 04)",
            2,
        ),
        Artifact(
            "sae_sweep",
            ("sae_tinyworld_resid1_sweep",),
            ("tinyworld",),
            f"{_DICT}:build_artifact",
            f"{_DICT}:SAESweepRecipe",
            "the sparsity-fidelity sweep of TopK and standard SAEs (chapter 04)",
            8,
        ),
        Artifact(
            "transcoders",
            _mlp_folders(""),
            ("tinyworld",),
            f"{_DICT}:build_artifact",
            f"{_DICT}:TranscoderRecipe",
            "a transcoder for every MLP (chapter 05)",
            5,
        ),
        Artifact(
            "skip_transcoders",
            _mlp_folders("_skip"),
            ("tinyworld",),
            f"{_DICT}:build_artifact",
            f"{_DICT}:SkipTranscoderRecipe",
            "a skip transcoder for every MLP (chapter 05)",
            5,
        ),
        Artifact(
            "mlp_out_saes",
            _mlp_folders("_sae"),
            ("tinyworld",),
            f"{_DICT}:build_artifact",
            f"{_DICT}:MLPOutSAERecipe",
            "SAE baselines on every MLP's output (chapter 05)",
            5,
        ),
        Artifact(
            "sae_resid3_topk",
            ("sae_tinyworld_resid3_topk",),
            ("tinyworld",),
            "interplab.alignment:build_artifact",
            "interplab.alignment:Resid3SAERecipe",
            "TopK SAE on blocks.3.hook_resid_pre, where DAS looks for the room (chapter 07)",
            2,
        ),
        Artifact(
            "clt_tinyworld",
            ("clt_tinyworld",),
            ("tinyworld",),
            "interplab.dictionaries.clt:build_artifact",
            "interplab.dictionaries.clt:CLTRecipe",
            "a cross-layer transcoder for every MLP (chapter 08)",
            6,
        ),
    ]
}


class ArtifactModelMismatch(RuntimeError):
    """An artifact was trained on other model weights than the bundled ones."""


def _resolve(spec: str):
    module, attr = spec.split(":")
    return getattr(importlib.import_module(module), attr)


def get(name: str) -> Artifact:
    if name not in REGISTRY:
        raise KeyError(f"no artifact called {name!r}; the artifacts are: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def artifact_of_folder(folder: str | Path) -> Artifact | None:
    name = Path(folder).name
    return next((a for a in REGISTRY.values() if name in a.folders), None)


def recipe(name: str):
    """The shipped recipe of artifact ``name``: an instance of its typed config."""
    return _resolve(get(name).config)()


def model_sha256(weights_dir: Path | None = None) -> str:
    """The SHA-256 of the bundled model's weights, as its verified SHA256SUMS lists it."""
    folder = (weights_dir or WEIGHTS_DIR) / MODEL_ARTIFACT
    verify(folder, [MODEL_FILE])
    return read_checksums(folder)[MODEL_FILE]


def _plain(recipe_obj) -> dict:
    if dataclasses.is_dataclass(recipe_obj):
        return dataclasses.asdict(recipe_obj)
    return dict(recipe_obj)


def write_provenance(folder: str | Path, artifact: str, recipe_obj, weights_dir: Path | None = None, **extra) -> Path:
    """Write ``provenance.json`` into ``folder``: the model hash, the recipe and the package version.

    Call it after the artifact's files are written and before `weights.write_checksums`.
    """
    folder = Path(folder)
    record = {
        "artifact": artifact,
        "model_sha256": None if artifact == MODEL_ARTIFACT else model_sha256(weights_dir),
        "recipe": _plain(recipe_obj),
        "interplab_version": __version__,
        "built": time.strftime("%Y-%m-%d %H:%M:%S"),
        "rebuild": f"interplab rebuild --only {artifact}",
        **extra,
    }
    out = folder / PROVENANCE_FILE
    out.write_text(json.dumps(record, indent=2) + "\n")
    return out


def read_provenance(folder: str | Path) -> dict:
    path = Path(folder) / PROVENANCE_FILE
    if not path.is_file():
        raise CorruptedFileError(
            f"{path} is missing, so nothing says which model {Path(folder).name} was trained on. Rebuild it with "
            f"`interplab rebuild --only {_name_for(folder)}`."
        )
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CorruptedFileError(
            f"{path} is not valid JSON ({e.msg} at line {e.lineno}). Rebuild it with "
            f"`interplab rebuild --only {_name_for(folder)}`."
        ) from e
    if not isinstance(record, dict) or "model_sha256" not in record:
        raise CorruptedFileError(
            f"{path} has no model_sha256 entry. Rebuild it with `interplab rebuild --only {_name_for(folder)}`."
        )
    return record


def _name_for(folder: str | Path) -> str:
    a = artifact_of_folder(folder)
    return a.name if a else Path(folder).name


def require_model_match(folder: str | Path, weights_dir: Path | None = None) -> dict:
    """Refuse an artifact trained on other model weights than the bundled ones; return its provenance.

    Raises:
        ArtifactModelMismatch: naming both hashes and the command that rebuilds the artifact.
        CorruptedFileError: the provenance or the model's checksum list is missing or unreadable.
    """
    record = read_provenance(folder)
    if record.get("artifact") == MODEL_ARTIFACT:
        return record
    current = model_sha256(weights_dir)
    if record["model_sha256"] != current:
        name = record.get("artifact") or _name_for(folder)
        raise ArtifactModelMismatch(
            f"{Path(folder).name} was trained on model weights with SHA-256 {record['model_sha256']}, but the "
            f"bundled TinyWorld model's weights have SHA-256 {current}. Its features would not fit this model. "
            f"Rebuild it for this model with `interplab rebuild --only {name}`."
        )
    return record


def order(names: list[str] | None = None) -> list[Artifact]:
    """The artifacts ``names`` (default: all) in dependency order."""
    wanted = list(REGISTRY) if names is None else [get(n).name for n in names]
    done: list[str] = []

    def visit(n: str, path: tuple[str, ...] = ()) -> None:
        if n in path:
            raise ValueError(f"artifact dependencies form a cycle: {' -> '.join(path + (n,))}")
        for d in get(n).depends:
            if d in wanted:
                visit(d, path + (n,))
        if n not in done:
            done.append(n)

    for n in wanted:
        visit(n)
    return [REGISTRY[n] for n in done]


def check(weights_dir: Path | None = None) -> list[tuple[str, str, bool]]:
    """Verify every artifact without training: rows of (artifact, what was found, ok).

    An artifact is fine when each of its folders matches its SHA256SUMS and its provenance
    names the bundled model's weights.
    """
    rows = []
    for art in order():
        problems = []
        for folder in art.paths(weights_dir):
            try:
                verify(folder)
                require_model_match(folder, weights_dir)
            except (CorruptedFileError, ArtifactModelMismatch) as e:
                problems.append(str(e))
        n = len(art.folders)
        rows.append(
            (
                art.name,
                "; ".join(problems)
                if problems
                else f"{n} folder{'s' * (n > 1)} verified, trained on the bundled model",
                not problems,
            )
        )
    return rows


def rebuild(names: list[str] | None = None, progress: bool = True, echo=print) -> list[tuple[str, float]]:
    """Build the artifacts ``names`` (default: all) in dependency order; return (name, seconds) pairs.

    Rebuilding the model does not rebuild what depends on it unless those are named too
    (or ``names`` is None): `check` then reports them as trained on other weights.
    """
    done = []
    plan = order(names)
    for i, art in enumerate(plan, 1):
        echo(f"[{i}/{len(plan)}] {art.name}: {art.about} (about {art.minutes:g} min on 2 CPU cores)")
        t0 = time.perf_counter()
        _resolve(art.build)(art.name, progress=progress)
        for folder in art.paths():
            verify(folder)
            require_model_match(folder)
        done.append((art.name, round(time.perf_counter() - t0, 1)))
        echo(f"    rebuilt {art.name} in {done[-1][1]:.0f} s")
    return done


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="interplab rebuild", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--only", nargs="+", metavar="NAME", help=f"artifacts to rebuild ({', '.join(REGISTRY)})")
    p.add_argument("--check", action="store_true", help="verify checksums and model hashes; train nothing")
    p.add_argument("--list", action="store_true", help="list the artifacts, their dependencies and recipes")
    a = p.parse_args(argv)
    if a.only:
        unknown = [n for n in a.only if n not in REGISTRY]
        if unknown:
            p.error(f"unknown artifacts {unknown}; choose from {list(REGISTRY)}")
    if a.list:
        for art in order():
            deps = ", ".join(art.depends) or "nothing"
            print(f"{art.name:<18} depends on {deps:<10} {art.about}")
        return 0
    if a.check:
        rows = check()
        width = max(len(r[0]) for r in rows)
        for name, what, ok in rows:
            print(f"{'ok ' if ok else 'BAD'} {name:<{width}}  {what}")
        bad = [r[0] for r in rows if not r[2]]
        print(
            "every artifact verified"
            if not bad
            else f"{len(bad)} artifact(s) need attention: interplab rebuild --only {' '.join(bad)}"
        )
        return 0 if not bad else 1
    t0 = time.perf_counter()
    done = rebuild(a.only)
    print("\nrebuilt:")
    for name, secs in done:
        print(f"  {name:<18} {secs:>8.0f} s")
    print(f"  {'total':<18} {time.perf_counter() - t0:>8.0f} s")
    return 0
