"""The pack inside the real ComfyUI server: its nodes are listed, and Load -> Apply -> KSampler runs."""
import pytest
import torch
from safetensors.torch import load_file

from server_fixtures import CHECKPOINT

PACK_NODES = ("LoadConceptErasure", "ApplyConceptErasure", "SaveConceptErasure", "RecoverErasedConcept",
              "SaveConceptErasureAsLoRA", "LoadConceptErasureFromWeights")


def sampling_prompt(model_ref, nodes, prefix, steps=2, cfg=5.0, seed=7):
    """Checkpoint -> text encodes -> KSampler(model_ref) -> SaveLatent, on an 8x8 latent."""
    prompt = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat", "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["ckpt", 1]}},
        "empty": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "sample": {"class_type": "KSampler", "inputs": {
            "model": model_ref, "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["empty", 0],
            "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0}},
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0], "filename_prefix": prefix}},
    }
    prompt.update(nodes)
    return prompt


def run_for_latent(server, base, prompt):
    entry = server.run(prompt, timeout=300)
    saved = entry["outputs"]["save"]["latents"][0]
    path = base / "output" / saved["subfolder"] / saved["filename"]
    assert path.is_file(), f"SaveLatent reported {saved} but {path} does not exist"
    return load_file(str(path))["latent_tensor"]


def test_object_info_lists_the_nodes_with_tooltips(comfy_server):
    info = comfy_server.object_info()
    missing = [n for n in PACK_NODES if n not in info]
    assert not missing, f"the server did not load {missing}" + comfy_server.log_tail()
    for name in PACK_NODES:
        node = info[name]
        assert node["category"] == "concept_erasure"
        assert len(node["description"]) > 40, name
        inputs = {**node["input"]["required"], **node["input"].get("optional", {})}
        for input_name, spec in inputs.items():
            assert len(spec) > 1 and spec[1].get("tooltip"), f"{name}.{input_name} has no tooltip"
    assert info["ApplyConceptErasure"]["output"] == ["MODEL"]
    assert info["LoadConceptErasure"]["output"] == ["CONCEPT_ERASURE"]


def test_load_apply_ksampler_produces_a_latent_changed_by_the_erasure(comfy_server, comfy_base, made_erasure):
    listed = comfy_server.object_info("LoadConceptErasure")["LoadConceptErasure"]["input"]["required"]
    assert made_erasure in listed["erasure_name"][0]

    def erased(strength):
        return {
            "load": {"class_type": "LoadConceptErasure", "inputs": {"erasure_name": made_erasure}},
            "apply": {"class_type": "ApplyConceptErasure",
                      "inputs": {"model": ["ckpt", 0], "erasure": ["load", 0], "strength": strength}},
        }

    original = run_for_latent(comfy_server, comfy_base, sampling_prompt(["ckpt", 0], {}, "server/original"))
    off = run_for_latent(comfy_server, comfy_base, sampling_prompt(["apply", 0], erased(0.0), "server/off"))
    on = run_for_latent(comfy_server, comfy_base, sampling_prompt(["apply", 0], erased(1.0), "server/on"))
    assert on.shape == original.shape == (1, 4, 8, 8)
    assert torch.isfinite(on).all()
    assert torch.equal(off, original)  # strength 0 is the original model, through the real server
    assert (on - original).abs().mean() > 1e-3


def test_recover_runs_and_a_bad_erasure_name_is_rejected(comfy_server, comfy_base, made_erasure):
    recover = {
        "load": {"class_type": "LoadConceptErasure", "inputs": {"erasure_name": made_erasure}},
        "recover": {"class_type": "RecoverErasedConcept", "inputs": {"model": ["ckpt", 0], "erasure": ["load", 0]}},
    }
    latent = run_for_latent(comfy_server, comfy_base, sampling_prompt(["recover", 0], recover, "server/recover"))
    assert torch.isfinite(latent).all()

    recover["load"]["inputs"]["erasure_name"] = "no_such_erasure.safetensors"
    with pytest.raises(Exception, match="no_such_erasure"):
        comfy_server.queue_prompt(sampling_prompt(["recover", 0], recover, "server/bad"))
