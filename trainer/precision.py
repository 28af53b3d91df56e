"""What the `dtype` setting means: the one dtype the UNet computes in while training.

Training holds the frozen UNet's weights in that dtype (converted for the run when ComfyUI loaded them in another,
see host_autograd.trainable_model) and uses no autocast, so there are no per-call cast copies of frozen weights.
The trainable deltas and prompt tokens stay float32 (master copies); fp16 adds a loss scaler.
"""
from __future__ import annotations

from collections import Counter
from typing import Callable, Optional

import torch

import comfy.model_management

from ..erasure.concept_erasure import ErasureError

NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_BY_NAME = {name: dtype for dtype, name in NAMES.items()}


def weight_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype most of the module's floating-point weights (by element count) are stored in."""
    counts: Counter = Counter()
    for p in module.parameters():
        if p.is_floating_point():
            counts[p.dtype] += p.numel()
    return counts.most_common(1)[0][0] if counts else torch.float32


def native_bf16(device) -> bool:
    """ComfyUI's own check: bf16 that the device runs natively (not emulated, as on a T4 or an RTX 20xx)."""
    return bool(comfy.model_management.should_use_bf16(torch.device(device)))


def compute_dtype(setting: str, device, stored: torch.dtype,
                  bf16_native: Optional[Callable[[object], bool]] = None) -> torch.dtype:
    """The dtype training computes in.

    auto: the dtype ComfyUI loaded the UNet in when it is 16-bit (no copy of the weights is needed); for fp32
    weights, fp32 on the CPU and bf16 (natively) or fp16 on an accelerator.
    fp32 / fp16 / bf16: exactly that; bf16 is refused on an accelerator that only emulates it.
    """
    device = torch.device(device)
    bf16_native = bf16_native or native_bf16
    if setting == "auto":
        if stored in (torch.float16, torch.bfloat16):
            return stored
        if device.type == "cpu":
            return torch.float32
        return torch.bfloat16 if bf16_native(device) else torch.float16
    if setting not in _BY_NAME:
        raise ErasureError(f"dtype must be one of auto, {', '.join(_BY_NAME)}, got {setting!r}")
    dtype = _BY_NAME[setting]
    if dtype == torch.bfloat16 and device.type != "cpu" and not bf16_native(device):
        raise ErasureError(f"dtype bf16: {device} does not run bf16 natively (ComfyUI's check), so it would be "
                           "emulated and slow; use dtype auto or fp16")
    return dtype


def needs_loss_scaler(dtype: torch.dtype) -> bool:
    """fp16 gradients underflow without scaling; bf16 and fp32 have fp32's exponent range."""
    return dtype == torch.float16


def loss_scaler(dtype: torch.dtype, device):
    if not needs_loss_scaler(dtype):
        return None
    # A modest first scale: the default 65536 overflows fp16 activations' gradients and skips the first steps.
    return torch.amp.GradScaler(torch.device(device).type, init_scale=1024.0)
