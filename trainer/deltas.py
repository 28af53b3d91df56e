"""Trainable weight deltas on the UNet, added by forward hooks so teacher and student share one set of weights.

The student is the model with the deltas switched on: each target layer's output gets F.linear / F.conv2d of
its input with the delta (full tensor) or with the LoRA factors (delta = up @ down * alpha / rank, the kohya
convention of erasure.LowRankDelta). Switched off, the same module is the frozen teacher.

alpha "rank" scales the factors' product by 1; alpha "fan_in" by the layer's fan_in / rank, so that one Adam step
on the factors changes the layer's output about as much as a step at the same rate on a full delta (which moves
each of its fan_in weights per output by about the rate); learning_rate then means the same for any rank.
(The node's factor_alpha "auto" picks one of the two: TrainSettings.factor_scale.)
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List

import torch
import torch.nn.functional as F

from ..erasure.concept_erasure import Delta, ErasureError, LowRankDelta
from .settings import FACTOR_SCALES

ATTN2_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
_ESD_U_EXCLUDED_PREFIXES = ("time_embed.", "label_emb.", "out.")


def target_layers(unet: torch.nn.Module, method: str) -> Dict[str, torch.nn.Module]:
    """ModelPatcher weight keys -> modules that the method trains.

    esd_x, lp, lp_attached: the cross-attention projections (attn2 q, k, v, out) of every transformer block.
    esd_u: every other linear and conv weight, except the time (and SDXL size/pooled) embeddings and the output
    layer, as in ESD's 'noxattn'. Norms and biases are not trained.
    """
    layers = {}
    for name, module in unet.named_modules():
        if method == "esd_u":
            if "attn2" in name.split(".") or name.startswith(_ESD_U_EXCLUDED_PREFIXES):
                continue
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and module.weight is not None:
                layers[f"diffusion_model.{name}.weight"] = module
        elif name.endswith("attn2") and hasattr(module, "to_k"):
            for proj in ATTN2_PROJECTIONS:
                layers[f"diffusion_model.{name}.{proj}.weight"] = module.get_submodule(proj)
    if not layers:
        raise ErasureError(f"the UNet has no layers for method {method}")
    return layers


class DeltaSet:
    """The trainable deltas of one run (rank 0: full tensors; rank > 0: LoRA factors, alpha per factor_alpha)."""

    def __init__(self, layers: Dict[str, torch.nn.Module], rank: int, generator: torch.Generator, device,
                 factor_alpha: str = "fan_in"):
        if factor_alpha not in FACTOR_SCALES:
            raise ErasureError(f"factor_alpha must be one of {', '.join(FACTOR_SCALES)}, got {factor_alpha!r}")
        self.layers = layers
        self.rank = rank
        self.alphas: Dict[str, float] = {}
        self.enabled = False
        self.full: Dict[str, torch.nn.Parameter] = {}
        self.up: Dict[str, torch.nn.Parameter] = {}
        self.down: Dict[str, torch.nn.Parameter] = {}
        for key, module in layers.items():
            shape = tuple(module.weight.shape)
            if isinstance(module, torch.nn.Conv2d) and module.groups != 1:
                raise ErasureError(f"cannot train grouped convolution {key}")
            if rank == 0:
                self.full[key] = torch.nn.Parameter(torch.zeros(shape, device=device))
            else:
                fan_in = 1
                for s in shape[1:]:
                    fan_in *= s
                down = torch.randn((rank, *shape[1:]), generator=generator) / fan_in ** 0.5
                self.alphas[key] = float(fan_in if factor_alpha == "fan_in" else rank)
                self.down[key] = torch.nn.Parameter(down.to(device))
                self.up[key] = torch.nn.Parameter(torch.zeros((shape[0], rank), device=device))

    def parameters(self) -> List[torch.nn.Parameter]:
        return list(self.full.values()) + list(self.down.values()) + list(self.up.values())

    def _output(self, key: str, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        conv = isinstance(module, torch.nn.Conv2d)
        if self.rank == 0:
            delta = self.full[key].to(x.dtype)
            if conv:
                return F.conv2d(x, delta, None, module.stride, module.padding, module.dilation)
            return F.linear(x, delta)
        down, up = self.down[key].to(x.dtype), self.up[key].to(x.dtype)
        scale = self.alphas[key] / self.rank
        if conv:
            hidden = F.conv2d(x, down, None, module.stride, module.padding, module.dilation)
            return F.conv2d(hidden, up[:, :, None, None]) * scale
        return F.linear(F.linear(x, down), up) * scale

    @contextlib.contextmanager
    def attached(self) -> Iterator["DeltaSet"]:
        handles = []
        try:
            for key, module in self.layers.items():
                def hook(mod, args, output, key=key):
                    if not self.enabled:
                        return None
                    return output + self._output(key, mod, args[0]).to(output.dtype)
                handles.append(module.register_forward_hook(hook))
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self.enabled = False

    @contextlib.contextmanager
    def switched(self, on: bool) -> Iterator[None]:
        before, self.enabled = self.enabled, on
        try:
            yield
        finally:
            self.enabled = before

    def export(self, scale: float = 1.0) -> Dict[str, Delta]:
        """The deltas as the erasure stores them, times scale: float32 on the CPU, keyed like ModelPatcher weights
        (factors: the up factor scaled, so alpha stays the layer's)."""
        if self.rank == 0:
            return {k: (p.detach().float() * scale).cpu() for k, p in self.full.items()}
        return {k: LowRankDelta((self.up[k].detach().float() * scale).cpu(),
                                self.down[k].detach().float().cpu().clone(), self.alphas[k]) for k in self.layers}
