"""The bundled model reaches every capability figure its model card reports."""

import json

import pytest

from interplab.tinyworld.evaluate import TARGETS, evaluate
from interplab.weights import WEIGHTS_DIR


@pytest.fixture(scope="module")
def scores(model):
    return evaluate(model, n=500, seed=1)


@pytest.mark.parametrize("capability", sorted(TARGETS))
def test_bundled_model_meets_target(scores, capability):
    assert scores[capability] >= TARGETS[capability], f"{capability} = {scores[capability]} < {TARGETS[capability]}"


def test_model_card_reports_the_evaluated_figures(repo):
    card = (repo / "MODEL_CARD.md").read_text()
    recorded = json.loads((WEIGHTS_DIR / "tinyworld" / "evaluation.json").read_text())
    for capability in TARGETS:
        assert capability in card
        assert f"{recorded[capability]:.3f}" in card or f"{recorded[capability]:.2f}" in card
