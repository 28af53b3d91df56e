"""Names of UNet layers outside ComfyUI: ModelPatcher keys <-> diffusers module paths <-> kohya LoRA names.

ComfyUI's comfy.utils.unet_to_diffusers gives the diffusers path of every UNet weight for a unet_config. The kohya
name of a layer is 'lora_unet_' + that path with '.' replaced by '_'
(lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k): the spelling A1111/Forge, diffusers and
ComfyUI all map, for SD1.x, SD2.x and SDXL.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from .concept_erasure import ErasureError, _diffusion_model, family_name, model_context_dim, model_family

MODEL_PREFIX = "diffusion_model."
KOHYA_PREFIX = "lora_unet_"
PATCHABLE = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)

# The UNet layouts of the released SD1.x, SD2.x and SDXL base models (as comfy.model_detection knows them), used to
# name an erasure's layers when no model is at hand. Only the shape of the network matters here.
_STANDARD_LAYOUT = dict(in_channels=4, out_channels=4, model_channels=320, use_spatial_transformer=True,
                        legacy=False, use_temporal_attention=False, use_temporal_resblock=False, image_size=32)
STANDARD_LAYOUTS = {
    768: ("SD1.x", dict(_STANDARD_LAYOUT, adm_in_channels=None, num_res_blocks=[2, 2, 2, 2],
                        channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                        transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], transformer_depth_middle=1,
                        use_linear_in_transformer=False, context_dim=768, num_heads=8)),
    1024: ("SD2.x", dict(_STANDARD_LAYOUT, adm_in_channels=None, num_res_blocks=[2, 2, 2, 2],
                         channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                         transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], transformer_depth_middle=1,
                         use_linear_in_transformer=True, context_dim=1024, num_head_channels=64)),
    2048: ("SDXL", dict(_STANDARD_LAYOUT, num_classes="sequential", adm_in_channels=2816, num_res_blocks=[2, 2, 2],
                        channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10],
                        transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], transformer_depth_middle=10,
                        use_linear_in_transformer=True, context_dim=2048, num_head_channels=64)),
}


@dataclass
class UnetNames:
    """Every weight of one UNet layout: its shape, whether it belongs to a linear/conv layer, its diffusers path."""

    description: str  # "the model (SD15)" or "the standard SDXL UNet": for messages
    family: str  # SD1.x / SD2.x / SDXL / context dim N
    context_dim: int
    shapes: Dict[str, Tuple[int, ...]]  # ModelPatcher key -> shape, for every UNet tensor (weights, biases, norms)
    patchable: Dict[str, bool]  # ModelPatcher weight key -> it is the weight of a linear or conv layer
    diffusers: Dict[str, str]  # ModelPatcher key -> diffusers parameter name ("down_blocks.0....to_k.weight")

    def kohya_name(self, key: str) -> str:
        """lora_unet_<diffusers module path> for a ModelPatcher weight key."""
        module = self.diffusers.get(key, "")[:-len(".weight")]
        if not module or module.startswith(("add_embedding.", "class_embedding.")):
            # SDXL's label_emb: diffusers' kohya reader only knows the sgm spelling (lora_unet_label_emb_0_0); ComfyUI
            # and A1111 read both. Layers diffusers has no name for keep the ComfyUI (sgm) path as well.
            module = key[len(MODEL_PREFIX):-len(".weight")]
        return KOHYA_PREFIX + module.replace(".", "_")

    def spellings(self) -> Dict[str, str]:
        """Every accepted name of a layer (module, no '.weight') or of a tensor -> its ModelPatcher key.

        Module names: the ComfyUI/sgm path, the diffusers path, and the kohya spellings of both (what
        comfy.lora.model_lora_keys_unet maps too). Tensor names: the same paths with .weight / .bias.
        """
        table: Dict[str, str] = {}
        for key in self.shapes:
            ldm = key[len(MODEL_PREFIX):]
            names = [ldm]
            if key in self.diffusers:
                names.append(self.diffusers[key])
            for name in names:
                table[name] = key
                module, _, param = name.rpartition(".")
                if param == "weight" and self.patchable.get(key):
                    table[module] = key
                    table[KOHYA_PREFIX + module.replace(".", "_")] = key
        return table


def _diffusers_names(unet_config: dict) -> Dict[str, str]:
    import comfy.utils

    mapping = comfy.utils.unet_to_diffusers(unet_config)  # diffusers name -> sgm name (both hosts)
    names: Dict[str, str] = {}
    for diffusers_name in sorted(mapping):  # label_emb has two diffusers names; take add_embedding (sorted first)
        names.setdefault(MODEL_PREFIX + mapping[diffusers_name], diffusers_name)
    return names


def _layout_names(unet: torch.nn.Module, unet_config: dict, description: str, context_dim: int,
                  family: str) -> UnetNames:
    shapes = {MODEL_PREFIX + k: tuple(v.shape) for k, v in unet.state_dict().items()}
    patchable = {MODEL_PREFIX + f"{name}.weight": isinstance(m, PATCHABLE)
                 for name, m in unet.named_modules() if isinstance(getattr(m, "weight", None), torch.Tensor)}
    return UnetNames(description, family, context_dim, shapes, patchable, _diffusers_names(unet_config))


def model_unet_names(model) -> UnetNames:
    """The names of a ComfyUI MODEL's UNet (its own unet_config)."""
    unet = _diffusion_model(model)
    config = getattr(getattr(model.model, "model_config", None), "unet_config", None)
    if not isinstance(config, dict) or "num_res_blocks" not in config:
        raise ErasureError(f"the model's {type(unet).__name__} has no SD UNet configuration to name its layers by")
    context_dim = model_context_dim(model)
    return _layout_names(unet, config, f"the model ({model_family(model)})", context_dim, family_name(context_dim))


_standard_cache: Dict[int, UnetNames] = {}


def standard_unet_names(context_dim: int) -> Optional[UnetNames]:
    """The names of the released SD1.x / SD2.x / SDXL UNet with this context size (built on the meta device)."""
    if context_dim not in STANDARD_LAYOUTS:
        return None
    if context_dim not in _standard_cache:
        import comfy.ops
        from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

        family, config = STANDARD_LAYOUTS[context_dim]
        unet = UNetModel(**config, device="meta", operations=comfy.ops.disable_weight_init)
        _standard_cache[context_dim] = _layout_names(unet, config, f"the standard {family} UNet", context_dim, family)
    return _standard_cache[context_dim]
