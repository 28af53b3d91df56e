"""CONDITIONING (from CLIPTextEncode) turned into the keyword arguments of `BaseModel.apply_model`.

A CONDITIONING is a list of [context tensor [1, tokens, width], options dict]; several entries come from
Conditioning (Combine). Each entry is encoded once, through the model's own `extra_conds` (which adds the
pooled `y` for SDXL), and later batched, one model call per context length.

Options that samplers (not the model) read are honoured where they mean something for erasure: a strength
(Conditioning (Set Area Strength)) weights that entry's loss terms, a timestep range (ConditioningSetTimestepRange)
restricts its training pairs to that range. Areas, masks, ControlNets and the like are refused.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..erasure.concept_erasure import ErasureError

Cond = Dict[str, torch.Tensor]

# Sampler options the trainer cannot honour, and why. (mask_strength, set_area_to_bounds and
# control_apply_to_uncond only act together with one of these, as in comfy's samplers.)
_REFUSED = {
    "area": "an area (Conditioning (Set Area)); an erasure is learned on whole images, not on a region",
    "mask": "a mask (Conditioning (Set Mask)); an erasure is learned on whole images, not on a region",
    "control": "a ControlNet; training does not run ControlNets",
    "gligen": "GLIGEN boxes; training does not run GLIGEN",
    "hooks": "conditioning hooks; training does not apply them (apply LoRAs to the model instead)",
    "default": "the default-conditioning flag of Set Default Combine; training has no areas to fill",
    "timestep_start": "a sampler's internal timestep bound; set the range with ConditioningSetTimestepRange",
    "timestep_end": "a sampler's internal timestep bound; set the range with ConditioningSetTimestepRange",
}


@dataclass
class Prompt:
    """One conditioning entry as the trainer uses it."""

    context: torch.Tensor                        # [1, tokens, width]
    options: dict                                # passed to the model's extra_conds, as a sampler does
    weight: float = 1.0                          # the entry's strength: the weight of its loss terms
    timesteps: Optional[Tuple[int, int]] = None  # discrete timesteps (low, high) it trains on; None = all

    def record(self) -> dict:
        return {"strength": self.weight, "timesteps": list(self.timesteps) if self.timesteps else None}


def _number(value, what: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise ErasureError(f"{what} must be a number from {low:g} to {high:g}, got {value!r}")
    return float(value)


def _timestep_range(options: dict, what: str, model_sampling) -> Optional[Tuple[int, int]]:
    """The discrete timesteps inside the entry's start/end percent, as comfy's samplers compute the range."""
    start = _number(options.get("start_percent", 0.0), f"{what} start_percent", 0.0, 1.0)
    end = _number(options.get("end_percent", 1.0), f"{what} end_percent", 0.0, 1.0)
    if "clip_start_percent" in options:  # a scheduled CLIP hook narrows the range (upstream)
        start = max(start, _number(options["clip_start_percent"], f"{what} clip_start_percent", 0.0, 1.0))
        end = min(end, _number(options.get("clip_end_percent", 1.0), f"{what} clip_end_percent", 0.0, 1.0))
    if start == 0.0 and end == 1.0:
        return None
    high, low = float(model_sampling.percent_to_sigma(start)), float(model_sampling.percent_to_sigma(end))
    sigmas = model_sampling.sigmas.detach().double().cpu()
    # A sampler uses the entry while timestep_end <= sigma <= timestep_start; allow for float32 rounding.
    inside = ((sigmas <= high * (1 + 1e-6)) & (sigmas >= low * (1 - 1e-6))).nonzero().flatten()
    if inside.numel() == 0:
        raise ErasureError(f"{what} has the timestep range {start:g} to {end:g}, which holds no timestep of the "
                           "model's schedule; widen it (ConditioningSetTimestepRange)")
    first, last = int(inside.min()), int(inside.max())
    return None if (first, last) == (0, sigmas.shape[0] - 1) else (first, last)


def read_prompts(conditioning, name: str, model_sampling) -> List[Prompt]:
    """The entries with their sampler options checked: strength and timestep range kept, the rest refused.

    The unconditional prompt is the reference of the ESD target: a strength or a range means nothing there.
    """
    prompts = []
    for index, (context, options) in enumerate((entry[0], entry[1]) for entry in conditioning):
        what = f"{name} entry {index + 1}" if len(conditioning) > 1 else name
        for key, reason in _REFUSED.items():
            if options.get(key) is not None and options.get(key) is not False:
                raise ErasureError(f"{what} has {reason}. Remove that node before the trainer")
        weight = _number(options.get("strength", 1.0), f"{what} strength", 0.0, math.inf)
        timesteps = _timestep_range(options, what, model_sampling)
        if name == "unconditional" and (weight != 1.0 or timesteps is not None):
            raise ErasureError(f"{what} has a strength or a timestep range; the unconditional prompt is the "
                               "reference of the erasure target, so neither has a meaning there. Set them on the "
                               "concept instead")
        prompts.append(Prompt(context, options, weight, timesteps))
    if name == "concept" and not any(p.weight > 0 for p in prompts):
        raise ErasureError("every concept has strength 0: there is nothing to erase")
    return prompts


def pair_weights(prompts: Sequence[Prompt], device, sigma: Optional[torch.Tensor] = None,
                 all_sigmas: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """Per training pair: the strength of its prompt, 0 where sigma (if given) is outside the prompt's range.
    None when every weight would be 1 (plain mean losses)."""
    if all(p.weight == 1.0 and (sigma is None or p.timesteps is None) for p in prompts):
        return None
    weights = torch.tensor([p.weight for p in prompts], dtype=torch.float32)
    if sigma is not None:
        sigma = sigma.detach().float().cpu()
        for i, p in enumerate(prompts):
            if p.timesteps is not None and not all_sigmas[p.timesteps[0]] <= sigma[i] <= all_sigmas[p.timesteps[1]]:
                weights[i] = 0.0
    return weights.to(device)


def weighted_mse(a: torch.Tensor, b: torch.Tensor, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean squared error; with per-pair weights (pair_weights), each pair's mean times its weight, averaged."""
    if weights is None:
        return torch.nn.functional.mse_loss(a, b)
    return ((a - b).pow(2).flatten(1).mean(1) * weights).mean()


def encode_text(clip, text: str) -> list:
    """A CONDITIONING for `text`, exactly as CLIP Text Encode makes it on this host (upstream schedules hooks, the
    fork returns the pooled output beside the tokens)."""
    tokens = clip.tokenize(text)
    if hasattr(clip, "encode_from_tokens_scheduled"):
        return clip.encode_from_tokens_scheduled(tokens)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


def encode_entries(base_model, conditioning, latent_shape: Sequence[int], device, prompt_type: str,
                   seed: int) -> List[Cond]:
    """One dict of apply_model keyword tensors (batch 1) per conditioning entry (a Prompt or [context, options]),
    as comfy's samplers build them."""
    noise = torch.zeros((1, *latent_shape), device=device)
    encoded = []
    for entry in conditioning:
        context, options = (entry.context, entry.options) if isinstance(entry, Prompt) else (entry[0], entry[1])
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
    """One batch from per-sample conds of one context length (CondBatch groups them)."""
    if len({c["c_crossattn"].shape[1] for c in conds}) > 1:
        raise ValueError("contexts of different lengths: batch them with CondBatch")
    out = {}
    for key in conds[0]:
        batch = torch.cat([c[key] for c in conds])
        out[key] = batch.to(dtype) if dtype is not None and batch.is_floating_point() else batch
    return out


class CondBatch:
    """The conds of one forward batch (one per row), run as one model call per context length.

    Attention must see each text encoding as it is. Repeating a shorter context to a common length leaves plain
    cross-attention unchanged, but not once tokens are appended to it (the learnable prompt, other attn2 patches):
    the repeated text would outweigh them.
    """

    def __init__(self, conds: Sequence[Cond], cond_or_uncond: Sequence[int] = (0,)):
        lengths = [c["c_crossattn"].shape[1] for c in conds]
        if len(set(lengths)) == 1:
            self.groups = [(None, stack(conds), list(cond_or_uncond))]
            self.order = None
            return
        per_chunk = len(conds) // len(cond_or_uncond)
        labels = [label for label in cond_or_uncond for _ in range(per_chunk)]  # one cond_or_uncond per row
        self.groups = []
        for length in sorted(set(lengths)):
            rows = [i for i, n in enumerate(lengths) if n == length]
            self.groups.append((torch.tensor(rows), stack([conds[i] for i in rows]), [labels[i] for i in rows]))
        self.order = torch.argsort(torch.cat([rows for rows, _, _ in self.groups]))

    def run(self, forward: Callable[..., torch.Tensor], x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """forward(x, sigma, cond, cond_or_uncond) on every group; rows come back in the order of the conds."""
        if self.order is None:
            _, cond, cond_or_uncond = self.groups[0]
            return forward(x, sigma, cond, cond_or_uncond)
        outs = [forward(x[rows.to(x.device)], sigma[rows.to(sigma.device)], cond, labels)
                for rows, cond, labels in self.groups]
        return torch.cat(outs)[self.order.to(outs[0].device)]
