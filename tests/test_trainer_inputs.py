"""Odd trainer inputs: conditioning options are honoured (strength, timestep range) or refused (area, mask, ...),
lp without a key is refused, and what the input model carried is recorded. Conditioning comes from the host's own
nodes. Each refusal leaves the model as it was, writes no file and starts no iteration."""
import pytest
import torch

from comfyui_concept_erasure.erasure import ErasureError, load_erasure, write_erasure_file
from comfyui_concept_erasure.erasure.concept_erasure import PromptPatch
from comfyui_concept_erasure.trainer import TrainSettings, train_erasure
from comfyui_concept_erasure.trainer import trajectories
from comfyui_concept_erasure.trainer.conditioning import pair_weights, read_prompts
from host_nodes import host_nodes as host_node_classes
from test_trainer import QUICK, conditioning, hooks_of, state_snapshot
from tiny_models import build_model


class HostNodes:
    """ComfyUI's own conditioning nodes. Upstream's `nodes` module needs PyAV, which scripts/test_upstream.sh does
    not install; there the values those nodes set (the same in both hosts) are set with node_helpers."""

    def __init__(self):
        try:
            self.nodes = host_node_classes()
        except ImportError:
            self.nodes = None

    @staticmethod
    def _set(conditioning, values):
        try:
            from comfy.node_helpers import conditioning_set_values
        except ImportError:
            from node_helpers import conditioning_set_values
        return conditioning_set_values(conditioning, values)

    def area(self, c):
        if self.nodes:
            return self.nodes.ConditioningSetArea().append(c, 64, 64, 0, 0, 1.0)[0]
        return self._set(c, {"area": (8, 8, 0, 0), "strength": 1.0, "set_area_to_bounds": False})

    def mask(self, c, mask):
        if self.nodes:
            return self.nodes.ConditioningSetMask().append(c, mask, "default", 1.0)[0]
        return self._set(c, {"mask": mask.unsqueeze(0) if mask.ndim < 3 else mask, "set_area_to_bounds": False,
                             "mask_strength": 1.0})

    def strength(self, c, strength):
        if self.nodes:
            return self.nodes.ConditioningSetAreaStrength().append(c, strength)[0]
        return self._set(c, {"strength": strength})

    def timestep_range(self, c, start, end):
        if self.nodes:
            return self.nodes.ConditioningSetTimestepRange().set_range(c, start, end)[0]
        return self._set(c, {"start_percent": start, "end_percent": end})


def host_nodes():
    return HostNodes()


@pytest.fixture(scope="module")
def sd15():
    return build_model("sd15"), conditioning("sd15", 1), conditioning("sd15", 2)


def train(model, concept, uncond, preserve=None, on_iteration=None, **settings):
    with torch.inference_mode():  # as in a node
        return train_erasure(model, concept, uncond, preserve, TrainSettings(**{**QUICK, **settings}), "",
                             on_iteration)


def refused_untouched(model, models_dir, concept, uncond, preserve=None, **settings):
    """Training is refused before it starts; returns the message. The model and models/ are as before."""
    before, options, started = state_snapshot(model), repr(model.model_options), []
    with pytest.raises(ErasureError) as info:
        train(model, concept, uncond, preserve, on_iteration=started.append, **settings)
    after = model.model.state_dict()
    assert not started and all(torch.equal(before[k], after[k]) for k in before)
    assert repr(model.model_options) == options and not model.patches and hooks_of(model) == 0
    assert not any(p.is_file() for p in models_dir.rglob("*"))
    return str(info.value)


def mask():
    m = torch.zeros(1, 16, 16)
    m[:, :8] = 1.0
    return m


@pytest.mark.parametrize("make,fragment", [
    (lambda n, c: n.area(c), "an area (Conditioning (Set Area))"),
    (lambda n, c: n.mask(c, mask()), "a mask (Conditioning (Set Mask))"),
    (lambda n, c: [[c[0][0], {**c[0][1], "control": object()}]], "a ControlNet"),
    (lambda n, c: [[c[0][0], {**c[0][1], "gligen": ("position", None, [])}]], "GLIGEN"),
    (lambda n, c: [[c[0][0], {**c[0][1], "hooks": object()}]], "conditioning hooks"),
], ids=["area", "mask", "controlnet", "gligen", "hooks"])
def test_conditioning_options_without_a_meaning_for_erasure_are_refused(sd15, models_dir, make, fragment):
    model, concept, uncond = sd15
    message = refused_untouched(model, models_dir, make(host_nodes(), concept), uncond, method="esd_x", iterations=2)
    assert message.startswith("concept has ") and fragment in message and "Remove that node" in message
    combined = concept + make(host_nodes(), conditioning("sd15", 3))
    message = refused_untouched(model, models_dir, concept, uncond, preserve=combined, method="esd_x", iterations=2)
    assert message.startswith("preserve entry 2 has ") and fragment in message


def test_strength_zero_on_every_concept_is_refused(sd15, models_dir):
    model, concept, uncond = sd15
    zero = host_nodes().strength(concept, 0.0)
    message = refused_untouched(model, models_dir, zero, uncond, method="esd_x", iterations=2)
    assert message == "every concept has strength 0: there is nothing to erase"
    both = zero + host_nodes().strength(conditioning("sd15", 3), 0.0)
    refused_untouched(model, models_dir, both, uncond, method="esd_x", iterations=2)


@pytest.mark.parametrize("make,fragment", [
    (lambda n, c: n.strength(c, 0.5), "strength or a timestep range"),
    (lambda n, c: n.timestep_range(c, 0.0, 0.5), "strength or a timestep range"),
    (lambda n, c: [[c[0][0], {"strength": float("nan")}]], "strength must be a number from 0 to inf, got nan"),
], ids=["strength", "range", "nan-strength"])
def test_unconditional_strength_and_range_are_refused(sd15, models_dir, make, fragment):
    model, concept, uncond = sd15
    message = refused_untouched(model, models_dir, concept, make(host_nodes(), uncond), method="esd_x", iterations=2)
    assert message.startswith("unconditional") and fragment in message


def test_a_timestep_range_without_timesteps_is_refused(sd15, models_dir):
    model, concept, uncond = sd15
    backwards = host_nodes().timestep_range(concept, 0.6, 0.4)
    message = refused_untouched(model, models_dir, backwards, uncond, method="esd_x", iterations=2)
    assert "concept has the timestep range 0.6 to 0.4, which holds no timestep" in message


def test_lp_without_a_key_term_is_refused(sd15, models_dir):
    model, concept, uncond = sd15
    message = refused_untouched(model, models_dir, concept, uncond, method="lp", key_weight=0.0, iterations=2)
    assert "key_weight 0 would save its prompt untrained (random) as the key" in message


def test_strength_weights_the_erase_and_key_terms(sd15):
    model, concept, uncond = sd15
    nodes = host_nodes()
    plain = train(model, concept, uncond, method="lp", iterations=1, key_weight=1.0)
    doubled = train(model, nodes.strength(concept, 2.0), uncond, method="lp", iterations=1, key_weight=1.0)
    for term in ("erase", "key"):  # the first iteration sees the same pairs: exactly twice the loss
        assert doubled.losses[term][0] == pytest.approx(2 * plain.losses[term][0], rel=1e-5), term
    assert doubled.erasure.settings["conditioning"] == {"concept": [{"strength": 2.0, "timesteps": None}],
                                                        "preserve": []}
    assert "conditioning" not in plain.erasure.settings

    other = conditioning("sd15", 3)
    alone = train(model, other, uncond, method="esd_x", iterations=3).erasure
    with_zero = train(model, nodes.strength(concept, 0.0) + other, uncond, method="esd_x",
                      iterations=3).erasure
    assert all(torch.equal(alone.deltas[k], with_zero.deltas[k]) for k in alone.deltas)  # strength 0: left out


def test_timestep_range_is_the_training_range(sd15, monkeypatch):
    model, concept, uncond = sd15
    sampling = model.get_model_object("model_sampling")
    ranged = host_nodes().timestep_range(concept, 0.2, 0.6)
    (prompt,) = read_prompts(ranged, "concept", sampling)
    low, high = prompt.timesteps
    sigmas = sampling.sigmas
    assert sigmas[high] <= sampling.percent_to_sigma(0.2) < sigmas[high + 1]
    assert sigmas[low - 1] < sampling.percent_to_sigma(0.6) <= sigmas[low]

    def drawn_sigmas(cond):
        drawn, draw = [], trajectories.TrajectoryPool.draw

        def recording_draw(pool, count, generator):
            x_t, sigma, picked = draw(pool, count, generator)
            drawn.append(sigma)
            return x_t, sigma, picked

        with monkeypatch.context() as patch:
            patch.setattr(trajectories.TrajectoryPool, "draw", recording_draw)
            run = train(model, cond, uncond, method="esd_x", iterations=12, batch_size=4)
        return run, torch.cat(drawn)

    run, drawn = drawn_sigmas(ranged)
    assert drawn.numel() == 48 and (drawn >= sigmas[low]).all() and (drawn <= sigmas[high]).all()
    assert run.erasure.settings["conditioning"]["concept"] == [{"strength": 1.0, "timesteps": [low, high]}]
    _, plain = drawn_sigmas(concept)
    assert ((plain < sigmas[low]) | (plain > sigmas[high])).any()


def test_preserve_strength_and_range_weight_each_pair():
    sampling = build_model("sd15").get_model_object("model_sampling")
    n = host_nodes()
    kept = n.timestep_range(conditioning("sd15", 3), 0.5, 1.0) \
        + n.strength(conditioning("sd15", 4), 3.0)
    first, second = read_prompts(kept, "preserve", sampling)
    all_sigmas = sampling.sigmas.float()
    high = all_sigmas[first.timesteps[1]]
    sigma = torch.stack([high, all_sigmas[-1], high, all_sigmas[-1]])
    weights = pair_weights([first, first, second, second], "cpu", sigma, all_sigmas)
    assert weights.tolist() == [1.0, 0.0, 3.0, 3.0]
    assert pair_weights([first], "cpu") is None and pair_weights([first], "cpu", sigma[:1], all_sigmas) is not None


def test_patches_on_the_input_model_are_recorded_and_round_trip(sd15, tmp_path):
    model, concept, uncond = sd15
    key = "diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight"
    patched = model.clone()
    patched.add_patches({key: (torch.full((64, 768), 0.01),)})
    patched.set_model_attn2_patch(PromptPatch(torch.zeros(1, 768), torch.zeros(1, 768), "mid"))
    patched.model_options["model_function_wrapper"] = lambda apply, args: apply(args["input"], args["timestep"],
                                                                                **args["c"])
    erasure = train(patched, concept, uncond, method="esd_x", iterations=1).erasure
    recorded = erasure.settings["input_model_patches"]
    assert recorded["weight_patches"] == {"weights": 1, "kinds": {"diff": 1}}
    assert recorded["transformer_patches"] == {"attn2_patch": ["PromptPatch"]}
    assert recorded["not_seen_by_training"] == {"model_function_wrapper": [
        "test_patches_on_the_input_model_are_recorded_and_round_trip.<locals>.<lambda>"]}
    write_erasure_file(erasure, str(tmp_path / "e.safetensors"))
    assert load_erasure(str(tmp_path / "e.safetensors")).settings["input_model_patches"] == recorded
    plain = train(model, concept, uncond, method="esd_x", iterations=1).erasure
    assert plain.settings["input_model_patches"] == {}
    assert not torch.equal(plain.deltas[key], erasure.deltas[key])  # training saw the patched model
