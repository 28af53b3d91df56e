"""Save Concept Erasure as LoRA and Concept Erasure from Weights, called as ComfyUI calls them."""
import pickle

import pytest
import torch

import comfyui_concept_erasure
from comfyui_concept_erasure.erasure import ErasureError, apply_erasure, write_erasure_file
from comfyui_concept_erasure.erasure.folders import FOLDER, list_weight_files, resolve_weight_file
from comfyui_concept_erasure.nodes.lora_nodes import LoadConceptErasureFromWeights, SaveConceptErasureAsLoRA
from comfyui_concept_erasure.nodes.types import CATEGORY
from lora_helpers import attn2_erasure, host_lora_loader, load_with_host, noise_prediction
from tiny_models import build_model

NODES = {"SaveConceptErasureAsLoRA": "Save Concept Erasure as LoRA",
         "LoadConceptErasureFromWeights": "Concept Erasure from Weights"}


def test_registered_once_with_tooltips_on_every_input():
    for node_id, display in NODES.items():
        cls = comfyui_concept_erasure.NODE_CLASS_MAPPINGS[node_id]
        assert comfyui_concept_erasure.NODE_DISPLAY_NAME_MAPPINGS[node_id] == display
        assert cls.CATEGORY == CATEGORY and len(cls.DESCRIPTION) > 80
        inputs = cls.INPUT_TYPES()
        for name, spec in {**inputs["required"], **inputs.get("optional", {})}.items():
            assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"


def save(erasure, model=None, fmt="exact", rank=32, prefix="concept_erasure/erased"):
    with torch.inference_mode():
        return SaveConceptErasureAsLoRA().save(erasure, prefix, fmt, rank, model)["ui"]


def test_save_numbers_files_in_models_loras_and_the_host_loader_lists_them_at_once(loras_dir):
    model = build_model("sd15")
    erasure = attn2_erasure("sd15", model)
    assert host_lora_loader().INPUT_TYPES()["required"]["lora_name"][0] == []
    first, second = save(erasure, model), save(erasure, model, "lora", 4)
    assert first["lora_files"] == ["concept_erasure/erased_00001_.safetensors"]
    assert second["lora_files"] == ["concept_erasure/erased_00002_.safetensors"]
    assert first["max_relative_error"] == [0.0] and 0 < second["max_relative_error"][0] < 1
    assert sorted(p.name for p in (loras_dir / "concept_erasure").iterdir()) == [
        "erased_00001_.safetensors", "erased_00002_.safetensors"]
    listed = host_lora_loader().INPUT_TYPES()["required"]["lora_name"][0]
    assert listed == ["concept_erasure/erased_00001_.safetensors", "concept_erasure/erased_00002_.safetensors"]
    expected = noise_prediction(apply_erasure(model, erasure), "sd15")
    got = noise_prediction(load_with_host(model, listed[0]), "sd15")
    assert (got - expected).abs().max().item() <= 1e-5


def test_a_refused_export_writes_nothing(loras_dir):
    model = build_model("sd15")
    with pytest.raises(ErasureError, match="lp_attached"):
        save(attn2_erasure("sd15", model, prompt_at_inference=True, method="lp_attached"), model)
    with pytest.raises(ErasureError, match=r"inside models/loras"):
        save(attn2_erasure("sd15", model), model, prefix="../outside")
    assert not loras_dir.exists() or not any(loras_dir.rglob("*"))


def test_weights_are_listed_from_both_folders_and_loaded(loras_dir, models_dir):
    model = build_model("sd15")
    erasure = attn2_erasure("sd15", model)
    (name,) = save(erasure, model)["lora_files"]
    (models_dir / FOLDER).mkdir()
    write_erasure_file(erasure, str(models_dir / FOLDER / "own.safetensors"))
    (loras_dir / "esd-u.pt").write_bytes(pickle.dumps({"w": 1}, protocol=4))
    listed = LoadConceptErasureFromWeights.INPUT_TYPES()["required"]["weights_name"][0]
    assert listed == list_weight_files() == [f"loras/{name}", "loras/esd-u.pt", "concept_erasure/own.safetensors"]

    with torch.inference_mode():
        (from_lora,) = LoadConceptErasureFromWeights().load(model, f"loras/{name}", "Van Gogh\n\n starry night ")
        (from_file,) = LoadConceptErasureFromWeights().load(model, "concept_erasure/own.safetensors", "")
        with pytest.raises(ErasureError, match=r"esd-u.pt is a pickled PyTorch file.*weights_only=True"):
            LoadConceptErasureFromWeights().load(model, "loras/esd-u.pt", "")
    assert from_lora.concepts == ["Van Gogh", "starry night"]
    assert from_lora.settings["source"]["file"] == f"loras/{name}" and not from_lora.has_prompt
    assert from_file.has_prompt  # an erasure file comes back as it is
    expected = noise_prediction(apply_erasure(model, erasure), "sd15")
    assert (noise_prediction(apply_erasure(model, from_lora), "sd15") - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name,message", [("checkpoints/model.safetensors", "must start with loras/ or "
                                                                           "concept_erasure/"),
                                          ("loras/../secret.safetensors", "no '..'"),
                                          ("loras/missing.safetensors", "not found")])
def test_weights_names_outside_the_two_folders_are_refused(loras_dir, name, message):
    with pytest.raises(ErasureError, match=message):
        resolve_weight_file(name)


def test_a_weights_file_for_another_family_is_refused_by_the_node(loras_dir):
    sdxl = build_model("sdxl")
    (name,) = save(attn2_erasure("sdxl", sdxl), sdxl)["lora_files"]
    with torch.inference_mode(), pytest.raises(ErasureError, match=r"made for SDXL models.*model is SD15"):
        LoadConceptErasureFromWeights().load(build_model("sd15"), f"loras/{name}", "")


def test_save_without_a_model_needs_a_standard_layout(loras_dir):
    erasure = attn2_erasure("sd15", build_model("sd15"))
    with pytest.raises(ErasureError, match="connect the model"):
        save(erasure)
    assert not loras_dir.exists() or not any(loras_dir.rglob("*"))
