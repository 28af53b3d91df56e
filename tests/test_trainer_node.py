"""The Train Concept Erasure node as ComfyUI calls it: its MODEL is the core Apply path, and the erasure it
returns saves, loads and applies to a fresh model with the same result."""
import dataclasses
import datetime
import json

import torch

import comfyui_concept_erasure
from comfyui_concept_erasure.erasure import PACK_VERSION, apply_erasure
from comfyui_concept_erasure.nodes.erasure_nodes import ApplyConceptErasure, LoadConceptErasure, SaveConceptErasure
from comfyui_concept_erasure.nodes.train_node import TrainConceptErasure
from comfyui_concept_erasure.nodes.types import CATEGORY
from comfyui_concept_erasure.trainer import TrainSettings
from pack_import import widget_defaults
from tiny_models import build_model, predict


def node_inputs(**overrides):
    """Every widget at its declared default, then the overrides (as the server would fill them)."""
    return {**widget_defaults(TrainConceptErasure), **overrides}


def cond(seed):
    return [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(seed)), {}]]


def test_node_is_registered_with_tooltips_and_its_defaults():
    assert comfyui_concept_erasure.NODE_CLASS_MAPPINGS["TrainConceptErasure"] is TrainConceptErasure
    assert comfyui_concept_erasure.NODE_DISPLAY_NAME_MAPPINGS["TrainConceptErasure"] == \
        "Train Concept Erasure (Advanced)"
    assert TrainConceptErasure.CATEGORY == CATEGORY
    spec = TrainConceptErasure.INPUT_TYPES()
    for section in spec.values():
        for name, (_, options) in section.items():
            assert options.get("tooltip"), name
    assert spec["required"]["method"][0] == ["lp", "lp_attached", "esd_x", "esd_u"]
    defaults = node_inputs()
    assert {k: defaults[k] for k in ("method", "iterations", "learning_rate", "negative_guidance", "prompt_tokens",
                                     "placement", "erase_weight", "key_weight", "sampling_steps", "sampling_cfg",
                                     "batch_size", "rank", "dtype", "gradient_checkpointing", "output_strength")} == {
        "method": "lp", "iterations": 1000, "learning_rate": 1e-5, "negative_guidance": 2.0, "prompt_tokens": 10,
        "placement": "mid", "erase_weight": 1.0, "key_weight": 0.1, "sampling_steps": 50, "sampling_cfg": 3.0,
        "batch_size": 1, "rank": 32, "dtype": "auto", "gradient_checkpointing": "auto", "output_strength": 1.0}
    assert "preserve" in spec["optional"]
    # shared workflows store widget values by position: the order of every release so far, new inputs only appended
    assert list(spec["required"]) == [
        "model", "concept", "unconditional", "method", "iterations", "learning_rate", "prompt_learning_rate",
        "negative_guidance", "prompt_tokens", "placement", "erase_weight", "key_weight", "preserve_weight",
        "sampling_steps", "sampling_cfg", "trajectory_refresh", "batch_size", "resolution", "seed", "rank", "dtype",
        "gradient_checkpointing", "concept_label"]
    assert list(spec["optional"]) == [
        "preserve", "adversarial_steps", "adversarial_every", "adversarial_tokens", "adversarial_learning_rate",
        "score_every", "stop_at_score", "min_score_rise", "factor_alpha", "output_strength", "clip", "retain",
        "retain_candidates", "retain_size", "retain_watch", "preserve_images"]
    assert len(TrainConceptErasure.OUTPUT_TOOLTIPS) == len(TrainConceptErasure.RETURN_TYPES) == 3
    # every setting the trainer has is a node input, so the file's settings describe the node's run
    assert {f.name for f in dataclasses.fields(TrainSettings)} <= set(spec["required"]) | set(spec["optional"])
    # settings added later are optional inputs, so workflows saved before them still load
    assert {name for name in spec["optional"] if name.startswith("adversarial_")} == {
        "adversarial_steps", "adversarial_every", "adversarial_tokens", "adversarial_learning_rate"}


def test_trained_erasure_saves_loads_and_applies_to_a_fresh_model_identically(models_dir):
    model = build_model("sd15", seed=0)
    inputs = node_inputs(model=model, concept=cond(1), unconditional=cond(2), iterations=4, sampling_steps=4,
                         resolution=128, learning_rate=1e-4, prompt_tokens=3, concept_label="a red cube\nits shadow",
                         seed=11)
    with torch.inference_mode():
        erased, erasure, curves = TrainConceptErasure().train(**inputs)
        ui = SaveConceptErasure().save(erasure, "concept_erasure/trained", "fp32")["ui"]
        (loaded,) = LoadConceptErasure().load(ui["erasure_files"][0])
        fresh = build_model("sd15", seed=0)
        (reapplied,) = ApplyConceptErasure().apply(fresh, loaded, 1.0)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    context = cond(1)[0][0].expand(2, -1, -1)
    out = predict(erased, x, 2.0, context)
    assert torch.equal(out, predict(apply_erasure(model, erasure), x, 2.0, context))
    assert torch.equal(out, predict(reapplied, x, 2.0, context))
    assert not torch.allclose(out, predict(model, x, 2.0, context), atol=1e-6)
    assert curves.shape == (1, 384, 768, 3)

    for trained in (erasure, loaded):
        assert trained.concepts == ["a red cube", "its shadow"]
        assert trained.method == "lp" and trained.base_model == "SD15" and trained.pack_version == PACK_VERSION
        assert trained.settings["iterations"] == 4 and trained.settings["seed"] == 11
        # every setting, what the run used, and what the input model carried (a plain model: nothing)
        assert set(trained.settings) == {f.name for f in dataclasses.fields(TrainSettings)} | {
            "compute_dtype", "gradient_checkpointing_used", "input_model_patches", "stopped", "concept_scores",
            "learning_rate_used", "learning_rate_raises", "factor_alpha_used", "preserve_prompts"}
        assert trained.settings["compute_dtype"] == "fp32" and trained.settings["gradient_checkpointing_used"] is False
        assert trained.settings["factor_alpha"] == "auto" and trained.settings["factor_alpha_used"] == "fan_in"
        assert trained.settings["stopped"] == {"iteration": 4, "reason": "iterations"}
        assert [i for i, _ in trained.settings["concept_scores"]] == [4]  # the last iteration is always scored
        assert trained.settings["input_model_patches"] == {} and trained.settings["preserve_prompts"] == 0
        created = datetime.datetime.fromisoformat(trained.created)
        assert created.tzinfo is not None and abs(datetime.datetime.now(datetime.timezone.utc) - created).seconds < 600
    json.dumps(loaded.settings)
    assert torch.equal(loaded.prompt_k, erasure.prompt_k)
