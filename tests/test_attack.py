"""The attack on an erasure (Attack Erased Concept) and robust training (adversarial_steps), on tiny real models:
the attack lowers its own loss, recovers a hidden concept, finds nothing where nothing was erased, changes neither
model; robust training is deterministic, recorded, and stops on cancel in its inner and outer loops."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

import comfy.model_management
from comfyui_concept_erasure.erasure import ErasureError, apply_erasure
from comfyui_concept_erasure.nodes.attack_node import AttackConceptErasure
from comfyui_concept_erasure.trainer import attack
from pack_import import widget_defaults
from test_trainer import Probe, conditioning, expect_interrupt, hooks_of, interrupt_after, state_snapshot, train
from tiny_models import build_model

# 16x16 latents, a short schedule: the tests check the mechanics
FAST = dict(iterations=60, learning_rate=1e-2, seed=0, resolution=128, sampling_steps=6)
ROBUST = dict(method="lp", iterations=6, prompt_tokens=2, adversarial_steps=3, adversarial_every=2)


def loaded_weights(model):
    """The weights as `model` loads them (the attack's models share theirs and leave the last one loaded)."""
    comfy.model_management.load_models_gpu([model])
    return state_snapshot(model)


def run_attack(erased, original, concept, uncond, **changes):
    inputs = {**widget_defaults(AttackConceptErasure), **FAST, **changes}
    with torch.inference_mode():  # as in a node
        out = AttackConceptErasure().attack(erased, original, concept, uncond, **inputs)
    return out["result"]


def attack_losses(erased, original, concept, uncond, **changes):
    settings = attack.AttackSettings(**{**FAST, **changes})
    with torch.inference_mode():
        return attack.attack_erasure(erased, original, concept, uncond, settings)


@pytest.fixture(scope="module")
def world():
    with torch.inference_mode():  # weights loaded by a node are inference tensors
        model = build_model("sd15")
    return model, conditioning("sd15", 1), conditioning("sd15", 2)


@pytest.fixture(scope="module")
def hidden(world):
    """An lp erasure whose key brings the concept back (the v3 reading: the concept is hidden, not removed)."""
    model, concept, uncond = world
    erasure = train(model, concept, uncond, method="lp", iterations=30, learning_rate=3e-4, prompt_learning_rate=2e-2,
                    key_weight=1.0, placement="all", prompt_tokens=4).erasure
    return apply_erasure(model, erasure), erasure


def test_attack_lowers_its_loss_and_changes_neither_model(world, hidden):
    model, concept, uncond = world
    erased, _ = hidden
    probe = Probe()
    snapshot = {name: (dict(m.patches), repr(m.model_options), probe.eps(m, concept))
                for name, m in (("original", model), ("erased", erased))}
    weights = loaded_weights(model)
    result = attack_losses(erased, model, concept, uncond)
    print(f"attack loss: before {result.loss_before:.3g}, after {result.loss_after:.3g}")
    assert result.loss_after < 0.7 * result.loss_before
    for name, m in (("original", model), ("erased", erased)):
        patches, options, eps = snapshot[name]
        assert m.patches.keys() == patches.keys() and all(m.patches[k] is patches[k] for k in patches), name
        assert repr(m.model_options) == options and hooks_of(m) == 0, name
        assert torch.equal(probe.eps(m, concept), eps), name
    assert all(torch.equal(weights[k], v) for k, v in loaded_weights(model).items())


def test_attack_recovers_a_hidden_concept_and_finds_nothing_where_nothing_was_erased(world, hidden):
    model, concept, uncond = world
    erased, erasure = hidden
    adversarial, summary = run_attack(erased, model, concept, uncond)
    assert adversarial[0][0].shape == (1, 77 + widget_defaults(AttackConceptErasure)["tokens"], 768)
    assert torch.equal(adversarial[0][0][:, :77], concept[0][0])
    assert "before" in summary and "after" in summary
    probe = Probe(seed=9)  # noisy latents the attack never saw
    wanted = probe.eps(model, concept)
    plain = (probe.eps(erased, concept) - wanted).norm()
    attacked = (probe.eps(erased, adversarial) - wanted).norm()
    keyed = (probe.eps(apply_erasure(model, erasure, attach_prompt=True), concept) - wanted).norm()
    print(f"distance to the original's concept prediction: erased {plain:.4f}, erased + adversarial tokens "
          f"{attacked:.4f}, erased + key {keyed:.4f}")
    assert attacked < 0.85 * plain

    nothing = attack_losses(model, model, concept, uncond)
    print(f"no erasure: loss before {nothing.loss_before:.3g}, after {nothing.loss_after:.3g}")
    assert nothing.loss_before == 0.0
    assert nothing.loss_after < 0.1 * attack_losses(erased, model, concept, uncond, iterations=1).loss_before


def test_attack_is_deterministic_with_its_seed(world, hidden):
    model, concept, uncond = world
    runs = [attack_losses(hidden[0], model, concept, uncond, iterations=5, seed=seed) for seed in (3, 3, 4)]
    assert torch.equal(runs[0].tokens, runs[1].tokens) and runs[0].losses == runs[1].losses
    assert not torch.equal(runs[0].tokens, runs[2].tokens)


@pytest.mark.parametrize("changes,match", [
    (dict(tokens=0), "tokens must be an integer of at least 1"),
    (dict(iterations=0), "iterations"),
    (dict(learning_rate=float("nan")), "learning_rate"),
    (dict(resolution=100), "resolution"),
])
def test_bad_attack_settings_are_refused(world, changes, match):
    model, concept, uncond = world
    with pytest.raises(ErasureError, match=match):
        run_attack(model, model, concept, uncond, **changes)


def test_models_or_conditioning_of_another_family_are_refused(world):
    model, concept, uncond = world
    with pytest.raises(ErasureError, match="SDXL"):
        run_attack(build_model("sdxl"), model, concept, uncond)
    with pytest.raises(ErasureError, match="concept conditioning has width 2048"):
        run_attack(model, model, conditioning("sdxl", 1), uncond)


def test_robust_training_is_deterministic_and_recorded(world):
    model, concept, uncond = world
    runs = [train(model, concept, uncond, **ROBUST, seed=seed) for seed in (5, 5)]
    first, second = (r.erasure for r in runs)
    assert torch.equal(first.prompt_k, second.prompt_k) and torch.equal(first.prompt_v, second.prompt_v)
    assert all(torch.equal(first.deltas[k], second.deltas[k]) for k in first.deltas)
    assert runs[0].losses == runs[1].losses and len(runs[0].losses["erase_adv"]) == ROBUST["iterations"]
    assert first.settings["adversarial_steps"] == 3 and first.settings["adversarial_every"] == 2
    plain = train(model, concept, uncond, **dict(ROBUST, adversarial_steps=0), seed=5)
    assert "erase_adv" not in plain.losses
    assert not all(torch.equal(first.deltas[k], plain.erasure.deltas[k]) for k in first.deltas)


def test_robust_training_holds_its_preserve_set_and_warns_without_one(world, caplog):
    model, concept, uncond = world
    kept = conditioning("sd15", 4)
    kept[0][0] = 0.5 * kept[0][0] + 0.5 * concept[0][0]  # near the concept: robust training erases it too
    probe = Probe()
    original = probe.eps(model, kept)
    robust = dict(ROBUST, iterations=12, learning_rate=3e-4)
    with caplog.at_level("WARNING"):
        bare = train(model, concept, uncond, **robust)
    assert any("adversarial_steps without a preserve conditioning" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING"):
        held = train(model, concept, uncond, preserve=kept, **robust, preserve_weight=10.0)
    assert not any("preserve" in r.getMessage() for r in caplog.records)
    assert len(held.losses["preserve"]) == len(held.losses["erase_adv"]) == robust["iterations"]
    drift = {name: (probe.eps(apply_erasure(model, run.erasure), kept) - original).norm().item()
             for name, run in (("bare", bare), ("held", held))}
    print(f"preserved concept's prediction moved {drift}")
    assert drift["held"] < 0.6 * drift["bare"]


def test_robust_training_trains_rank_factors_by_default_and_warns_with_fan_in(world, caplog):
    """factor_alpha auto: rank factors (alpha = rank) with adversarial_steps, fan_in factors without; fan_in chosen
    for robust training is warned about."""
    model, concept, uncond = world
    kept = conditioning("sd15", 4)
    for changes, used, warned in ((dict(), "rank", False), (dict(factor_alpha="fan_in"), "fan_in", True),
                                  (dict(factor_alpha="rank"), "rank", False),
                                  (dict(adversarial_steps=0), "fan_in", False),
                                  (dict(factor_alpha="fan_in", adversarial_steps=0), "fan_in", False),
                                  (dict(factor_alpha="fan_in", rank=0), "fan_in", False)):  # full deltas: no alpha
        caplog.clear()
        with caplog.at_level("WARNING"):
            run = train(model, concept, uncond, preserve=kept, **{**ROBUST, "iterations": 2, "rank": 4, **changes})
        assert any("Set factor_alpha to auto" in r.getMessage() for r in caplog.records) == warned, changes
        assert run.erasure.settings["factor_alpha_used"] == used, changes
        for delta in run.erasure.deltas.values():
            if changes.get("rank", 4):
                assert delta.alpha == (4 if used == "rank" else delta.down[0].numel()), changes


def test_robust_training_below_full_output_strength_is_warned_about(world, caplog):
    """Robust training resisted the attack on the benchmark with all of its deltas saved and less at 0.7, so robust
    runs that save less than 1 are warned about, plain runs are not."""
    model, concept, uncond = world
    kept = conditioning("sd15", 4)
    for changes, warned in ((dict(output_strength=0.7), True), (dict(output_strength=1.0), False),
                            (dict(output_strength=0.7, adversarial_steps=0), False)):
        caplog.clear()
        with caplog.at_level("WARNING"):
            run = train(model, concept, uncond, preserve=kept, **{**ROBUST, "iterations": 2, **changes})
        assert any("Set output_strength to 1 for robust training" in r.getMessage()
                   for r in caplog.records) == warned, changes
        assert run.erasure.settings["output_strength"] == changes["output_strength"], changes


def test_cancel_stops_the_inner_attack_and_the_outer_loop(world, monkeypatch):
    model, concept, uncond = world
    before = loaded_weights(model)
    steps, seen = [], []
    real_step = attack.Adversary.step

    def step_then_cancel(self, predict, x_t, *args, **kwargs):
        if not isinstance(x_t, FakeTensor):  # the memory plan's shape-only iteration runs the steps too
            steps.append(1)
            if len(steps) == 2:  # cancel in the first inner loop, before its third step
                comfy.model_management.interrupt_current_processing(True)
        return real_step(self, predict, x_t, *args, **kwargs)

    monkeypatch.setattr(attack.Adversary, "step", step_then_cancel)
    expect_interrupt(lambda: train(model, concept, uncond, **dict(ROBUST, adversarial_steps=5),
                                   on_iteration=seen.append))
    assert len(steps) == 2 and seen == []
    assert hooks_of(model) == 0 and all(torch.equal(before[k], v) for k, v in model.model.state_dict().items())

    monkeypatch.setattr(attack.Adversary, "step", real_step)
    expect_interrupt(lambda: train(model, concept, uncond, **dict(ROBUST, iterations=20),
                                   on_iteration=interrupt_after(3, seen)))
    assert seen == [1, 2, 3]


def test_cancel_stops_the_attack(world, hidden):
    model, concept, uncond = world
    seen = []
    expect_interrupt(lambda: attack.attack_erasure(hidden[0], model, concept, uncond,
                                                   attack.AttackSettings(**FAST), interrupt_after(2, seen)))
    assert seen == [1, 2]


def test_robust_training_settings_are_checked(world):
    model, concept, uncond = world
    for changes, match in ((dict(adversarial_steps=-1), "adversarial_steps"),
                           (dict(adversarial_every=0), "adversarial_every"),
                           (dict(adversarial_learning_rate=0.0), "adversarial_learning_rate")):
        with pytest.raises(ErasureError, match=match):
            train(model, concept, uncond, **dict(ROBUST, **changes))
