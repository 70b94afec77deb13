"""The training script runs end to end and saves a loadable model."""

import json

import interplab
from interplab.tinyworld.train import train


def test_a_few_training_steps_reduce_the_loss_and_save_a_loadable_model(tmp_path):
    out = tmp_path / "tiny"
    model, info = train(out, tokens=40_000, batch_size=64, quiet=True, log_every=5)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < log[0]["loss"]
    assert info["tokens"] >= 40_000
    loaded = interplab.load_model(str(out), device="cpu")
    assert loaded.cfg.n_layers == 4
