"""The world's diffusion model: comfy's own SD1.5 UNetModel, small, so every patch of the pack applies to it."""
from __future__ import annotations

import torch

import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models

from .renderer import SIZE
from .text_encoder import CONTEXT_DIM

# Cross-attention only at the 8x8 level (input_blocks.3, middle_block, output_blocks.0/1), as SDXL skips
# attention at its highest resolution: it keeps a training step at batch 32 near 0.3 s on one CPU core.
UNET_CONFIG = dict(
    in_channels=4, out_channels=4, model_channels=32, channel_mult=[1, 2], num_res_blocks=[1, 1],
    transformer_depth=[0, 1], transformer_depth_output=[0, 0, 1, 1], transformer_depth_middle=1,
    use_spatial_transformer=True, legacy=False, num_heads=-1, num_head_channels=16,
    use_linear_in_transformer=True, adm_in_channels=None, image_size=SIZE, context_dim=CONTEXT_DIM)


def init_weights(module: torch.nn.Module, seed: int) -> None:
    """comfy's ops skip initialisation; give every layer torch's default init, reproducibly."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    for m in module.modules():
        for base in (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm):
            if isinstance(m, base):
                base.reset_parameters(m)
                break
    torch.random.set_rng_state(generator_state)


def build_unet(seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    """A ModelPatcher around a fresh SD1.5-family BaseModel (EPS prediction) with UNET_CONFIG."""
    model = comfy.model_base.BaseModel(comfy.supported_models.SD15(dict(UNET_CONFIG)), device="cpu")
    init_weights(model, seed)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())
