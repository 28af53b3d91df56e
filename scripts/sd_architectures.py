"""The UNets of SD1.5, SD2.x (v-prediction) and SDXL as comfy's model detection describes them, built with
comfy's own classes: on the meta device (shapes only, for counting) or on a real device with random weights."""
from __future__ import annotations

SD15_UNET = dict(
    in_channels=4, out_channels=4, model_channels=320, channel_mult=[1, 2, 4, 4], num_res_blocks=[2, 2, 2, 2],
    transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    transformer_depth_middle=1, use_spatial_transformer=True, legacy=False, num_heads=8, num_head_channels=-1,
    use_linear_in_transformer=False, adm_in_channels=None, context_dim=768, image_size=32, use_checkpoint=False,
    use_temporal_attention=False, use_temporal_resblock=False)
SD2_UNET = dict(SD15_UNET, num_heads=-1, num_head_channels=64, use_linear_in_transformer=True, context_dim=1024)
SDXL_UNET = dict(
    in_channels=4, out_channels=4, model_channels=320, channel_mult=[1, 2, 4], num_res_blocks=[2, 2, 2],
    transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
    transformer_depth_middle=10, use_spatial_transformer=True, legacy=False, num_classes="sequential",
    adm_in_channels=2816, num_head_channels=64, use_linear_in_transformer=True, context_dim=2048, image_size=32,
    use_checkpoint=False, use_temporal_attention=False, use_temporal_resblock=False)

# family -> (description, resolution people train at)
FAMILIES = {"sd15": ("SD1.5", 512), "sd2v": ("SD2.x v-prediction", 768), "sdxl": ("SDXL", 1024)}


def build(family: str, device, dtype):
    """A comfy BaseModel of the family with weights in `dtype` on `device` ("meta": shapes only, no memory)."""
    import torch

    import comfy.model_base
    import comfy.supported_models

    if family == "sd15":
        model = comfy.model_base.BaseModel(comfy.supported_models.SD15(dict(SD15_UNET, dtype=dtype)), device=device)
    elif family == "sd2v":
        model = comfy.model_base.BaseModel(comfy.supported_models.SD20(dict(SD2_UNET, dtype=dtype)), device=device,
                                           model_type=comfy.model_base.ModelType.V_PREDICTION)
    elif family == "sdxl":
        model = comfy.model_base.SDXL(comfy.supported_models.SDXL(dict(SDXL_UNET, dtype=dtype)), device=device)
    else:
        raise ValueError(family)
    if torch.device(device).type != "meta":
        init_weights(model.diffusion_model)
    return model.eval()


def init_weights(module, seed: int = 0) -> None:
    """comfy's ops skip initialisation: torch's default init for every layer, reproducibly, on its device."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            for base in (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm):
                if isinstance(m, base):
                    base.reset_parameters(m)
                    break


def conditioning(family: str, seed: int):
    """CLIP Text Encode's output for the family: [[context [1, 77, width], {pooled_output for SDXL}]]."""
    import torch

    g = torch.Generator().manual_seed(seed)
    width = {"sd15": 768, "sd2v": 1024, "sdxl": 2048}[family]
    options = {"pooled_output": torch.randn(1, 1280, generator=g)} if family == "sdxl" else {}
    return [[torch.randn(1, 77, width, generator=g), options]]
