"""The learning rate raised until the concept score moves (min_score_rise, trainer/learning_rate.py)."""
import math

import pytest
import torch

from comfyui_concept_erasure.erasure import ErasureError
from comfyui_concept_erasure.trainer import TrainSettings, train_erasure
from comfyui_concept_erasure.trainer.deltas import DeltaSet
from comfyui_concept_erasure.trainer.learning_rate import MAX_FACTOR, WINDOW, RateRaise
from tiny_models import CONTEXT_DIM, build_model

FAST = dict(sampling_steps=6, resolution=128, trajectory_refresh=5, rank=32, method="esd_x", learning_rate=1e-6,
            score_every=0, factor_alpha="rank")  # alpha rank: 1e-6 is far too small for this tiny model


def raise_with(scores, min_rise=0.2, lr=1e-5):
    group = {"lr": lr}
    rate = RateRaise(group, min_rise)
    for n, score in enumerate(scores, 1):
        assert rate.due(n * WINDOW)
        rate.update(n * WINDOW, score)
    return rate, group


def test_the_rate_doubles_while_the_score_rises_too_slowly_then_stays():
    # rises per 100 iterations: 0.1, then 0.1, then 0.3 (fast enough)
    rate, group = raise_with([0.01, 0.02, 0.05])
    assert group["lr"] == 4e-5 and not rate.due(4 * WINDOW) and not rate.active
    assert rate.record() == {"learning_rate_used": 4e-5, "learning_rate_raises": [[10, 2e-5], [20, 4e-5]]}


def test_a_falling_score_raises_the_rate_and_the_raise_stops_at_its_cap():
    doublings = round(math.log2(MAX_FACTOR))
    rate, group = raise_with([-0.01] + [0.0] * (doublings - 1), lr=1e-5)
    assert group["lr"] == pytest.approx(1e-5 * MAX_FACTOR) and rate.active
    rate.update(WINDOW * (doublings + 1), 0.0)  # one more slow window: already at the cap, no further doubling
    assert group["lr"] == pytest.approx(1e-5 * MAX_FACTOR) and not rate.active
    assert len(rate.record()["learning_rate_raises"]) == doublings


def test_zero_keeps_the_learning_rate_fixed():
    rate = RateRaise({"lr": 1e-5}, 0.0)
    assert not rate.due(WINDOW) and rate.record() == {"learning_rate_used": 1e-5, "learning_rate_raises": []}
    with pytest.raises(ErasureError, match="min_score_rise must be 0"):
        TrainSettings(min_score_rise=-0.1).validate()


@pytest.fixture(scope="module")
def world():
    def cond(seed):
        return [[torch.randn(1, 77, CONTEXT_DIM["sd15"], generator=torch.Generator().manual_seed(seed)), {}]]
    return build_model("sd15"), cond(1), cond(2)


def train(world, **settings):
    model, concept, uncond = world
    with torch.inference_mode():
        return train_erasure(model, concept, uncond, None, TrainSettings(**{**FAST, **settings}))


def test_a_rate_too_small_for_the_model_is_raised_until_the_concept_score_moves(world):
    fixed = train(world, iterations=60, min_score_rise=0.0, score_every=60)
    raised = train(world, iterations=60, min_score_rise=0.2)
    settings = raised.erasure.settings
    raises = settings["learning_rate_raises"]
    assert raises and [i for i, _ in raises] == list(range(10, 10 * len(raises) + 1, 10))
    assert [lr for _, lr in raises] == [1e-6 * 2 ** n for n in range(1, len(raises) + 1)]
    assert settings["learning_rate_used"] == raises[-1][1] and settings["learning_rate"] == 1e-6
    assert [i for i, _ in raised.scores][:len(raises)] == [i for i, _ in raises]  # measured where it was raised
    # the raised rate moves the score many times as far as the fixed one in the same iterations
    assert raised.scores[-1][1] > 5 * fixed.scores[-1][1] > 0, (fixed.scores, raised.scores)
    assert fixed.erasure.settings["learning_rate_used"] == 1e-6 and fixed.erasure.settings["learning_rate_raises"] == []


def test_other_groups_are_held_still_until_the_rate_is_fixed_then_get_their_rate_back():
    prompt = {"lr": 1e-3}
    rate = RateRaise({"lr": 1e-5}, 0.2, [prompt])
    assert prompt["lr"] == 0.0
    rate.update(WINDOW, 0.001)  # too slow: doubled, the prompt still held
    assert prompt["lr"] == 0.0 and rate.active
    rate.update(2 * WINDOW, 0.5)  # fast enough: the rate is fixed and the prompt learns at its own rate
    assert prompt["lr"] == 1e-3 and not rate.active
    fixed_prompt = {"lr": 1e-3}
    RateRaise({"lr": 1e-5}, 0.0, [fixed_prompt])
    assert fixed_prompt["lr"] == 1e-3  # min_score_rise 0: nothing is held


def test_lp_prompt_does_not_move_while_the_rate_is_raised(world, monkeypatch):
    from comfyui_concept_erasure.trainer import erasure_loop

    start = {}
    original_build = erasure_loop.build_trainables

    def build(*args, **kwargs):
        parts = original_build(*args, **kwargs)
        start["prompt_k"] = parts.prompt.prompt_k.detach().float().cpu().clone()
        return parts

    monkeypatch.setattr(erasure_loop, "build_trainables", build)
    held = train(world, method="lp", iterations=WINDOW, min_score_rise=100.0)  # never fast enough in 10
    assert held.erasure.settings["learning_rate_raises"]  # still raising when it ended
    assert torch.equal(held.erasure.prompt_k, start["prompt_k"])
    moved = train(world, method="lp", iterations=WINDOW, min_score_rise=0.0)  # same seed, same first prompt
    assert not torch.equal(moved.erasure.prompt_k, start["prompt_k"])


def one_adam_step(rank, factor_alpha, fan_in=768, fan_out=320):
    """How far one Adam step (lr 1e-3) on the layer's deltas moves its output, and the deltas it exports."""
    layer = torch.nn.Linear(fan_in, fan_out, bias=False)
    deltas = DeltaSet({"w": layer}, rank, torch.Generator().manual_seed(0), "cpu", factor_alpha)
    x = torch.randn(4, fan_in, generator=torch.Generator().manual_seed(1))
    direction = torch.randn(4, fan_out, generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.Adam(deltas.parameters(), lr=1e-3)
    with deltas.attached(), deltas.switched(True):
        before = layer(x).detach()
        (layer(x) * direction).sum().backward()
        optimizer.step()
        after = layer(x).detach()
    return (after - before).norm() / before.norm(), deltas.export()["w"], layer, x, after


def test_fan_in_factors_step_like_full_deltas_and_export_what_they_trained():
    full, *_ = one_adam_step(0, "rank")
    by_rank, *_ = one_adam_step(32, "rank")
    by_fan_in, exported, layer, x, trained = one_adam_step(32, "fan_in")
    # alpha = rank: a step moves the output by about rank / fan_in (32 / 768) of a full delta's step
    assert by_rank < 0.1 * full, (by_rank, full)
    assert 0.5 * full < by_fan_in < 2 * full, (by_fan_in, full)
    # the file holds alpha = fan_in, and its delta reproduces what was trained
    assert exported.alpha == 768.0 and exported.rank == 32
    with torch.no_grad():
        torch.testing.assert_close(x @ (layer.weight + exported.full()).T, trained, rtol=1e-4, atol=1e-5)
    with pytest.raises(ErasureError, match="factor_alpha must be one of auto, rank, fan_in"):
        TrainSettings(factor_alpha="sqrt").validate()
