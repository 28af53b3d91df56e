"""One training iteration, shared by the real loop and by the memory plan's shape-only run of it.

Per iteration (x_t, t pairs come from trajectories sampled by the student, see trajectories.py):
  teacher (no deltas, no prompt), one batched call:   e0 = eps*(x_t, uncond), ep = eps*(x_t, c) [, eps*(x_t, c_p)]
  target = e0 - eta * (ep - e0)
  erase:    |eps_theta(x_t, c) - target|^2      without the prompt (lp, esd_*) or with it (lp_attached)
  key:      |eps_theta,P(x_t, c) - ep|^2         lp only: the prompt carries the concept, the weights lose it
  preserve: |eps_theta(x_t, c_p) - eps*(x_t, c_p)|^2   one preserved concept drawn per pair
"eps" is the UNet's own output: eps for eps models, v for v-prediction models (the ESD combination is affine,
so the same formula holds in either parameterisation).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from ..erasure.concept_erasure import PromptPatch
from .conditioning import CondBatch
from .deltas import DeltaSet, target_layers
from .denoiser import Denoiser
from .settings import TrainSettings


@dataclass
class Trainables:
    """What the optimizer changes: weight deltas (float32 masters), the prompt tokens, and the optimizer itself."""

    deltas: DeltaSet
    prompt: Optional[PromptPatch]
    optimizer: torch.optim.Optimizer

    def parameters(self) -> List[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]


def build_trainables(unet: torch.nn.Module, s: TrainSettings, context_dim: int, token_scale: float, device,
                     generator: torch.Generator, foreach: Optional[bool] = None) -> Trainables:
    deltas = DeltaSet(target_layers(unet, s.method), s.rank, generator, device)
    groups = [{"params": deltas.parameters(), "lr": s.learning_rate}]
    prompt = None
    if s.uses_prompt:  # initialised at the scale of the text encoder's tokens
        prompt_k = torch.nn.Parameter((torch.randn(s.prompt_tokens, context_dim, generator=generator)
                                       * token_scale).to(device))
        prompt_v = torch.nn.Parameter((torch.randn(s.prompt_tokens, context_dim, generator=generator)
                                       * token_scale).to(device))
        prompt = PromptPatch(prompt_k, prompt_v, s.placement)
        groups.append({"params": [prompt_k, prompt_v], "lr": s.prompt_learning_rate})
    return Trainables(deltas, prompt, torch.optim.Adam(groups, foreach=foreach))


def _mse(a: torch.Tensor, b: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean squared error; with per-pair weights, each pair's mean times its weight, averaged over pairs."""
    if weights is None:
        return F.mse_loss(a, b)
    return ((a - b).pow(2).flatten(1).mean(1) * weights).mean()


def loss_terms(denoiser: Denoiser, s: TrainSettings, x_t, sigma, uncond, concepts, preserves, backward,
               concept_weights: Optional[torch.Tensor] = None,
               preserve_weights: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """One iteration's loss terms, back-propagated (concepts / preserves: one cond per pair, or no preserves).

    concept_weights / preserve_weights: per pair (the conditioning's strength and range), None = all 1.
    """
    def run(conds, cond_or_uncond, x, sig, **views):
        return CondBatch(conds, cond_or_uncond).run(
            lambda xs, ss, cond, cu: denoiser.output(xs, ss, cond, cond_or_uncond=cu, **views), x, sig)

    chunks = 3 if preserves else 2
    with torch.no_grad():  # teacher: uncond, concept [, preserved concept] in one batch
        teacher = run([uncond] * len(concepts) + concepts + preserves, [1, 0, 0][:chunks],
                      x_t.repeat(chunks, 1, 1, 1), sigma.repeat(chunks), deltas=False, prompt=False)
    e0, ep, *kept = teacher.chunk(chunks)
    target = e0 - s.negative_guidance * (ep - e0)

    terms: Dict[str, torch.Tensor] = {}
    erase = s.erase_weight > 0
    if erase or preserves:  # student without the key prompt (with it for lp_attached): erase [+ preserve]
        parts = int(erase) + int(bool(preserves))
        student = run((concepts if erase else []) + preserves, [0] * parts, x_t.repeat(parts, 1, 1, 1),
                      sigma.repeat(parts), deltas=True, prompt=s.method == "lp_attached").chunk(parts)
        loss = 0.0
        if erase:
            terms["erase"] = _mse(student[0], target, concept_weights)
            loss = loss + s.erase_weight * terms["erase"]
        if preserves:
            terms["preserve"] = _mse(student[-1], kept[0], preserve_weights)
            loss = loss + s.preserve_weight * terms["preserve"]
        backward(loss)
    if s.trains_key:  # student with the key prompt reproduces the original concept
        keyed = run(concepts, [0], x_t, sigma, deltas=True, prompt=True)
        terms["key"] = _mse(keyed, ep, concept_weights)
        backward(s.key_weight * terms["key"])
    return terms


def optimizer_step(trainables: Trainables, scaler) -> None:
    if scaler is not None:
        scaler.step(trainables.optimizer)
        scaler.update()
    else:
        trainables.optimizer.step()
    trainables.optimizer.zero_grad(set_to_none=True)
