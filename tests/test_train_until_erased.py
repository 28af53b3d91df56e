"""Train until erased: the concept score measured while training (score_every), and the stop at stop_at_score."""
import pytest
import torch

from comfyui_concept_erasure.erasure import ErasureError
from comfyui_concept_erasure.erasure.concept_score import ETA, SCORE_LEVELS
from comfyui_concept_erasure.nodes.train_node import TrainConceptErasure
from comfyui_concept_erasure.trainer import TrainSettings, train_erasure
from comfyui_concept_erasure.report import concept_report
from comfyui_concept_erasure.trainer import erasure_score
from tiny_models import CONTEXT_DIM, build_model

FAST = dict(sampling_steps=6, resolution=128, trajectory_refresh=5, rank=0, method="esd_x", learning_rate=3e-4,
            min_score_rise=0.0)  # a fixed rate: the score is measured only where score_every says


def cond(seed):
    return [[torch.randn(1, 77, CONTEXT_DIM["sd15"], generator=torch.Generator().manual_seed(seed)), {}]]


@pytest.fixture(scope="module")
def world():
    return build_model("sd15"), cond(1), cond(2)


def train(world, **settings):
    model, concept, uncond = world
    with torch.inference_mode():
        return train_erasure(model, concept, uncond, None, TrainSettings(**{**FAST, **settings}))


@pytest.fixture(scope="module")
def full_run(world):
    return train(world, iterations=40, score_every=5)


def test_the_score_is_the_reports_and_rises_as_the_concept_is_erased(world, full_run):
    # one definition of the score (erasure/concept_score.py) for the trainer and the report
    assert concept_report.SCORE_LEVELS is SCORE_LEVELS is erasure_score.concept_score.SCORE_LEVELS
    assert concept_report.ETA == ETA == erasure_score.concept_score.ETA
    iterations = [i for i, _ in full_run.scores]
    values = [v for _, v in full_run.scores]
    assert iterations == list(range(5, 41, 5))
    assert values == sorted(values) and values[0] > 0.1 and values[-1] > 0.8, values  # 0 = unchanged
    settings = full_run.erasure.settings
    assert settings["stopped"] == {"iteration": 40, "reason": "iterations"}
    assert settings["concept_scores"] == [[i, round(v, 4)] for i, v in full_run.scores]


def test_training_stops_when_the_score_is_reached_and_equals_a_run_of_that_length(world, full_run):
    threshold = full_run.scores[3][1]
    expected = next(i for i, v in full_run.scores if v >= threshold)  # iteration 20 when the score only rises
    stopped = train(world, iterations=40, score_every=5, stop_at_score=threshold)
    assert stopped.erasure.settings["stopped"]["iteration"] == expected < 40
    assert "stop_at_score" in stopped.erasure.settings["stopped"]["reason"]
    assert len(stopped.losses["erase"]) == expected and stopped.scores == full_run.scores[:expected // 5]
    # Measuring draws nothing from the training's random numbers: the same weights as a run of that length unmeasured.
    plain = train(world, iterations=expected, score_every=0)
    assert plain.scores == [] and plain.erasure.settings["stopped"]["reason"] == "iterations"
    assert all(torch.equal(stopped.erasure.deltas[k], plain.erasure.deltas[k]) for k in plain.erasure.deltas)


def test_a_score_never_reached_runs_every_iteration(world):
    run = train(world, iterations=10, score_every=5, stop_at_score=4.5)
    assert run.erasure.settings["stopped"] == {"iteration": 10, "reason": "iterations"}


@pytest.mark.parametrize("settings, match", [
    (dict(stop_at_score=-0.1), "stop_at_score must be 0"),
    (dict(stop_at_score=0.5, score_every=0), "needs the score measured"),
    (dict(score_every=-1), "score_every must be an integer"),
])
def test_bad_score_settings_are_refused(settings, match):
    with pytest.raises(ErasureError, match=match):
        TrainSettings(**settings).validate()


def test_the_node_draws_the_score_on_the_loss_curves(world):
    model, concept, uncond = world
    node = TrainConceptErasure()
    args = dict(method="esd_x", iterations=10, learning_rate=3e-4, prompt_learning_rate=1e-3, negative_guidance=2.0,
                prompt_tokens=2, placement="mid", erase_weight=1.0, key_weight=0.1, preserve_weight=1.0,
                sampling_steps=4, sampling_cfg=3.0, trajectory_refresh=5, batch_size=1, resolution=128, seed=0,
                rank=0, dtype="auto", min_score_rise=0.0)
    with torch.inference_mode():
        scored = node.train(model, concept, uncond, score_every=5, **args)[2]
        unscored = node.train(model, concept, uncond, score_every=0, **args)[2]
    purple = torch.tensor([150, 60, 170]) / 255.0

    def has_score_line(image):
        return bool(((image[0] - purple).abs().sum(-1) < 0.02).any())

    assert has_score_line(scored) and not has_score_line(unscored)
