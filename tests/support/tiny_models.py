"""Small Stable Diffusion models of each family, built with comfy's own classes and random weights."""
import torch

import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models

_COMMON = dict(in_channels=4, out_channels=4, model_channels=32, channel_mult=[1, 2], num_res_blocks=[1, 1],
               transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1], transformer_depth_middle=1,
               use_spatial_transformer=True, legacy=False, num_heads=-1, num_head_channels=16,
               use_linear_in_transformer=True, adm_in_channels=None, image_size=32)

FAMILIES = ("sd15", "sd2v", "sdxl")
CONTEXT_DIM = {"sd15": 768, "sd2v": 1024, "sdxl": 2048}


def init_weights(module: torch.nn.Module, seed: int) -> None:
    """comfy's ops skip initialisation; give every layer torch's default init, reproducibly."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    for m in module.modules():
        for base in (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv1d, torch.nn.GroupNorm, torch.nn.LayerNorm):
            if isinstance(m, base):
                base.reset_parameters(m)
                break
    torch.random.set_rng_state(gen_state)


def build_model(family: str = "sd15", seed: int = 0, **changes):
    """A ModelPatcher around a ~1.6 M parameter UNet of the given family (sd15, sd2v or sdxl); keyword arguments
    change its unet_config."""
    config = dict(_COMMON, context_dim=CONTEXT_DIM[family])
    if family != "sd15":  # SD2/SDXL model configs force 64 channels per head
        config.update(model_channels=64, num_head_channels=64)
    if family == "sdxl":
        config.update(adm_in_channels=2816, num_classes="sequential", transformer_depth=[1, 2],
                      transformer_depth_output=[1, 1, 2, 2])
    config.update(changes)
    if family == "sd15":
        model = comfy.model_base.BaseModel(comfy.supported_models.SD15(config), device="cpu")
    elif family == "sd2v":
        model = comfy.model_base.BaseModel(comfy.supported_models.SD20(config),
                                           model_type=comfy.model_base.ModelType.V_PREDICTION, device="cpu")
    elif family == "sdxl":
        model = comfy.model_base.SDXL(comfy.supported_models.SDXL(config), device="cpu")
    else:
        raise ValueError(family)
    init_weights(model, seed)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def extra_conds(family: str, batch: int):
    return {"y": torch.randn(batch, 2816, generator=torch.Generator().manual_seed(7))} if family == "sdxl" else {}


def predict(patcher, x, sigma, context, **extra):
    """The denoised output of a patched model, with its weight patches and transformer options in effect."""
    comfy.model_management.load_models_gpu([patcher])
    sigma = torch.full((x.shape[0],), float(sigma))
    with torch.no_grad():
        return patcher.model.apply_model(x, sigma, c_crossattn=context,
                                         transformer_options=dict(patcher.model_options["transformer_options"]), **extra)


def build_dit(seed: int = 0):
    """A small SD3 (MMDiT) model: a real comfy diffusion model with no UNet cross-attention (attn2)."""
    config = dict(in_channels=16, out_channels=16, patch_size=2, depth=2, adm_in_channels=2048,
                  pos_embed_max_size=16, num_patches=256, pos_embed_scaling_factor=None,
                  context_embedder_config={"target": "torch.nn.Linear",
                                           "params": {"in_features": 4096, "out_features": 128}})
    model = comfy.model_base.SD3(comfy.supported_models.SD3(config), device="cpu")
    init_weights(model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def build_clip(family: str = "sd15", seed: int = 0):
    """ComfyUI's CLIP of a family (SD1.5: CLIP-L; SDXL: CLIP-L + CLIP-G with the pooled output), full size, with
    random weights: what CLIP Text Encode gets from a checkpoint loader, minus the download."""
    import comfy.sd

    supported = {"sd15": comfy.supported_models.SD15, "sdxl": comfy.supported_models.SDXL}[family]
    target = supported(dict(supported.unet_config)).clip_target()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        clip = comfy.sd.CLIP(target)
        for parameter in clip.cond_stage_model.parameters():
            parameter.normal_(0.0, 0.02, generator=generator)
    return clip
