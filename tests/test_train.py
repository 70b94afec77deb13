"""The training script runs end to end, its typed recipe is the bundled model's, and the builder writes a complete folder."""

import dataclasses
import inspect
import json
import shutil

import pytest

import interplab
import interplab.weights
from interplab import artifacts
from interplab.tinyworld import train as T
from interplab.weights import verify

TINY = {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_inner": 64, "tokens": 3_000, "batch_size": 16, "eval_docs": 10}


def test_a_few_training_steps_reduce_the_loss_and_save_a_loadable_model(tmp_path):
    out = tmp_path / "tiny"
    _, info = T.train(T.TrainConfig(tokens=40_000, batch_size=64), out, quiet=True, log_every=5)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < log[0]["loss"]
    assert info["tokens"] >= 40_000
    loaded = interplab.load_model(str(out), device="cpu")
    assert loaded.cfg.n_layers == 4


def test_the_configs_defaults_are_the_bundled_models_recipe():
    cfg = T.TrainConfig()
    shipped = json.loads((interplab.weights.WEIGHTS_DIR / "tinyworld" / "training.json").read_text())["phases"][0]
    assert cfg.architecture() == shipped["config"]
    assert (cfg.batch_size, cfg.lr, cfg.seed, cfg.mix) == (
        shipped["batch_size"],
        shipped["lr"],
        shipped["seed"],
        shipped["mix"],
    )
    assert cfg.tokens <= shipped["tokens"] < cfg.tokens + 2_000  # training stops at the first batch past `tokens`
    hf = json.loads((interplab.weights.WEIGHTS_DIR / "tinyworld" / "config.json").read_text())
    assert {k: hf[k] for k in T.ARCHITECTURE_FIELDS} == cfg.architecture()
    assert artifacts.recipe("tinyworld") == cfg
    params = inspect.signature(T.train).parameters  # train() takes the config; no defaults of its own to drift
    assert next(iter(params)) == "config" and not {"tokens", "lr", "batch_size", "mix", "seed"} & set(params)
    with pytest.raises(TypeError, match="unknown training settings"):
        cfg.with_overrides(token=5)


def _check_model_folder(folder, cfg):
    names = {p.name for p in folder.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "training.json",
        "train_log.jsonl",
        "evaluation.json",
        "provenance.json",
        "SHA256SUMS",
    } <= names and "checkpoint" not in names
    assert all(v == "ok" for v in verify(folder).values())
    record = artifacts.require_model_match(folder)
    assert record["artifact"] == "tinyworld" and record["model_sha256"] is None
    assert record["recipe"] == json.loads(json.dumps(dataclasses.asdict(cfg)))
    assert "ioi_top1" in json.loads((folder / "evaluation.json").read_text())
    loaded = interplab.load_model(folder, device="cpu")
    assert (loaded.cfg.n_layers, loaded.cfg.d_model) == (cfg.n_layer, cfg.n_embd)


def test_build_into_writes_a_complete_verified_folder(tmp_path):
    cfg = T.TrainConfig(**TINY)
    summary = T.build_into(tmp_path / "tw", cfg, progress=False)
    assert summary["tokens"] >= cfg.tokens and summary["command"] == "interplab rebuild --only tinyworld"
    _check_model_folder(tmp_path / "tw", cfg)


def test_build_artifact_replaces_the_model_folder_of_the_weights_dir(tmp_path, monkeypatch):
    weights_dir = tmp_path / "weights"
    shutil.copytree(interplab.weights.WEIGHTS_DIR / "tinyworld", weights_dir / "tinyworld")
    monkeypatch.setattr(interplab.weights, "WEIGHTS_DIR", weights_dir)
    monkeypatch.setattr(artifacts, "WEIGHTS_DIR", weights_dir)
    old_hash = artifacts.model_sha256()
    cfg = T.TrainConfig(**TINY)
    T.build_artifact("tinyworld", progress=False, config=cfg)
    _check_model_folder(weights_dir / "tinyworld", cfg)
    assert artifacts.model_sha256() != old_hash
    assert [p.name for p in weights_dir.iterdir()] == ["tinyworld"]  # no staging folder left behind
    with pytest.raises(ValueError, match="tinyworld"):
        T.build_artifact("tuned_lens", progress=False, config=cfg)


def test_the_command_line_trains_a_small_run(tmp_path, capsys):
    out = tmp_path / "cli"
    T.main(["--out", str(out), "--tokens", "2000", "--batch-size", "16", "--no-eval"])
    summary = json.loads((out / "training.json").read_text())
    assert summary["command"].startswith("python -m interplab.tinyworld.train --out")
    assert summary["phases"][0]["batch_size"] == 16 and summary["phases"][0]["tokens"] >= 2000
    assert artifacts.read_provenance(out)["recipe"]["tokens"] == 2000
    assert all(v == "ok" for v in verify(out).values())
    assert "saved to" in capsys.readouterr().out
