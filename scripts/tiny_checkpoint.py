"""A small SD1.5-format checkpoint with random weights: UNet, CLIP-L text encoder and the SD VAE.

CheckpointLoaderSimple detects it as SD1.5 and returns MODEL, CLIP and VAE. The UNet is the smallest one
ComfyUI still detects as SD1.5 (320 channels, one level); CLIP-L and the VAE are full size because their
loaders have fixed configurations. Nothing is downloaded: every weight is drawn here, with torch's default
initialisation (comfy's layers skip it, which would leave uninitialised memory). fp16 keeps it ~0.5 GB.

    python scripts/tiny_checkpoint.py OUT.safetensors
"""
from __future__ import annotations

import argparse
import os
import sys

UNET_CONFIG = dict(
    in_channels=4, out_channels=4, model_channels=320, channel_mult=[1], num_res_blocks=[1],
    transformer_depth=[1], transformer_depth_output=[1, 1], transformer_depth_middle=1, context_dim=768,
    use_spatial_transformer=True, use_linear_in_transformer=False, legacy=False, num_heads=8,
    num_head_channels=-1, adm_in_channels=None, use_temporal_attention=False, image_size=32,
)
SD_VAE_CONFIG = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
                     ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0)


def _torch_default_init(module, seed: int) -> None:
    import torch

    torch.manual_seed(seed)
    bases = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv1d, torch.nn.GroupNorm, torch.nn.LayerNorm,
             torch.nn.Embedding)
    for m in module.modules():
        for base in bases:
            if isinstance(m, base):
                base.reset_parameters(m)
                break


def _unet_state_dict(unet_config=None):
    import comfy.model_base
    import comfy.supported_models

    model = comfy.model_base.BaseModel(comfy.supported_models.SD15(dict(unet_config or UNET_CONFIG)), device="cpu")
    _torch_default_init(model.diffusion_model, seed=1)
    return {f"model.diffusion_model.{k}": v for k, v in model.diffusion_model.state_dict().items()}


def _clip_state_dict():
    import comfy.sd1_clip
    import comfy.supported_models

    clip = comfy.sd1_clip.SD1ClipModel(device="cpu")
    _torch_default_init(clip, seed=2)
    state = {f"clip_l.{k}": v for k, v in clip.clip_l.state_dict().items()}
    # Saved the way SD1.5 checkpoints hold it: cond_stage_model.transformer.text_model.*
    return comfy.supported_models.SD15(dict(UNET_CONFIG)).process_clip_state_dict_for_saving(state)


def _vae_state_dict():
    from comfy.ldm.models.autoencoder import AutoencoderKL

    vae = AutoencoderKL(ddconfig=dict(SD_VAE_CONFIG), embed_dim=4)
    _torch_default_init(vae, seed=3)
    return {f"first_stage_model.{k}": v for k, v in vae.state_dict().items()}


def make_tiny_sd15_checkpoint(path: str, unet_config=None) -> str:
    """Write the checkpoint to `path` (a temporary name first, so a crash leaves no half file). Returns path.
    unet_config: another SD1.5-detectable UNet (e.g. sd_architectures.SD15_UNET, the full 860 M one, ~2 GB)."""
    import torch
    from safetensors.torch import save_file

    state = {}
    with torch.no_grad():
        for part in (lambda: _unet_state_dict(unet_config), _clip_state_dict, _vae_state_dict):
            for key, value in part().items():
                state[key] = value.detach().to(torch.float16).contiguous()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".partial"
    save_file(state, tmp, metadata={"format": "pt", "note": "random weights for tests; not a real model"})
    os.replace(tmp, path)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="where to write the .safetensors checkpoint")
    out = parser.parse_args(argv).out
    from comfy.cli_args import args

    args.cpu = True  # the fork's model code asks model_management for a device at import
    import torch

    torch.set_num_threads(min(4, os.cpu_count() or 1))
    make_tiny_sd15_checkpoint(out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
