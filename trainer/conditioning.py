"""CONDITIONING (from CLIPTextEncode) turned into the keyword arguments of `BaseModel.apply_model`.

A CONDITIONING is a list of [context tensor [1, tokens, width], options dict]; several entries come from
Conditioning (Combine). Each entry is encoded once, through the model's own `extra_conds` (which adds the
pooled `y` for SDXL), and later stacked into batches.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch

from ..erasure.concept_erasure import ErasureError, family_name

Cond = Dict[str, torch.Tensor]


def check_entries(conditioning, name: str, error=ErasureError) -> None:
    """Each entry of a CONDITIONING must be [tensor [1, tokens, width], dict]: one prompt per entry."""
    for entry in conditioning:
        if (not isinstance(entry, (list, tuple)) or len(entry) < 2 or not torch.is_tensor(entry[0])
                or entry[0].ndim != 3 or not isinstance(entry[1], dict)):
            raise error(f"{name} is not a CONDITIONING: each entry must be [tensor [1, tokens, width], dict]")
        if entry[0].shape[0] != 1:
            raise error(f"{name} holds a batch of {entry[0].shape[0]} encodings in one entry; use one prompt "
                        "per entry (combine several with Conditioning (Combine))")


def conditioning_entries(conditioning, name: str, single: bool = False) -> List[list]:
    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        what = "an empty list" if isinstance(conditioning, (list, tuple)) else type(conditioning).__name__
        raise ErasureError(f"{name} must be a CONDITIONING (from CLIP Text Encode), got {what}")
    check_entries(conditioning, name)
    if single and len(conditioning) != 1:
        raise ErasureError(f"{name} must be a single conditioning (the empty prompt), got {len(conditioning)} entries")
    return list(conditioning)


def check_width(conditioning, name: str, context_dim: int) -> None:
    """Refuse text encodings from another model family, naming both sizes."""
    for entry in conditioning:
        width = int(entry[0].shape[-1])
        if width != context_dim:
            raise ErasureError(
                f"{name} conditioning has width {width} ({family_name(width)} text encoder) but the model's "
                f"cross-attention takes {context_dim} ({family_name(context_dim)}); encode the prompt with the CLIP "
                "of the model you train")


def encode_entries(base_model, conditioning, latent_shape: Sequence[int], device, prompt_type: str,
                   seed: int) -> List[Cond]:
    """One dict of apply_model keyword tensors (batch 1) per conditioning entry, as comfy's samplers build them."""
    noise = torch.zeros((1, *latent_shape), device=device)
    encoded = []
    for context, options in conditioning:
        params = {k: v for k, v in options.items() if k != "model_conds"}
        params.update(cross_attn=context.clone(), device=device, noise=noise, latent_image=noise, seed=seed,
                      prompt_type=prompt_type)
        params.setdefault("width", latent_shape[-1] * 8)
        params.setdefault("height", latent_shape[-2] * 8)
        try:
            model_conds = base_model.extra_conds(**params)
        except KeyError as e:
            if e.args and e.args[0] == "pooled_output":
                raise ErasureError(f"this {type(base_model).__name__} model needs the pooled text embedding; the "
                                   f"{prompt_type} conditioning has none (use CLIP Text Encode with this model's CLIP)")
            raise
        cond = {}
        for key, value in model_conds.items():
            tensor = getattr(value, "cond", None)
            if torch.is_tensor(tensor):
                cond[key] = tensor.detach().clone().to(device)
        if "c_crossattn" not in cond:
            cond["c_crossattn"] = context.detach().clone().to(device)
        encoded.append(cond)
    return encoded


def stack(conds: Sequence[Cond], dtype: Optional[torch.dtype] = None) -> Cond:
    """One batch from per-sample conds; contexts of different lengths are repeated to a common length,
    which leaves attention unchanged (comfy's CONDCrossAttn does the same)."""
    out = {}
    for key in conds[0]:
        tensors = [c[key] for c in conds]
        if key == "c_crossattn":
            length = 1
            for t in tensors:
                length = length * t.shape[1] // math.gcd(length, t.shape[1])
            tensors = [t if t.shape[1] == length else t.repeat(1, length // t.shape[1], 1) for t in tensors]
        batch = torch.cat(tensors)
        out[key] = batch.to(dtype) if dtype is not None and batch.is_floating_point() else batch
    return out
