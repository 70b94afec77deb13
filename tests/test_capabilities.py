"""The bundled model reaches the capability figures its model card reports."""

import json

import pytest

from interplab.tinyworld.evaluate import TARGETS, evaluate
from interplab.weights import WEIGHTS_DIR

# Targets the bundled model does not reach yet, with the reason (see MODEL_CARD.md, Limitations).
# The xfail is strict: when a retrained model meets the target, the test fails until this entry goes.
KNOWN_GAPS: dict[str, str] = {}


@pytest.fixture(scope="module")
def scores(model):
    return evaluate(model, n=500, seed=1)


@pytest.mark.parametrize("capability", sorted(TARGETS))
def test_bundled_model_meets_target(scores, capability, request):
    if capability in KNOWN_GAPS:
        request.applymarker(pytest.mark.xfail(strict=True, reason=KNOWN_GAPS[capability]))
    assert scores[capability] >= TARGETS[capability], f"{capability} = {scores[capability]} < {TARGETS[capability]}"


def test_room_tracking_is_state_tracking_not_recency(scores):
    """Where the last room mentioned is the wrong answer, the model still answers right."""
    assert scores["room_tracking_not_last"] >= 0.9  # answering "the last room" scores 0 here


def test_model_card_reports_the_evaluated_figures(repo):
    card = (repo / "MODEL_CARD.md").read_text()
    recorded = json.loads((WEIGHTS_DIR / "tinyworld" / "evaluation.json").read_text())
    for capability, value in recorded.items():
        assert f"`{capability}`" in card and f"{value:.3f}" in card, capability
