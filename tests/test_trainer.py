"""Training on tiny real models: the erasure moves the concept toward the ESD target, spares the rest, keeps the
key, leaves the input model alone, is deterministic, and stops cleanly (NaN, interrupt, wrong inputs)."""
import pytest
import torch

import comfy.model_management
from comfyui_concept_erasure.erasure import ErasureError, LowRankDelta, apply_erasure
from comfyui_concept_erasure.erasure.concept_erasure import cross_attention_layers
from comfyui_concept_erasure.trainer import TrainingError, TrainSettings, train_erasure
from tiny_models import CONTEXT_DIM, build_model, predict

# 16x16 latents; full deltas (ESD's setting) unless a test says otherwise: these tests check the mechanics
QUICK = dict(sampling_steps=6, resolution=128, trajectory_refresh=5, rank=0)
SIGMAS = (14.6, 5.0, 1.0, 0.3)


def text(family, seed, tokens=77):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, tokens, CONTEXT_DIM[family], generator=g)


def conditioning(family, seed):
    """CLIP Text Encode's output shape: [[context, {"pooled_output": ...}]] (pooled only matters for SDXL)."""
    options = {"pooled_output": torch.randn(1, 1280, generator=torch.Generator().manual_seed(seed + 100))}
    return [[text(family, seed), options if family == "sdxl" else {}]]


class Probe:
    """eps predictions of a model on fixed noisy latents, for one conditioning."""

    def __init__(self, family="sd15", seed=5):
        g = torch.Generator().manual_seed(seed)
        self.family = family
        self.points = [(torch.randn(4, 4, 16, 16, generator=g) * s, s) for s in SIGMAS]

    def extra(self, cond, batch):
        if self.family != "sdxl":
            return {}
        base = self.model_for_adm
        y = base.encode_adm(pooled_output=cond[0][1]["pooled_output"], width=128, height=128)
        return {"y": y.expand(batch, -1)}

    def eps(self, model, cond):
        self.model_for_adm = model.model
        outs = []
        for x, s in self.points:
            context = cond[0][0].expand(x.shape[0], -1, -1)
            outs.append((x - predict(model, x, s, context, **self.extra(cond, x.shape[0]))) / s)
        return torch.cat(outs)


def esd_numbers(model, erasure, concept, uncond, probe, eta=1.0):
    """Relative error of the erased model to the ESD target (1.0 before training) and related distances."""
    e0, ep = probe.eps(model, uncond), probe.eps(model, concept)
    target = e0 - eta * (ep - e0)
    erased = probe.eps(apply_erasure(model, erasure), concept)
    return {"relative_error": ((erased - target).norm() / (ep - target).norm()).item(),
            "concept_moved": (erased - ep).norm().item(), "ep": ep, "erased": erased}


def train(model, concept, uncond, preserve=None, label="", on_iteration=None, **settings):
    with torch.inference_mode():  # as in a node
        return train_erasure(model, concept, uncond, preserve, TrainSettings(**{**QUICK, **settings}), label,
                             on_iteration)


@pytest.fixture(scope="module")
def sd15():
    return build_model("sd15"), conditioning("sd15", 1), conditioning("sd15", 2)


@pytest.fixture(scope="module")
def lp_run(sd15):
    model, concept, uncond = sd15
    return train(model, concept, uncond, method="lp", iterations=30, learning_rate=3e-4, prompt_learning_rate=2e-2,
                 key_weight=1.0, placement="all", prompt_tokens=4)


def test_lp_moves_concept_to_esd_target_and_spares_an_unrelated_prompt(sd15, lp_run):
    model, concept, uncond = sd15
    probe = Probe()
    numbers = esd_numbers(model, lp_run.erasure, concept, uncond, probe)
    unrelated = conditioning("sd15", 3)
    unrelated_moved = (probe.eps(apply_erasure(model, lp_run.erasure), unrelated) - probe.eps(model, unrelated)).norm()
    ratio = numbers["concept_moved"] / unrelated_moved.item()
    print(f"relative error to the ESD target: before 1.000, after {numbers['relative_error']:.3f}; "
          f"concept moved {ratio:.1f}x more than an unrelated prompt")
    assert numbers["relative_error"] < 0.8
    assert ratio > 4


def test_default_low_rank_deltas_move_the_concept_to_the_esd_target_too(sd15):
    """The node's default trains rank-32 LoRA factors (kohya convention, alpha = each layer's fan_in: factor_alpha
    auto without adversarial_steps), not full deltas."""
    model, concept, uncond = sd15
    run = train(model, concept, uncond, method="lp", rank=TrainSettings().rank, iterations=60, learning_rate=3e-4,
                prompt_learning_rate=2e-2, key_weight=1.0, placement="all", prompt_tokens=4, min_score_rise=0.0)
    assert TrainSettings().rank == 32 and TrainSettings().factor_alpha == "auto"
    assert run.erasure.settings["factor_alpha_used"] == "fan_in"
    assert all(isinstance(d, LowRankDelta) and d.rank == 32 and d.alpha == d.down[0].numel()
               for d in run.erasure.deltas.values())
    numbers = esd_numbers(model, run.erasure, concept, uncond, Probe())
    print(f"rank 32: relative error to the ESD target {numbers['relative_error']:.3f}")
    assert numbers["relative_error"] < 0.8


def test_lp_output_shape_and_key_prompt_brings_the_concept_back(sd15, lp_run):
    model, concept, uncond = sd15
    erasure = lp_run.erasure
    assert erasure.prompt_k.shape == (4, 768) and erasure.prompt_v.shape == (4, 768)
    assert erasure.method == "lp" and not erasure.prompt_at_inference and erasure.placement == "all"
    assert set(lp_run.losses) == {"erase", "key"} and len(lp_run.losses["erase"]) == 30
    probe = Probe()
    ep = probe.eps(model, concept)
    without_key = (probe.eps(apply_erasure(model, erasure), concept) - ep).norm()
    with_key = (probe.eps(apply_erasure(model, erasure, attach_prompt=True), concept) - ep).norm()
    print(f"distance to the original concept prediction: erased {without_key:.4f}, erased + key {with_key:.4f}")
    assert with_key < 0.85 * without_key


def test_esd_x_changes_only_cross_attention_weights(sd15):
    model, concept, uncond = sd15
    run = train(model, concept, uncond, method="esd_x", iterations=3)
    erasure = run.erasure
    expected = {f"{layer}.{p}.weight" for layer in cross_attention_layers(model)
                for p in ("to_q", "to_k", "to_v", "to_out.0")}
    assert set(erasure.deltas) == expected
    assert not erasure.has_prompt and erasure.method == "esd_x"
    assert all(torch.is_tensor(d) and d.abs().sum() > 0 for d in erasure.deltas.values())


def test_esd_u_trains_low_rank_factors_outside_cross_attention(sd15):
    model, concept, uncond = sd15
    erasure = train(model, concept, uncond, method="esd_u", iterations=3, rank=2, learning_rate=1e-3).erasure
    keys = set(erasure.deltas)
    assert keys and not any(".attn2." in k for k in keys)
    assert not any(k.startswith(("diffusion_model.time_embed.", "diffusion_model.out.")) for k in keys)
    assert "diffusion_model.input_blocks.0.0.weight" in keys  # a conv
    assert "diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q.weight" in keys  # a linear
    state = model.model.state_dict()
    for key, delta in erasure.deltas.items():
        assert isinstance(delta, LowRankDelta) and delta.rank == 2 and tuple(delta.shape) == tuple(state[key].shape)
    assert sum(d.up.abs().sum() for d in erasure.deltas.values()) > 0


def test_esd_u_without_rank_is_refused(sd15):
    model, concept, uncond = sd15
    with pytest.raises(ErasureError, match="rank > 0"):
        train(model, concept, uncond, method="esd_u", iterations=1)


def test_lp_attached_keeps_the_prompt_at_inference(sd15):
    model, concept, uncond = sd15
    erasure = train(model, concept, uncond, method="lp_attached", iterations=4, prompt_tokens=3).erasure
    assert erasure.prompt_at_inference and erasure.prompt_k.shape == (3, 768)
    probe = Probe()
    deltas_only = erasure.replace(prompt_at_inference=False)
    assert not torch.equal(probe.eps(apply_erasure(model, erasure), concept),
                           probe.eps(apply_erasure(model, deltas_only), concept))


@pytest.mark.parametrize("family", ["sd2v", "sdxl"])
def test_other_families_train_toward_the_esd_target(family):
    model = build_model(family)
    concept, uncond = conditioning(family, 1), conditioning(family, 2)
    run = train(model, concept, uncond, method="esd_x", iterations=20, learning_rate=1e-4, batch_size=2)
    numbers = esd_numbers(model, run.erasure, concept, uncond, Probe(family))
    print(f"{family}: relative error to the ESD target after training {numbers['relative_error']:.3f}")
    assert numbers["relative_error"] < 0.85
    assert run.erasure.base_model == type(model.model.model_config).__name__


def test_preserve_term_holds_the_preserved_prompt(sd15):
    model, concept, uncond = sd15
    kept = conditioning("sd15", 4)
    kept[0][0] = 0.5 * kept[0][0] + 0.5 * concept[0][0]  # related to the concept, so erasing it moves this too
    probe = Probe()
    original = probe.eps(model, kept)
    moved = {}
    for weight in (0.0, 10.0):
        run = train(model, concept, uncond, preserve=kept, method="esd_x", iterations=15, learning_rate=3e-4,
                    preserve_weight=weight)
        assert ("preserve" in run.losses) == (weight > 0)
        assert run.erasure.settings["preserve_prompts"] == (1 if weight > 0 else 0)  # the file says what was held
        moved[weight] = (probe.eps(apply_erasure(model, run.erasure), kept) - original).norm().item()
    print(f"preserved prompt moved {moved[0.0]:.4f} without the term, {moved[10.0]:.4f} with it")
    assert moved[10.0] < 0.7 * moved[0.0]


def state_snapshot(model):
    return {k: v.detach().clone() for k, v in model.model.state_dict().items()}


def hooks_of(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.model.modules())


def test_training_leaves_the_input_model_unchanged():
    with torch.inference_mode():  # weights loaded by a node are inference tensors
        model = build_model("sd15")
    concept, uncond = conditioning("sd15", 1), conditioning("sd15", 2)
    probe = Probe()
    before, options, eps_before = state_snapshot(model), repr(model.model_options), probe.eps(model, concept)
    train(model, concept, uncond, method="lp", iterations=3, preserve=conditioning("sd15", 3))
    after = model.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert repr(model.model_options) == options and not model.patches and hooks_of(model) == 0
    assert torch.equal(probe.eps(model, concept), eps_before)


def test_same_seed_gives_a_bit_identical_erasure(sd15):
    model, concept, uncond = sd15
    runs = [train(model, concept, uncond, method="lp", iterations=4, seed=seed, prompt_tokens=2).erasure
            for seed in (7, 7, 8)]
    same, other = runs[0], runs[1]
    assert torch.equal(same.prompt_k, other.prompt_k) and torch.equal(same.prompt_v, other.prompt_v)
    assert all(torch.equal(same.deltas[k], other.deltas[k]) for k in same.deltas)
    assert not torch.equal(same.prompt_k, runs[2].prompt_k)
    assert not all(torch.equal(same.deltas[k], runs[2].deltas[k]) for k in same.deltas)


def test_nan_loss_stops_with_the_iteration_and_term(sd15):
    model, concept, uncond = sd15
    before = state_snapshot(model)
    with pytest.raises(TrainingError, match=r"the erase loss is (nan|inf) at iteration [23] of 5"):
        train(model, concept, uncond, method="esd_x", iterations=5, learning_rate=1e30, trajectory_refresh=1)
    assert hooks_of(model) == 0 and all(torch.equal(before[k], v) for k, v in model.model.state_dict().items())


def interrupt_after(iteration: int, seen: list):
    """An on_iteration callback that records each iteration and presses cancel after `iteration`."""
    def on_iteration(n):
        seen.append(n)
        if n == iteration:
            comfy.model_management.interrupt_current_processing(True)
    return on_iteration


def expect_interrupt(run) -> None:
    """run() must stop with ComfyUI's InterruptProcessingException; the cancel flag is cleared afterwards."""
    try:
        with pytest.raises(Exception) as info:
            run()
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert type(info.value).__name__ == "InterruptProcessingException"


def test_interrupt_stops_training_and_leaves_the_model_unchanged(sd15, models_dir):
    model, concept, uncond = sd15
    before = state_snapshot(model)
    seen = []
    expect_interrupt(lambda: train(model, concept, uncond, method="lp", iterations=50,
                                   on_iteration=interrupt_after(2, seen)))
    assert seen == [1, 2]
    assert hooks_of(model) == 0 and all(torch.equal(before[k], v) for k, v in model.model.state_dict().items())
    assert not any(p.is_file() for p in models_dir.rglob("*"))


@pytest.mark.parametrize("which", ["concept", "unconditional", "preserve"])
def test_conditioning_from_another_family_is_refused_before_training(sd15, which):
    model, concept, uncond = sd15
    inputs = {"concept": concept, "unconditional": uncond, "preserve": conditioning("sd15", 3)}
    inputs[which] = conditioning("sdxl", 9)
    started = []
    with pytest.raises(ErasureError) as info:
        train(model, inputs["concept"], inputs["unconditional"], inputs["preserve"], method="lp", iterations=2,
              on_iteration=started.append)
    message = str(info.value)
    assert which in message and "2048" in message and "768" in message and "SDXL" in message and "SD1.x" in message
    assert not started


@pytest.mark.parametrize("settings,match", [
    (dict(method="esd_z"), "method must be one of"),
    (dict(placement="top"), "placement must be one of"),
    (dict(rank=-1), "rank must be an integer of at least 0"),
    (dict(iterations=0), "iterations"),
    (dict(dtype="fp8"), "dtype must be one of"),
    (dict(learning_rate=float("nan")), "learning_rate"),
    (dict(erase_weight=0.0, method="esd_x"), "nothing would be trained"),
])
def test_bad_settings_are_refused(sd15, settings, match):
    model, concept, uncond = sd15
    with pytest.raises(ErasureError, match=match):
        train(model, concept, uncond, **settings)


@pytest.mark.parametrize("rank", [0, 4])
def test_output_strength_scales_what_is_saved_not_what_is_trained(sd15, rank):
    """The same run at output_strength 0.6 saves 0.6 x the deltas of the run at 1 (factors: the up factor, alpha kept),
    with the same prompt and loss history, and records the strength."""
    model, concept, uncond = sd15
    runs = [train(model, concept, uncond, method="lp", iterations=3, rank=rank, prompt_tokens=2, learning_rate=1e-3,
                  min_score_rise=0.0, output_strength=strength) for strength in (1.0, 0.6)]
    whole, scaled = (r.erasure for r in runs)
    assert runs[0].losses == runs[1].losses and torch.equal(whole.prompt_k, scaled.prompt_k)
    assert whole.deltas.keys() == scaled.deltas.keys()
    for key, delta in whole.deltas.items():
        if rank:
            assert scaled.deltas[key].alpha == delta.alpha and torch.equal(scaled.deltas[key].down, delta.down)
            delta, other = delta.full(), scaled.deltas[key].full()
        else:
            other = scaled.deltas[key]
        assert delta.abs().max() > 0
        torch.testing.assert_close(other, 0.6 * delta)
    assert (whole.settings["output_strength"], scaled.settings["output_strength"]) == (1.0, 0.6)


@pytest.mark.parametrize("value", [0.0, -0.5, 2.5, float("nan")])
def test_output_strength_outside_its_range_is_refused(value):
    with pytest.raises(ErasureError, match="output_strength must be"):
        TrainSettings(output_strength=value).validate()
