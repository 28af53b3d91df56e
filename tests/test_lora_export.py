"""Export as a standard LoRA: kohya names the host maps, exact and SVD formats checked through ComfyUI's own
LoraLoaderModelOnly on tiny SD1.5 / SD2-v / SDXL models, metadata, refusals."""
import os

import pytest
import torch
from safetensors import safe_open

import comfy.lora
import comfy.model_base
import comfy.model_detection
import comfy.model_management
import comfy.model_patcher
import comfy.ops
import comfy.supported_models
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

from comfyui_concept_erasure.erasure import ConceptErasure, ErasureError, LowRankDelta, apply_erasure, load_erasure
from comfyui_concept_erasure.erasure.folders import save_lora
from comfyui_concept_erasure.erasure.lora_export import lora_tensors, svd_factors, write_lora_file
from comfyui_concept_erasure.erasure.unet_names import STANDARD_LAYOUTS, model_unet_names, standard_unet_names
from lora_helpers import attn2_erasure, every_layer_erasure, load_with_host, noise_prediction
from tiny_models import CONTEXT_DIM, FAMILIES, build_model


def export_to_loras(erasure, fmt="exact", rank=32, model=None, prefix="test/erased"):
    """Save through the never-overwrite saver into models/loras; returns (name for the LoRA loader, export)."""
    export = lora_tensors(erasure, fmt, rank, model)
    path = save_lora(lambda p: write_lora_file(export, p), prefix)
    return os.path.relpath(path, os.path.dirname(os.path.dirname(path))).replace(os.sep, "/"), export


def file_tensors(loras_dir, name):
    with safe_open(str(loras_dir / name), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.mark.parametrize("family", FAMILIES)
def test_every_layer_name_is_one_the_host_maps_to_the_same_weight(family):
    model = build_model(family)
    names = model_unet_names(model)
    host = comfy.lora.model_lora_keys_unet(model.model, {})
    keys = [k for k, p in names.patchable.items() if p]
    assert len(keys) > 100  # attn1/attn2/ff/proj, resnet convs, samplers, embeddings, conv_in/out
    kohya = [names.kohya_name(k) for k in keys]
    assert len(set(kohya)) == len(kohya)
    assert [host.get(n) for n in kohya] == keys


@pytest.mark.parametrize("context_dim,key,name", [
    (768, "input_blocks.1.1.transformer_blocks.0.attn2.to_k",
     "down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"),
    (768, "output_blocks.11.1.proj_out", "up_blocks_3_attentions_2_proj_out"),
    (768, "middle_block.2.out_layers.3", "mid_block_resnets_1_conv2"),
    (1024, "output_blocks.5.2.conv", "up_blocks_1_upsamplers_0_conv"),
    (2048, "input_blocks.4.1.transformer_blocks.1.attn2.to_v",
     "down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_v"),
    (2048, "output_blocks.2.2.conv", "up_blocks_0_upsamplers_0_conv"),
    (2048, "time_embed.0", "time_embedding_linear_1"),
    (2048, "label_emb.0.0", "label_emb_0_0"),  # the spelling diffusers' kohya reader knows for SDXL's add_embedding
])
def test_standard_layout_names(context_dim, key, name):
    assert standard_unet_names(context_dim).kohya_name(f"diffusion_model.{key}.weight") == "lora_unet_" + name


@pytest.mark.parametrize("context_dim", sorted(STANDARD_LAYOUTS))
def test_standard_layouts_are_what_comfy_detects_as_sd15_sd2_sdxl(context_dim):
    family, config = STANDARD_LAYOUTS[context_dim]
    unet = UNetModel(**config, device="meta", operations=comfy.ops.disable_weight_init)
    state = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    detected = comfy.model_detection.model_config_from_unet(state, "model.diffusion_model.")
    assert type(detected).__name__ == {768: "SD15", 1024: "SD20", 2048: "SDXL"}[context_dim]


def full_size_model(context_dim):
    """A real-size SD1.5 / SD2 / SDXL ModelPatcher on the meta device (shapes only, no memory)."""
    config_class = {768: comfy.supported_models.SD15, 1024: comfy.supported_models.SD20,
                    2048: comfy.supported_models.SDXL}[context_dim]
    base_class = comfy.model_base.SDXL if context_dim == 2048 else comfy.model_base.BaseModel
    model = base_class(config_class(dict(STANDARD_LAYOUTS[context_dim][1])), device="meta")
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


@pytest.mark.parametrize("context_dim", sorted(STANDARD_LAYOUTS))
def test_without_a_model_a_standard_erasure_gets_the_names_its_model_gives(context_dim):
    model = full_size_model(context_dim)
    names = model_unet_names(model)
    keys = [k for k, p in names.patchable.items() if p and (".attn2." in k or "out_layers.3" in k)][:40]
    g = torch.Generator().manual_seed(0)
    erasure = ConceptErasure(context_dim=context_dim, method="esd_x", deltas={
        k: LowRankDelta(torch.randn(names.shapes[k][0], 2, generator=g), torch.randn(2, *names.shapes[k][1:],
                                                                                     generator=g), 2.0)
        for k in keys})
    with_model, without = lora_tensors(erasure, model=model), lora_tensors(erasure)
    assert sorted(with_model.tensors) == sorted(without.tensors)
    assert len(without.tensors) == 3 * len(keys)


def test_without_a_model_an_erasure_that_does_not_fit_the_standard_layout_is_refused():
    erasure = every_layer_erasure("sd15", build_model("sd15"))  # the tiny UNet has a 2-level layout
    with pytest.raises(ErasureError, match=r"standard SD1\.x UNet.*connect the model"):
        lora_tensors(erasure)
    odd = ConceptErasure(context_dim=1280, deltas={"diffusion_model.out.2.weight": torch.zeros(4, 4, 3, 3)})
    with pytest.raises(ErasureError, match="no standard UNet layout is known for cross-attention context 1280"):
        lora_tensors(odd)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_exact_file_through_the_host_lora_loader_equals_apply(loras_dir, family, dtype):
    model = build_model(family)
    erasure = every_layer_erasure(family, model, dtype=dtype, full="random")
    name, export = export_to_loras(erasure, "exact", model=model)
    tensors, meta = file_tensors(loras_dir, name)
    assert export.max_relative_error == 0 and "concept_erasure.max_relative_error" not in meta
    diffs = [k for k in tensors if k.endswith(".diff")]
    downs = [k for k in tensors if k.endswith(".lora_down.weight")]
    assert len(diffs) + len(downs) == len(erasure.deltas) and diffs and downs
    assert {t.dtype for k, t in tensors.items() if not k.endswith(".alpha")} == {dtype}  # the erasure's own dtype

    loaded = load_with_host(model, name)
    assert len(loaded.patches) == len(erasure.deltas)
    expected = noise_prediction(apply_erasure(model, erasure), family)
    difference = (noise_prediction(loaded, family) - expected).abs().max().item()
    assert difference <= 1e-5, difference
    assert (expected - noise_prediction(model, family)).abs().max().item() > 1e-2  # the erasure does change it
    assert not model.patches


def weights_of(model):
    comfy.model_management.load_models_gpu([model])
    return {k: v.detach().clone() for k, v in model.model.state_dict().items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_format_is_within_the_reported_error_in_the_host(loras_dir, family):
    model = build_model(family)
    erasure = every_layer_erasure(family, model, full="random")
    name, export = export_to_loras(erasure, "lora", rank=4, model=model)
    tensors, meta = file_tensors(loras_dir, name)
    assert not [k for k in tensors if k.endswith(".diff")]
    assert float(meta["concept_erasure.max_relative_error"]) == pytest.approx(export.max_relative_error, rel=1e-5)

    # The reported error is the best a rank-4 factorisation can do (Eckart-Young), layer by layer.
    names = model_unet_names(model)
    optimum = {}
    for key, delta in erasure.deltas.items():
        if not isinstance(delta, LowRankDelta):
            s = torch.linalg.svdvals(delta.reshape(delta.shape[0], -1))
            optimum[names.kohya_name(key)] = float(s[4:].square().sum().sqrt() / s.square().sum().sqrt())
    assert export.max_relative_error == pytest.approx(max(optimum.values()), rel=1e-4)
    assert export.worst_layer == max(optimum, key=optimum.get) == meta["concept_erasure.max_error_layer"]
    assert export.max_relative_error > 0.1  # random full-rank deltas do not fit in rank 4

    # In the host: every layer's change is within the reported error; low-rank deltas are exact.
    base = weights_of(model)
    patched = weights_of(load_with_host(model, name))
    weights_of(model)  # the base model's own weights back in place
    for key, delta in erasure.deltas.items():
        wanted = (delta.full() if isinstance(delta, LowRankDelta) else delta).float()
        error = float(torch.linalg.norm(patched[key] - base[key] - wanted) / torch.linalg.norm(wanted))
        limit = 1e-5 if isinstance(delta, LowRankDelta) else export.max_relative_error + 1e-5
        assert error <= limit, (key, error, limit)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_format_at_full_rank_equals_apply(loras_dir, family):
    model = build_model(family)
    erasure = every_layer_erasure(family, model, full="low_rank")  # full deltas of rank 2
    name, export = export_to_loras(erasure, "lora", rank=2, model=model)
    assert export.max_relative_error < 1e-5
    expected = noise_prediction(apply_erasure(model, erasure), family)
    assert (noise_prediction(load_with_host(model, name), family) - expected).abs().max().item() <= 1e-5


def test_one_alpha_for_every_layer(loras_dir):
    """diffusers reads one alpha for attention layers, so layers with another alpha get their up factor rescaled."""
    family, model = "sd15", build_model("sd15")
    erasure = attn2_erasure(family, model)
    first = next(k for k, d in erasure.deltas.items() if isinstance(d, LowRankDelta))
    d = erasure.deltas[first]
    erasure.deltas[first] = LowRankDelta(d.up, d.down, 1.0)  # the others have alpha 4
    name, export = export_to_loras(erasure, "exact", model=model)
    tensors, meta = file_tensors(loras_dir, name)
    assert {float(t) for k, t in tensors.items() if k.endswith(".alpha")} == {4.0}
    assert meta["ss_network_alpha"] == "4"
    expected = noise_prediction(apply_erasure(model, erasure), family)
    assert (noise_prediction(load_with_host(model, name), family) - expected).abs().max().item() <= 1e-5


def test_svd_factors_of_a_convolution_and_of_zero():
    g = torch.Generator().manual_seed(0)
    conv = torch.randn(8, 2, generator=g) @ torch.randn(2, 4 * 9, generator=g)
    up, down, error = svd_factors(conv.reshape(8, 4, 3, 3), rank=3, alpha=6.0)
    assert up.shape == (8, 3) and down.shape == (3, 4, 3, 3) and error < 1e-6  # the matrix has rank 2
    assert torch.allclose(up @ down.reshape(3, -1) * 6.0 / 3, conv, atol=1e-5)
    up, down, error = svd_factors(conv.reshape(8, 4, 3, 3), rank=100)
    assert up.shape == (8, 8) and error < 1e-6  # capped at the smaller side of the matrix
    up, down, error = svd_factors(torch.zeros(5, 7), rank=2)
    assert error == 0 and not up.any()


@pytest.mark.parametrize("family,base,arch", [("sd15", "sd_v1", "stable-diffusion-v1/lora"),
                                              ("sd2v", "sd_v2", "stable-diffusion-v2-768-v/lora"),
                                              ("sdxl", "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora")])
def test_metadata_for_lora_browsers_and_for_the_import(loras_dir, family, base, arch):
    model = build_model(family)
    erasure = attn2_erasure(family, model)
    name, _ = export_to_loras(erasure, "lora", rank=8, model=model)
    _, meta = file_tensors(loras_dir, name)
    assert meta["ss_base_model_version"] == base and meta["modelspec.architecture"] == arch
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "Dynamic"
    assert meta["modelspec.prediction_type"] == ("v" if family == "sd2v" else "epsilon")
    assert "Van Gogh" in meta["modelspec.title"] and meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["concept_erasure.method"] == "lp" and meta["concept_erasure.concepts"] == '["Van Gogh"]'
    assert meta["concept_erasure.context_dim"] == str(CONTEXT_DIM[family])
    assert meta["concept_erasure.key_prompt"] == "not included"  # the key stays in the erasure file
    assert meta["concept_erasure.pack_version"] and meta["concept_erasure.export"] == "lora"
    assert meta["concept_erasure.base_model"] == type(model.model.model_config).__name__
    with pytest.raises(ErasureError, match="not a concept erasure file"):
        load_erasure(str(loras_dir / name))  # a LoRA is not mistaken for an erasure file


def test_lp_attached_and_empty_erasures_are_refused_and_nothing_is_written(loras_dir):
    model = build_model("sd15")
    attached = attn2_erasure("sd15", model, prompt_at_inference=True, method="lp_attached")
    with pytest.raises(ErasureError, match=r"prompt is part of the erased model.*Train with method lp"):
        export_to_loras(attached, model=model)
    with pytest.raises(ErasureError, match="no weight deltas"):
        export_to_loras(ConceptErasure(context_dim=768, method="lp"), model=model)
    with pytest.raises(ErasureError, match="format must be one of exact, lora"):
        export_to_loras(attn2_erasure("sd15", model), "kohya", model=model)
    with pytest.raises(ErasureError, match="rank must be at least 1"):
        export_to_loras(attn2_erasure("sd15", model), "lora", rank=0, model=model)
    assert not loras_dir.exists() or not any(loras_dir.rglob("*"))


def test_an_erasure_for_another_family_is_refused_naming_both():
    erasure = attn2_erasure("sdxl", build_model("sdxl"))
    with pytest.raises(ErasureError, match=r"made for SDXL models.*model is SD1\.x"):
        lora_tensors(erasure, model=build_model("sd15"))
