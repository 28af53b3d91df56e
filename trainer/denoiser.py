"""One UNet seen three ways: the frozen teacher, the student (deltas on), the student with the prompt attached."""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch

from ..erasure.concept_erasure import PromptPatch
from .conditioning import Cond
from .deltas import DeltaSet
from .prediction import model_output


class Denoiser:
    """Computes in the UNet's own dtype (trainable_model sets it to the compute dtype); outputs are float32."""

    def __init__(self, base_model, transformer_options: dict, device, deltas: Optional[DeltaSet],
                 prompt: Optional[PromptPatch], kind: str):
        """deltas None: a model used as it is (the attack's original and erased models), `deltas=` is ignored."""
        self.base = base_model
        self.deltas = deltas
        self.kind = kind
        self.sigma_data = float(getattr(self.base.model_sampling, "sigma_data", 1.0))
        self.device = device
        options = transformer_options
        self._plain = dict(options)
        self._prompted = dict(options)
        if prompt is not None:
            patches = dict(options.get("patches", {}))
            patches["attn2_patch"] = list(patches.get("attn2_patch", [])) + [prompt]
            self._prompted["patches"] = patches

    def denoised(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, *, deltas: bool, prompt: bool,
                 cond_or_uncond: Sequence[int] = (0,)) -> torch.Tensor:
        options = dict(self._prompted if prompt else self._plain)
        options["cond_or_uncond"] = list(cond_or_uncond)
        options["sigmas"] = sigma
        with self.deltas.switched(deltas) if self.deltas is not None else contextlib.nullcontext():
            return self.base.apply_model(x, sigma, transformer_options=options, **cond)

    def output(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, *, deltas: bool, prompt: bool,
               cond_or_uncond: Sequence[int] = (0,)) -> torch.Tensor:
        """The UNet's own prediction (eps for eps models, v for v models) in float32."""
        denoised = self.denoised(x, sigma, cond, deltas=deltas, prompt=prompt, cond_or_uncond=cond_or_uncond)
        return model_output(self.kind, x.float(), sigma.float(), denoised.float(), self.sigma_data)
