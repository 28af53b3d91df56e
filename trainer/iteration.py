"""One training iteration, shared by the real loop and by the memory plan's shape-only run of it.

Per iteration (x_t, t pairs come from trajectories sampled by the student, see trajectories.py):
  teacher (no deltas, no prompt), one batched call:   e0 = eps*(x_t, uncond), ep = eps*(x_t, c) [, eps*(x_t, c_p)]
  target = e0 - eta * (ep - e0)
  erase:    |eps_theta(x_t, c) - target|^2      without the prompt (lp, esd_*) or with it (lp_attached)
  key:      |eps_theta,P(x_t, c) - ep|^2         lp only: the prompt carries the concept, the weights lose it
  preserve: |eps_theta(x_p, c_p) - eps*(x_p, c_p)|^2   one preserved concept drawn per pair, on its own images x_p
            (preserve_images own: the original's trajectories for c_p) or on the concept's x_t (concept)
  erase_adv (adversarial_steps > 0): |eps_theta(x_t, c + a) - target|^2, where the tokens a are appended to the
            concept's text and, every adversarial_every iterations, refitted for adversarial_steps steps so that
            eps_theta(x_t, c + a) = ep (attack.py: the attack, against the current student)
"eps" is the UNet's own output: eps for eps models, v for v-prediction models (the ESD combination is affine,
so the same formula holds in either parameterisation).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from ..erasure.concept_erasure import PromptPatch
from .adversary import Adversary
from .conditioning import CondBatch, weighted_mse
from .deltas import DeltaSet, target_layers
from .denoiser import Denoiser
from .settings import TrainSettings


@dataclass
class Trainables:
    """What the optimizer changes: weight deltas (float32 masters), the prompt tokens, and the optimizer itself;
    and the adversary of robust training (its tokens have their own optimizer)."""

    deltas: DeltaSet
    prompt: Optional[PromptPatch]
    optimizer: torch.optim.Optimizer
    adversary: Optional[Adversary] = None

    def parameters(self) -> List[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]


def build_trainables(unet: torch.nn.Module, s: TrainSettings, context_dim: int, token_scale: float, device,
                     generator: torch.Generator, foreach: Optional[bool] = None) -> Trainables:
    deltas = DeltaSet(target_layers(unet, s.method), s.rank, generator, device, s.factor_scale)
    groups = [{"params": deltas.parameters(), "lr": s.learning_rate}]
    prompt = None
    if s.uses_prompt:  # initialised at the scale of the text encoder's tokens
        prompt_k = torch.nn.Parameter((torch.randn(s.prompt_tokens, context_dim, generator=generator)
                                       * token_scale).to(device))
        prompt_v = torch.nn.Parameter((torch.randn(s.prompt_tokens, context_dim, generator=generator)
                                       * token_scale).to(device))
        prompt = PromptPatch(prompt_k, prompt_v, s.placement)
        groups.append({"params": [prompt_k, prompt_v], "lr": s.prompt_learning_rate})
    adversary = Adversary(s.adversarial_tokens, s.adversarial_learning_rate, generator) if s.adversarial else None
    return Trainables(deltas, prompt, torch.optim.Adam(groups, foreach=foreach), adversary)


def loss_terms(denoiser: Denoiser, s: TrainSettings, x_t, sigma, uncond, concepts, preserves, backward,
               concept_weights: Optional[torch.Tensor] = None,
               preserve_weights: Optional[torch.Tensor] = None, adversary: Optional[Adversary] = None,
               iteration: int = 0, check_interrupt: Callable[[], None] = lambda: None,
               preserve_at=None) -> Dict[str, torch.Tensor]:
    """One iteration's loss terms, back-propagated (concepts / preserves: one cond per pair, or no preserves).

    concept_weights / preserve_weights: per pair (the conditioning's strength and range), None = all 1.
    adversary: robust training's (Trainables.adversary); iteration (0-based) says when its tokens are refitted.
    preserve_at: (x_p, sigma_p) where the preserve pairs are evaluated; None = the concept's (x_t, sigma).
    """
    x_p, sigma_p = preserve_at if preserve_at is not None else (x_t, sigma)

    def rows(parts: int, preserved: bool):
        """x and sigma for `parts` chunks of the concept's pairs, then the preserve pairs' chunk if `preserved`."""
        return (torch.cat([x_t] * parts + ([x_p] if preserved else [])),
                torch.cat([sigma] * parts + ([sigma_p] if preserved else [])))

    def run(conds, cond_or_uncond, x, sig, **views):
        return CondBatch(conds, cond_or_uncond).run(
            lambda xs, ss, cond, cu: denoiser.output(xs, ss, cond, cond_or_uncond=cu, **views), x, sig)

    chunks = 3 if preserves else 2
    with torch.no_grad():  # teacher: uncond, concept [, preserved concept] in one batch
        teacher = run([uncond] * len(concepts) + concepts + preserves, [1, 0, 0][:chunks],
                      *rows(2, bool(preserves)), deltas=False, prompt=False)
    e0, ep, *kept = teacher.chunk(chunks)
    target = e0 - s.negative_guidance * (ep - e0)

    terms: Dict[str, torch.Tensor] = {}
    erase = s.erase_weight > 0
    attached = s.method == "lp_attached"
    adversarial = []
    if adversary is not None and erase:
        if iteration % s.adversarial_every == 0:  # the attack against the current student, warm-started
            def student_output(x, sig, conds):
                return run(conds, [0], x, sig, deltas=True, prompt=attached)

            adversary.start(concepts)
            for _ in range(s.adversarial_steps):
                check_interrupt()
                adversary.step(student_output, x_t, sigma, concepts, ep, concept_weights)
        adversarial = [adversary.append(c, detach=True) for c in concepts]
    if erase or preserves:  # student without the key prompt (with it for lp_attached): erase [+ adv] [+ preserve]
        erased = (concepts + adversarial) if erase else []
        parts = len(erased) // len(concepts) + int(bool(preserves))
        student = run(erased + preserves, [0] * parts, *rows(parts - int(bool(preserves)), bool(preserves)),
                      deltas=True, prompt=attached).chunk(parts)
        loss = 0.0
        if erase:
            terms["erase"] = weighted_mse(student[0], target, concept_weights)
            loss = loss + s.erase_weight * terms["erase"]
        if adversarial:
            terms["erase_adv"] = weighted_mse(student[1], target, concept_weights)
            loss = loss + s.erase_weight * terms["erase_adv"]
        if preserves:
            terms["preserve"] = weighted_mse(student[-1], kept[0], preserve_weights)
            loss = loss + s.preserve_weight * terms["preserve"]
        backward(loss)
    if s.trains_key:  # student with the key prompt reproduces the original concept
        keyed = run(concepts, [0], x_t, sigma, deltas=True, prompt=True)
        terms["key"] = weighted_mse(keyed, ep, concept_weights)
        backward(s.key_weight * terms["key"])
    return terms


def optimizer_step(trainables: Trainables, scaler) -> None:
    if scaler is not None:
        scaler.step(trainables.optimizer)
        scaler.update()
    else:
        trainables.optimizer.step()
    trainables.optimizer.zero_grad(set_to_none=True)
