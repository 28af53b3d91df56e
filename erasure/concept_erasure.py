"""The erasure object and how it patches a ComfyUI ModelPatcher.

An erasure is what training produces (Bui et al., arXiv 2403.12326): learnable prompt tokens P_k / P_v that
are concatenated to the text context of the cross-attention (attn2) keys and values in some UNet blocks, plus
weight deltas keyed by ModelPatcher state-dict keys. Applying never touches the input model: it clones it.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

import torch

import comfy.lora

PLACEMENTS = ("mid", "midout", "all")
_PLACEMENT_BLOCKS = {
    "mid": ("middle",),
    "midout": ("middle", "output"),
    "all": ("input", "middle", "output"),
}
FAMILY_BY_CONTEXT_DIM = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}
MAX_PROMPT_TOKENS = 1024
# A delta may only name the weight of a UNet module: never a bias, a buffer or anything outside diffusion_model
# (model_sampling, the latent format, ...). check_compatible also requires the module to be a linear or conv layer.
_UNET_WEIGHT_KEY = re.compile(r"diffusion_model(\.[A-Za-z0-9_]+)+\.weight")
_PATCHABLE_LAYERS = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


class ErasureError(ValueError):
    """Bad erasure input: a file, a model or a setting that does not fit. Nothing was changed."""


def family_name(context_dim: int) -> str:
    return FAMILY_BY_CONTEXT_DIM.get(int(context_dim), f"context dim {context_dim}")


@dataclass
class LowRankDelta:
    """delta = up @ down * (alpha / rank), reshaped to the weight's shape (kohya LoRA convention).

    up is [out, rank]; down is [rank, *in_shape] (in_shape is [in] for linear, [in, kh, kw] for conv).
    """

    up: torch.Tensor
    down: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.up.shape[0], *self.down.shape[1:]))

    def full(self) -> torch.Tensor:
        product = self.up.reshape(self.up.shape[0], -1).float() @ self.down.reshape(self.rank, -1).float()
        return (product * (self.alpha / self.rank)).reshape(self.shape)


Delta = Union[torch.Tensor, LowRankDelta]


@dataclass
class ConceptErasure:
    """What an erasure is, independent of any file or model."""

    context_dim: int
    prompt_k: Optional[torch.Tensor] = None
    prompt_v: Optional[torch.Tensor] = None
    placement: str = "mid"
    deltas: Dict[str, Delta] = field(default_factory=dict)
    prompt_at_inference: bool = False
    concepts: List[str] = field(default_factory=list)
    method: str = ""
    settings: Dict[str, Any] = field(default_factory=dict)
    base_model: str = ""
    pack_version: str = ""
    created: str = ""

    def __post_init__(self):
        self.validate()

    @property
    def token_count(self) -> int:
        return 0 if self.prompt_k is None else int(self.prompt_k.shape[0])

    @property
    def has_prompt(self) -> bool:
        return self.token_count > 0

    def validate(self, source: str = "erasure") -> None:
        if self.placement not in PLACEMENTS:
            raise ErasureError(f"{source}: placement must be one of {', '.join(PLACEMENTS)}, got {self.placement!r}")
        if (self.prompt_k is None) != (self.prompt_v is None):
            raise ErasureError(f"{source}: prompt tokens need both P_k and P_v; only one is present")
        if self.prompt_k is not None:
            for name, t in (("P_k", self.prompt_k), ("P_v", self.prompt_v)):
                if t.ndim != 2 or t.shape[1] != self.context_dim:
                    raise ErasureError(
                        f"{source}: {name} must have shape [tokens, {self.context_dim}] "
                        f"(the context dimension), got {list(t.shape)}")
                if not t.is_floating_point():
                    raise ErasureError(f"{source}: {name} must be a floating-point tensor, got {t.dtype}")
                if not 1 <= t.shape[0] <= MAX_PROMPT_TOKENS:
                    raise ErasureError(f"{source}: {name} has {t.shape[0]} tokens; a prompt has 1 to "
                                       f"{MAX_PROMPT_TOKENS}")
                _check_finite(source, name, t)
            if self.prompt_k.shape != self.prompt_v.shape:
                raise ErasureError(f"{source}: P_k {list(self.prompt_k.shape)} and P_v "
                                   f"{list(self.prompt_v.shape)} must have the same shape")
        for key, delta in self.deltas.items():
            _check_delta(source, key, delta)

    def replace(self, **changes) -> "ConceptErasure":
        return dataclasses.replace(self, **changes)


def _check_finite(source: str, name: str, t: torch.Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ErasureError(f"{source}: {name} holds {bad} NaN or infinite value(s)")


def _check_delta(source: str, key: str, delta: Delta) -> None:
    low_rank = isinstance(delta, LowRankDelta)
    tensors = (delta.up, delta.down) if low_rank else (delta,)
    for t in tensors:
        if not torch.is_tensor(t) or not t.is_floating_point():
            raise ErasureError(f"{source}: delta for {key} must be floating point, got "
                               f"{t.dtype if torch.is_tensor(t) else type(t).__name__}")
    if low_rank:
        if delta.up.ndim != 2 or delta.down.ndim < 2 or delta.up.shape[1] != delta.down.shape[0]:
            raise ErasureError(f"{source}: low-rank delta for {key} has up {list(delta.up.shape)} and down "
                               f"{list(delta.down.shape)}; up must be [out, rank] and down [rank, ...]")
        if delta.rank == 0:
            raise ErasureError(f"{source}: low-rank delta for {key} has rank 0 (no factors)")
    if any(t.numel() == 0 for t in tensors):
        raise ErasureError(f"{source}: delta for {key} is empty (a dimension of size 0)")
    if not _UNET_WEIGHT_KEY.fullmatch(key):
        raise ErasureError(f"{source}: delta key {key!r} is not a UNet weight; an erasure may only change the "
                           "weights of the UNet's linear and convolution layers (diffusion_model.<layer>.weight)")
    if low_rank:
        _check_finite(source, f"the low-rank delta for {key} (up)", delta.up)
        _check_finite(source, f"the low-rank delta for {key} (down)", delta.down)
        if not isinstance(delta.alpha, (int, float)) or not math.isfinite(delta.alpha):
            raise ErasureError(f"{source}: the low-rank delta for {key} has alpha {delta.alpha!r}; it must be a "
                               "finite number")
        # Finite factors can still overflow float32 when multiplied out (up @ down * alpha / rank).
        bound = float(delta.up.abs().max()) * float(delta.down.abs().max()) * delta.rank
        if not max(bound, bound * abs(delta.alpha) / delta.rank) < _FLOAT32_MAX / 2:
            raise ErasureError(f"{source}: the low-rank delta for {key} overflows float32 when multiplied out "
                               "(up @ down * alpha / rank)")
    else:
        _check_finite(source, f"the delta for {key}", delta)


class PromptPatch:
    """attn2 patch that appends P_k to the context feeding the keys and P_v to the one feeding the values."""

    def __init__(self, prompt_k: torch.Tensor, prompt_v: torch.Tensor, placement: str):
        self.prompt_k = prompt_k
        self.prompt_v = prompt_v
        self.placement = placement
        self.blocks = _PLACEMENT_BLOCKS[placement]

    def applies_to(self, extra_options: dict) -> bool:
        block = extra_options.get("block")
        if block is None:
            return self.placement == "all"
        return block[0] in self.blocks

    def __call__(self, n, context, value, extra_options):
        if not self.applies_to(extra_options):
            return n, context, value
        return n, self._append(context, self.prompt_k), self._append(value, self.prompt_v)

    @staticmethod
    def _append(context: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.to(device=context.device, dtype=context.dtype)
        return torch.cat([context, tokens.unsqueeze(0).expand(context.shape[0], -1, -1)], dim=1)

    def to(self, device):
        # ModelPatcher.model_patches_to moves patches to the sampling device before sampling.
        return PromptPatch(self.prompt_k.to(device), self.prompt_v.to(device), self.placement)


def _diffusion_model(model) -> torch.nn.Module:
    inner = getattr(model, "model", None)
    unet = getattr(inner, "diffusion_model", None)
    if unet is None:
        raise ErasureError(f"expected a ComfyUI MODEL (ModelPatcher), got {type(model).__name__}")
    return unet


def cross_attention_layers(model) -> Dict[str, torch.nn.Module]:
    """Names (as in the ModelPatcher state dict, without '.weight') of the UNet's attn2 modules."""
    unet = _diffusion_model(model)
    if not all(hasattr(unet, name) for name in ("input_blocks", "middle_block", "output_blocks")):
        raise ErasureError(
            f"the model is a {type(unet).__name__}, not a Stable Diffusion UNet; concept erasure patches the "
            "UNet cross-attention (attn2) of SD1.x, SD2.x and SDXL models")
    layers = {f"diffusion_model.{name}": m for name, m in unet.named_modules()
              if name.endswith("attn2") and hasattr(m, "to_k")}
    if not layers:
        raise ErasureError(f"the model's {type(unet).__name__} has no cross-attention (attn2) layers to patch")
    return layers


def model_context_dim(model) -> int:
    dims = {int(m.to_k.in_features) for m in cross_attention_layers(model).values()}
    if len(dims) != 1:
        raise ErasureError(f"the model's cross-attention layers take different context sizes {sorted(dims)}")
    return dims.pop()


def model_family(model) -> str:
    config = getattr(getattr(model, "model", None), "model_config", None)
    return type(config).__name__ if config is not None else family_name(model_context_dim(model))


def _layer_of_weight(unet: torch.nn.Module, key: str) -> Optional[torch.nn.Module]:
    """The module whose `weight` the ModelPatcher key names, or None when the key names no module's weight."""
    path = key[len("diffusion_model."):-len(".weight")]
    try:
        layer = unet.get_submodule(path)
    except AttributeError:
        return None
    return layer if isinstance(getattr(layer, "weight", None), torch.Tensor) else None


def check_compatible(model, erasure: ConceptErasure) -> None:
    """Raise ErasureError naming both sides when the erasure cannot be applied to this model."""
    erasure.validate()  # again: the object may have been changed since it was made or loaded
    model_dim = model_context_dim(model)
    if model_dim != erasure.context_dim:
        raise ErasureError(
            f"this erasure was made for {family_name(erasure.context_dim)} models (cross-attention context "
            f"{erasure.context_dim}{', base ' + erasure.base_model if erasure.base_model else ''}) but the model "
            f"is {family_name(model_dim)} (context {model_dim}); use an erasure trained on this model family")
    if not erasure.deltas:
        return
    state = model.model.state_dict()
    missing = [k for k in erasure.deltas if k not in state]
    if missing:
        raise ErasureError(
            f"the erasure changes {len(missing)} weight(s) the model does not have, e.g. {missing[0]!r} "
            f"(erasure base {erasure.base_model or '?'}, model {model_family(model)})")
    unet = _diffusion_model(model)
    for key in erasure.deltas:
        layer = _layer_of_weight(unet, key)
        if not isinstance(layer, _PATCHABLE_LAYERS):
            what = f"a {type(layer).__name__}" if layer is not None else "no layer"
            raise ErasureError(
                f"the erasure changes {key!r}, the weight of {what}, not of a linear or convolution layer; an erasure "
                "may only change the weights of the UNet's linear and convolution layers")
    for key, delta in erasure.deltas.items():
        if tuple(delta.shape) != tuple(state[key].shape):
            raise ErasureError(
                f"the erasure's delta for {key!r} has shape {list(delta.shape)} but the model's weight has "
                f"{list(state[key].shape)} (erasure base {erasure.base_model or '?'}, model {model_family(model)})")


def weight_patches(erasure: ConceptErasure) -> Dict[str, tuple]:
    """Patches for ModelPatcher.add_patches in the host's own formats: full deltas as plain diffs, low-rank deltas
    as the host's LoRA patches (made by its own LoRA reader), which it expands one weight at a time when it
    patches that weight, instead of a full-size float32 copy of every delta up front."""
    patches = {key: (delta,) for key, delta in erasure.deltas.items() if not isinstance(delta, LowRankDelta)}
    state, names = {}, {}
    for index, (key, delta) in enumerate((k, d) for k, d in erasure.deltas.items() if isinstance(d, LowRankDelta)):
        name = f"concept_erasure.{index}"
        names[name] = key
        state[f"{name}.lora_up.weight"] = delta.up
        state[f"{name}.lora_down.weight"] = delta.down
        state[f"{name}.alpha"] = torch.tensor(float(delta.alpha))
    if state:
        patches.update(comfy.lora.load_lora(state, names))
    return patches


def apply_erasure(model, erasure: ConceptErasure, strength: float = 1.0, attach_prompt: Optional[bool] = None):
    """Return a clone of `model` with the erasure's deltas (scaled by strength) and, when asked, its prompt.

    attach_prompt=None follows the erasure's own flag (Apply); True always attaches it (Recover, the key).
    Strength 0 returns an unchanged clone: the prompt is attached only when the erasure is switched on.
    """
    check_compatible(model, erasure)
    patched = model.clone()
    if strength == 0:
        return patched
    if erasure.deltas:
        applied = patched.add_patches(weight_patches(erasure), float(strength))
        if len(applied) != len(erasure.deltas):
            raise ErasureError(f"the host accepted {len(applied)} of {len(erasure.deltas)} weight deltas")
    if attach_prompt is None:
        attach_prompt = erasure.prompt_at_inference
    if attach_prompt and erasure.has_prompt:
        patched.set_model_attn2_patch(PromptPatch(erasure.prompt_k, erasure.prompt_v, erasure.placement))
    return patched
