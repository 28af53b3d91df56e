"""x_t for training, the ESD way (sampled by the model being trained, prompted with the concept at some CFG),
but paid for once per `trajectory_refresh` iterations instead of every iteration.

A refresh samples whole Euler trajectories (Euler on comfy's sigma-parameterised ODE is deterministic DDIM) over
the sampling_steps schedule and keeps every intermediate x. A training pair picks a trajectory, a step, and a
discrete timestep t inside that step's range; x_t is the point of that Euler step at sigma(t), so x_t and t
always match.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from .conditioning import Cond, CondBatch
from .denoiser import Denoiser

TimestepRange = Optional[Tuple[int, int]]


@dataclass
class TrajectoryPool:
    xs: torch.Tensor              # [steps + 1, n, C, H, W], x at each schedule sigma (the last at sigma 0)
    timesteps: torch.Tensor       # [steps] discrete timestep of each step start (CPU, long)
    sigmas: torch.Tensor          # [steps + 1] sigma of each point (CPU)
    all_sigmas: torch.Tensor      # [T] the model's sigma for every discrete timestep (CPU)
    concept_index: List[int]      # which concept entry prompted each trajectory
    timestep_ranges: Optional[List[TimestepRange]] = None  # per trajectory: the timesteps its pairs may use

    def draw(self, count: int, generator: torch.Generator):
        """count training pairs: (x_t [count, C, H, W] on the device, sigma [count] on the device, concept indices)."""
        steps, n = self.timesteps.shape[0], self.xs.shape[1]
        traj = torch.randint(n, (count,), generator=generator)
        if self.timestep_ranges is None:  # a step, then a timestep inside it
            step = torch.randint(steps, (count,), generator=generator)
            high = self.timesteps[step]
            low = torch.where(step + 1 < steps, self.timesteps[(step + 1).clamp(max=steps - 1)],
                              torch.full_like(high, -1))
            span = (high - low).clamp(min=1)
            offset = (torch.rand(count, generator=generator) * span).long().clamp(max=span - 1)
            t = high - offset
        else:  # a timestep inside the trajectory's range, then the step (t_{i+1}, t_i] that holds it
            last = self.all_sigmas.shape[0] - 1
            bounds = torch.tensor([self.timestep_ranges[i] or (0, last) for i in traj.tolist()]).reshape(-1, 2)
            width = bounds[:, 1] - bounds[:, 0]
            t = bounds[:, 0] + torch.minimum((torch.rand(count, generator=generator) * (width + 1)).long(), width)
            step = (self.timesteps.unsqueeze(0) >= t.unsqueeze(1)).sum(1) - 1
        sigma = self.all_sigmas[t]
        start, end = self.sigmas[step], self.sigmas[step + 1]
        weight = ((start - sigma) / (start - end)).to(self.xs.device)
        x0, x1 = self.xs[step, traj], self.xs[step + 1, traj]
        x_t = x0 + weight.view(-1, 1, 1, 1) * (x1 - x0)
        return x_t, sigma.to(self.xs.device), [self.concept_index[i] for i in traj.tolist()]


def sample_trajectories(denoiser: Denoiser, concepts: Sequence[Cond], unconditional: Cond, concept_index: List[int],
                        latent_shape, timesteps: torch.Tensor, sigmas: torch.Tensor, all_sigmas: torch.Tensor,
                        cfg: float, generator: torch.Generator, *, prompt: bool,
                        check_interrupt: Callable[[], None],
                        timestep_ranges: Optional[Sequence[TimestepRange]] = None) -> TrajectoryPool:
    """Sample len(concept_index) trajectories at once with the current student (cond + uncond in one batch).

    timestep_ranges (one per concept, None = all) restrict the training pairs later drawn from each trajectory.
    """
    n = len(concept_index)
    device = denoiser.device
    x = torch.randn((n, *latent_shape), generator=generator).to(device) * float(sigmas[0])
    use_uncond = cfg != 1.0
    batch_conds = CondBatch([concepts[j] for j in concept_index] + ([unconditional] * n if use_uncond else []),
                            [0, 1] if use_uncond else [0])

    def forward(x_part, sigma_part, cond, cond_or_uncond):
        return denoiser.denoised(x_part, sigma_part, cond, deltas=True, prompt=prompt, cond_or_uncond=cond_or_uncond)

    points = [x]
    with torch.no_grad():
        for i in range(timesteps.shape[0]):
            check_interrupt()
            batch = torch.cat([x, x]) if use_uncond else x
            sigma = torch.full((batch.shape[0],), float(sigmas[i]), device=device)
            denoised = batch_conds.run(forward, batch, sigma).float()
            if use_uncond:
                positive, negative = denoised.chunk(2)
                denoised = negative + cfg * (positive - negative)
            if float(sigmas[i + 1]) == 0.0:
                x = denoised
            else:
                x = x + (x - denoised) / float(sigmas[i]) * float(sigmas[i + 1] - sigmas[i])
            points.append(x)
    ranges = None
    if timestep_ranges is not None and any(r is not None for r in timestep_ranges):
        ranges = [timestep_ranges[j] for j in concept_index]
    return TrajectoryPool(torch.stack(points), timesteps, sigmas, all_sigmas, list(concept_index), ranges)


def kept_trajectories(denoiser: Denoiser, kept: Sequence[Cond], unconditional: Cond, latent_shape, timesteps,
                      sigmas, all_sigmas, cfg: float, generator: torch.Generator,
                      check_interrupt: Callable[[], None],
                      timestep_ranges: Sequence[TimestepRange]) -> TrajectoryPool:
    """One trajectory of each kept concept, sampled before the first step (the original's own images of it), one
    concept at a time (no larger batch than a training iteration's): where the preserve term holds it."""
    pools = [sample_trajectories(denoiser, kept, unconditional, [j], latent_shape, timesteps, sigmas, all_sigmas, cfg,
                                 generator, prompt=False, check_interrupt=check_interrupt)
             for j in range(len(kept))]
    ranges = list(timestep_ranges) if any(r is not None for r in timestep_ranges) else None
    return TrajectoryPool(torch.cat([p.xs for p in pools], 1), timesteps, sigmas, all_sigmas, list(range(len(kept))),
                          ranges)
