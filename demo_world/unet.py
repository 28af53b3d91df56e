"""The world's diffusion model: comfy's own SD1.5 UNetModel, small, so every patch of the pack applies to it."""
from __future__ import annotations

import torch

import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models

from .spec import DEMO, WorldSpec
from .text_encoder import CONTEXT_DIM


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


def build_unet(seed: int = 0, spec: WorldSpec = DEMO) -> comfy.model_patcher.ModelPatcher:
    """A ModelPatcher around a fresh SD1.5-family BaseModel (EPS prediction) in the world's shape."""
    model = comfy.model_base.BaseModel(comfy.supported_models.SD15(spec.unet_config(CONTEXT_DIM)), device="cpu")
    init_weights(model, seed)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())
