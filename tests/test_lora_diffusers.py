"""A library this pack did not write reads the exported file: diffusers (its own kohya conversion and PEFT) applies
it to a UNet2DConditionModel holding the tiny ComfyUI model's weights, and predicts what ComfyUI predicts with the
erasure applied. diffusers is a test-only dependency (the dev extra); nothing is downloaded."""
import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin
from peft.tuners.lora import LoraLayer

import comfy.model_management
import comfy.utils

from comfyui_concept_erasure.erasure import apply_erasure
from comfyui_concept_erasure.erasure.lora_export import lora_tensors, write_lora_file
from lora_helpers import every_layer_erasure
from tiny_models import CONTEXT_DIM, FAMILIES, build_model

# diffusers gives the mid block the transformer depth of the deepest level: the tiny SDXL gets 2 there as well.
MODEL_CHANGES = {"sdxl": {"transformer_depth_middle": 2}}


def diffusers_unet(model) -> UNet2DConditionModel:
    """The diffusers UNet of the same architecture, holding the ComfyUI model's weights (via comfy's own map)."""
    config = model.model.model_config.unet_config
    channels = [config["model_channels"] * m for m in config["channel_mult"]]
    heads = [config["num_heads"] if config["num_heads"] > 0 else c // config["num_head_channels"] for c in channels]
    blocks = config["num_res_blocks"]
    depth = [config["transformer_depth"][sum(blocks[:i])] for i in range(len(channels))]
    assert len(set(blocks)) == 1 and all(depth)
    kwargs = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=tuple(channels),
                  layers_per_block=blocks[0], down_block_types=("CrossAttnDownBlock2D",) * len(channels),
                  up_block_types=("CrossAttnUpBlock2D",) * len(channels), cross_attention_dim=config["context_dim"],
                  attention_head_dim=tuple(heads), use_linear_projection=config["use_linear_in_transformer"],
                  transformer_layers_per_block=tuple(depth), norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0)
    if config.get("adm_in_channels"):
        kwargs.update(addition_embed_type="text_time", addition_time_embed_dim=256,
                      projection_class_embeddings_input_dim=config["adm_in_channels"])
    unet = UNet2DConditionModel(**kwargs)
    ours = model.model.diffusion_model.state_dict()
    mapping = comfy.utils.unet_to_diffusers(config)
    wanted = unet.state_dict()
    weights = {name: ours[sgm] for name, sgm in mapping.items() if name in wanted}
    assert sorted(weights) == sorted(wanted)
    unet.load_state_dict(weights)
    return unet.eval()


def predictions(family, comfy_model, unet, seed=3):
    """The raw UNet output of the ComfyUI model (with its patches) and of the diffusers UNet on the same input."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=g)
    context = torch.randn(2, 7, CONTEXT_DIM[family], generator=g)
    t = torch.tensor([250.0, 700.0])
    kwargs, y = {}, None
    with torch.no_grad():
        if family == "sdxl":
            text_embeds, time_ids = torch.randn(2, 1280, generator=g), torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)
            kwargs = {"added_cond_kwargs": {"text_embeds": text_embeds, "time_ids": time_ids}}
            y = torch.cat([text_embeds, unet.add_time_proj(time_ids.flatten()).reshape(2, -1)], dim=1)
        comfy.model_management.load_models_gpu([comfy_model])
        ours = comfy_model.model.diffusion_model(x, timesteps=t, context=context, y=y)
        theirs = unet(x, t, encoder_hidden_states=context, **kwargs).sample
    return ours, theirs


def load_like_a_pipeline(family, path, unet):
    """What pipe.load_lora_weights(path) does for the UNet: diffusers' own file reading and kohya conversion, then
    PEFT layers in the UNet."""
    mixin = StableDiffusionXLLoraLoaderMixin if family == "sdxl" else StableDiffusionLoraLoaderMixin
    extra = {"unet_config": unet.config} if family == "sdxl" else {}
    state_dict, alphas, metadata = mixin.lora_state_dict(path, return_lora_metadata=True, **extra)
    mixin.load_lora_into_unet(state_dict, alphas, unet, metadata=metadata)


@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_reads_the_exported_lora_and_predicts_what_comfyui_predicts(tmp_path, family):
    model = build_model(family, **MODEL_CHANGES.get(family, {}))
    unet = diffusers_unet(model)
    ours, theirs = predictions(family, model, unet)
    baseline = (ours - theirs).abs().max().item()
    assert baseline <= 1e-5, f"the two UNets differ before any LoRA: {baseline}"

    # Low-rank and (rank-2) full deltas on every kind of linear/conv layer, in the portable format.
    erasure = every_layer_erasure(family, model, full="low_rank")
    export = lora_tensors(erasure, "lora", rank=2, model=model)
    assert export.max_relative_error < 1e-5
    path = str(tmp_path / "erasure.safetensors")
    write_lora_file(export, path)

    load_like_a_pipeline(family, path, unet)
    lora_layers = [m for m in unet.modules() if isinstance(m, LoraLayer)]
    assert len(lora_layers) == len(erasure.deltas)  # every layer of the file found its module

    erased, theirs = predictions(family, apply_erasure(model, erasure), unet)
    difference = (erased - theirs).abs().max().item()
    assert difference <= 1e-5, difference
    assert (erased - ours).abs().max().item() > 1e-2  # the erasure does change the prediction
