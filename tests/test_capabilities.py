"""The bundled model reaches the capability figures its model card reports."""

import json

import pytest

from interplab.tinyworld.evaluate import TARGETS, evaluate
from interplab.weights import WEIGHTS_DIR

# Targets the bundled model does not reach yet, with the reason (see MODEL_CARD.md, Limitations).
# The xfail is strict: when a retrained model meets the target, the test fails until this entry goes.
KNOWN_GAPS = {
    "room_tracking": "the bundled model answers 0.56 of room questions (target 0.90); see MODEL_CARD.md",
}


@pytest.fixture(scope="module")
def scores(model):
    return evaluate(model, n=500, seed=1)


@pytest.mark.parametrize("capability", sorted(TARGETS))
def test_bundled_model_meets_target(scores, capability, request):
    if capability in KNOWN_GAPS:
        request.applymarker(pytest.mark.xfail(strict=True, reason=KNOWN_GAPS[capability]))
    assert scores[capability] >= TARGETS[capability], f"{capability} = {scores[capability]} < {TARGETS[capability]}"


def test_room_tracking_stays_far_above_chance(scores):
    assert scores["room_tracking"] >= 0.5  # chance is 1/8


def test_model_card_reports_the_evaluated_figures(repo):
    card = (repo / "MODEL_CARD.md").read_text()
    recorded = json.loads((WEIGHTS_DIR / "tinyworld" / "evaluation.json").read_text())
    for capability, value in recorded.items():
        assert f"`{capability}`" in card and f"{value:.3f}" in card, capability
