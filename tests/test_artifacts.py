"""The artifact registry: dependency order, verification without training, and model-hash binding."""

from __future__ import annotations

import json
import shutil

import pytest

from interplab import artifacts as A
from interplab.weights import WEIGHTS_DIR, CorruptedFileError, write_checksums


def test_every_shipped_artifact_verifies_and_was_trained_on_the_bundled_model():
    rows = A.check()
    assert {r[0] for r in rows} == set(A.REGISTRY)
    assert all(ok for _, _, ok in rows), [r for r in rows if not r[2]]


def test_every_bundled_folder_belongs_to_an_artifact():
    folders = {p.parent.name for p in WEIGHTS_DIR.glob("*/SHA256SUMS")}
    registered = {f for a in A.REGISTRY.values() for f in a.folders}
    assert folders == registered


def test_dependency_order_puts_the_model_first():
    names = [a.name for a in A.order()]
    assert names[0] == "tinyworld"
    for a in A.order():
        for dep in a.depends:
            assert names.index(dep) < names.index(a.name)
    assert [a.name for a in A.order(["tuned_lens"])] == ["tuned_lens"]  # --only rebuilds only what it names


def test_a_dependency_cycle_is_reported(monkeypatch):
    fake = dict(A.REGISTRY)
    fake["x"] = A.Artifact("x", (), ("y",), "m:f", "m:C")
    fake["y"] = A.Artifact("y", (), ("x",), "m:f", "m:C")
    monkeypatch.setattr(A, "REGISTRY", fake)
    with pytest.raises(ValueError, match="cycle"):
        A.order()


def test_every_recipe_and_builder_resolves():
    for art in A.REGISTRY.values():
        assert callable(A._resolve(art.build)), art.build
        A.recipe(art.name)  # the typed config's defaults are the shipped recipe


@pytest.fixture
def weights_copy(tmp_path):
    """A copy of the model's and the tuned lens's folders, to tamper with."""
    for name in ("tinyworld", "tuned_lens"):
        shutil.copytree(WEIGHTS_DIR / name, tmp_path / name)
    return tmp_path


def test_an_artifact_trained_on_other_weights_is_refused(weights_copy):
    folder = weights_copy / "tuned_lens"
    assert A.require_model_match(folder, weights_copy)["artifact"] == "tuned_lens"
    record = json.loads((folder / A.PROVENANCE_FILE).read_text())
    other = "0" * 64
    record["model_sha256"] = other
    (folder / A.PROVENANCE_FILE).write_text(json.dumps(record))
    write_checksums(folder)
    with pytest.raises(A.ArtifactModelMismatch) as e:
        A.require_model_match(folder, weights_copy)
    msg = str(e.value)
    assert other in msg and A.model_sha256(weights_copy) in msg and "interplab rebuild --only tuned_lens" in msg
    rows = {r[0]: r for r in A.check(weights_copy) if r[0] == "tuned_lens"}
    assert rows["tuned_lens"][2] is False and "interplab rebuild --only tuned_lens" in rows["tuned_lens"][1]


def test_a_missing_or_broken_provenance_is_a_clear_error(weights_copy):
    folder = weights_copy / "tuned_lens"
    (folder / A.PROVENANCE_FILE).write_text("{not json")
    with pytest.raises(CorruptedFileError, match="not valid JSON.*rebuild --only tuned_lens"):
        A.require_model_match(folder, weights_copy)
    (folder / A.PROVENANCE_FILE).unlink()
    with pytest.raises(CorruptedFileError, match="missing.*rebuild --only tuned_lens"):
        A.require_model_match(folder, weights_copy)


def test_provenance_records_hash_recipe_and_version(tmp_path, weights_copy):
    from dataclasses import dataclass

    @dataclass
    class Recipe:
        steps: int = 3

    A.write_provenance(tmp_path, "tuned_lens", Recipe(), weights_dir=weights_copy)
    record = json.loads((tmp_path / A.PROVENANCE_FILE).read_text())
    assert record["model_sha256"] == A.model_sha256(weights_copy)
    assert record["recipe"] == {"steps": 3}
    assert record["interplab_version"]


def test_rebuild_command_check_and_list(capsys):
    from interplab.cli import main

    assert main(["rebuild", "--check"]) == 0
    assert "every artifact verified" in capsys.readouterr().out
    assert main(["rebuild", "--list"]) == 0
    assert "tuned_lens" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["rebuild", "--only", "no_such_artifact"])
