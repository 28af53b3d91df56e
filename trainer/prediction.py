"""The model's own parameterisation (eps or v) and the sampling schedule, from comfy's model_sampling."""
from __future__ import annotations

import torch

import comfy.model_sampling

from ..erasure.concept_erasure import ErasureError


def prediction_kind(model_sampling) -> str:
    """'eps' or 'v': what the UNet outputs. Other kinds (EDM, flow) are not Stable Diffusion UNets."""
    if not hasattr(model_sampling, "sigmas"):
        raise ErasureError(f"the model samples with {type(model_sampling).__name__}, not a discrete DDPM schedule; "
                           "concept erasure trains SD1.x, SD2.x and SDXL UNets")
    # The first class in the MRO that defines calculate_denoised is the prediction type (EDM subclasses V, etc.).
    decider = next((c for c in type(model_sampling).__mro__ if "calculate_denoised" in vars(c)), None)
    if decider is comfy.model_sampling.EPS:
        return "eps"
    if decider is comfy.model_sampling.V_PREDICTION:
        return "v"
    raise ErasureError(f"unsupported prediction type {getattr(decider, '__name__', '?')}: only eps- and "
                       "v-prediction models can be trained")


def model_output(kind: str, x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor,
                 sigma_data: float = 1.0) -> torch.Tensor:
    """Invert comfy's calculate_denoised: the raw UNet output (eps, or v) for input x at noise level sigma."""
    s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    if kind == "eps":
        return (x - denoised) / s
    total = s ** 2 + sigma_data ** 2
    return (x * sigma_data ** 2 / total - denoised) * total.sqrt() / (s * sigma_data)


def sampling_schedule(model_sampling, steps: int):
    """Evenly spaced discrete timesteps from the last to 0 (DDIM's spacing) and their sigmas, plus a final 0.

    Returns (timesteps [steps] long, sigmas [steps + 1] float32, all_sigmas [T] float32), on the CPU.
    """
    all_sigmas = model_sampling.sigmas.detach().float().cpu()
    last = all_sigmas.shape[0] - 1
    timesteps = torch.linspace(last, 0, steps).round().long()
    sigmas = torch.cat([all_sigmas[timesteps], torch.zeros(1)])
    return timesteps, sigmas, all_sigmas
