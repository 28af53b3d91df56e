"""On the real server: an exported LoRA loaded by ComfyUI's own LoraLoaderModelOnly samples what Apply Concept
Erasure samples, and Concept Erasure from Weights turns it back into the erasure."""
import comfy.latent_formats
import pytest

from comfy_server import ServerError
from server_fixtures import export_on_server
from test_server import run_for_latent, sampling_prompt
from tiny_models import build_model


def one_step_prompt(model_nodes, model_ref, prefix):
    """Checkpoint -> one Euler step at cfg 1 from pure noise -> SaveLatent: the saved latent is the model's x0
    prediction, x_T - sigma_max * eps, divided by the latent scale factor."""
    return sampling_prompt(model_ref, model_nodes, prefix, steps=1, cfg=1.0, seed=11)


def eps_difference(latent_a, latent_b):
    """Largest difference of the noise predictions behind two one-step latents (same noise, same sigma_max)."""
    sigma_max = float(build_model("sd15").get_model_object("model_sampling").sigma_max)
    scale = comfy.latent_formats.SD15().scale_factor
    return float((latent_a - latent_b).abs().max()) * scale / sigma_max


def applied(erasure_name):
    return {"load": {"class_type": "LoadConceptErasure", "inputs": {"erasure_name": erasure_name}},
            "apply": {"class_type": "ApplyConceptErasure",
                      "inputs": {"model": ["ckpt", 0], "erasure": ["load", 0], "strength": 1.0}}}


@pytest.fixture(scope="module")
def applied_latent(comfy_server, comfy_base, weights_erasure):
    return run_for_latent(comfy_server, comfy_base, one_step_prompt(applied(weights_erasure), ["apply", 0],
                                                                    "lora_test/applied"))


def test_exact_export_through_the_core_lora_loader_samples_what_apply_samples(comfy_server, comfy_base,
                                                                               exported_lora, applied_latent):
    assert (comfy_base / "models" / "loras" / exported_lora).is_file()
    listed = comfy_server.object_info("LoraLoaderModelOnly")["LoraLoaderModelOnly"]["input"]["required"]
    assert exported_lora in listed["lora_name"][0]
    lora = {"lora": {"class_type": "LoraLoaderModelOnly",
                     "inputs": {"model": ["ckpt", 0], "lora_name": exported_lora, "strength_model": 1.0}}}
    with_lora = run_for_latent(comfy_server, comfy_base, one_step_prompt(lora, ["lora", 0], "lora_test/lora"))
    original = run_for_latent(comfy_server, comfy_base, one_step_prompt({}, ["ckpt", 0], "lora_test/original"))
    difference = eps_difference(with_lora, applied_latent)
    assert difference <= 1e-5, difference
    assert eps_difference(original, applied_latent) > 1e-3  # the erasure changes the prediction


def test_lora_format_reports_its_error_and_the_import_node_reads_it_back(comfy_server, comfy_base, weights_erasure,
                                                                         applied_latent):
    name, ui = export_on_server(comfy_server, weights_erasure, "lora", prefix="concept_erasure/portable")
    assert 0 < ui["max_relative_error"][0] < 1  # full 320 x 768 deltas at rank 8
    exact, _ = export_on_server(comfy_server, weights_erasure, "exact", prefix="concept_erasure/exact")
    imported = {"load": {"class_type": "LoadConceptErasureFromWeights", "inputs": {
                    "model": ["ckpt", 0], "weights_name": f"loras/{exact}", "concept_label": "cat"}},
                "apply": {"class_type": "ApplyConceptErasure",
                          "inputs": {"model": ["ckpt", 0], "erasure": ["load", 0], "strength": 1.0}}}
    latent = run_for_latent(comfy_server, comfy_base, one_step_prompt(imported, ["apply", 0], "lora_test/imported"))
    assert eps_difference(latent, applied_latent) <= 1e-5


def test_a_pickle_is_refused_on_the_server_with_the_conversion_note(comfy_server, comfy_base):
    (comfy_base / "models" / "loras").mkdir(parents=True, exist_ok=True)
    (comfy_base / "models" / "loras" / "esd.pt").write_bytes(b"\x80\x04K\x01.")
    prompt = one_step_prompt({"load": {"class_type": "LoadConceptErasureFromWeights", "inputs": {
        "model": ["ckpt", 0], "weights_name": "loras/esd.pt", "concept_label": ""}},
        "apply": {"class_type": "ApplyConceptErasure",
                  "inputs": {"model": ["ckpt", 0], "erasure": ["load", 0], "strength": 1.0}}},
        ["apply", 0], "lora_test/never")
    with pytest.raises(ServerError, match=r"LoadConceptErasureFromWeights \(node load\): esd.pt is a pickled "
                                          r"PyTorch file.*weights_only=True"):
        comfy_server.run(prompt, timeout=120)
