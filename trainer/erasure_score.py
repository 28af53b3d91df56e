"""Train until erased: the Concept Erasure Report's concept score, measured while training.

The score is the report's 'toward ESD target' (erasure/concept_score.py), on held-out x_t: each concept's own
sample from the original model (one trajectory per concept, drawn with a generator of its own, so the training
pairs are the same with or without scoring), noised at the report's levels with held-out noise. eps = (x -
denoised) / sigma, as the report computes it, whatever the model predicts, so the figure is the one Concept
Erasure Report prints: 0 = unchanged, 0.5 = like the empty prompt, 1 = ESD's target.

The same points for the concepts to keep (retain_set.py) give the report's 'moved' per kept concept:
|eps'(k) - eps(k)| / |target - eps(k)|, what the erasure is taking with it.
"""
from __future__ import annotations

import math
from typing import Callable, List, Sequence

import torch

from .conditioning import Cond, CondBatch
from .denoiser import Denoiser
from .trajectories import sample_trajectories
from ..erasure import concept_score  # the report's ETA and levels, not the trainer's negative_guidance


class HeldOutScore:
    """Samples the held-out points once, with the original model (before the first optimizer step), and keeps the
    original's predictions there; score() then needs one forward pass of the student per concept and level."""

    def __init__(self, denoiser: Denoiser, concepts: Sequence[Cond], unconditional: Cond, latent_shape, timesteps,
                 sigmas, all_sigmas, cfg: float, seed: int, model_sampling, check_interrupt: Callable[[], None],
                 seed_offset: int = 1, samples: int = 1):
        generator = torch.Generator().manual_seed((seed + seed_offset) % (1 << 64))
        self.denoiser = denoiser
        self.eta = concept_score.ETA
        levels = [float(model_sampling.percent_to_sigma(p)) for p in concept_score.SCORE_LEVELS]
        self.points = []  # per concept and level: cond, x [1, C, H, W], sigma [1], eps(c) of the original, to_target
        with torch.no_grad():  # one concept at a time: no larger batch than a training iteration's
            for j, concept in [(j, c) for j, c in enumerate(concepts) for _ in range(samples)]:
                pool = sample_trajectories(denoiser, concepts, unconditional, [j], latent_shape, timesteps, sigmas,
                                           all_sigmas, cfg, generator, prompt=False, check_interrupt=check_interrupt)
                x0 = pool.xs[-1]  # the concept's sample
                for sigma in levels:
                    x = x0 + torch.randn(x0.shape, generator=generator).to(x0.device) * sigma
                    sig = torch.full((1,), sigma, device=x.device)
                    eps_c = self._eps(x, sig, concept, deltas=False)
                    eps_u = self._eps(x, sig, unconditional, deltas=False, uncond=True)
                    self.points.append((j, concept, x, sig, eps_c, concept_score.to_target(eps_c, eps_u)))
        self.totals = [0.0] * len(concepts)  # |target - eps(c)|^2 of each concept, summed over its levels
        for j, *_, to_target in self.points:
            self.totals[j] += float((to_target ** 2).sum())

    def _eps(self, x, sigma, cond: Cond, *, deltas: bool, prompt: bool = False, uncond: bool = False) -> torch.Tensor:
        def forward(xs, ss, c, cond_or_uncond):
            return self.denoiser.denoised(xs, ss, c, deltas=deltas, prompt=prompt, cond_or_uncond=cond_or_uncond)

        denoised = CondBatch([cond], [1 if uncond else 0]).run(forward, x, sigma).float()
        return (x.float() - denoised) / sigma.float().view(-1, 1, 1, 1)

    def eps_batch(self, x, sigma, conds: Sequence[Cond]) -> torch.Tensor:
        """The original's eps for one cond per row of x (retain_set.py ranks candidates with it)."""
        def forward(xs, ss, c, cond_or_uncond):
            return self.denoiser.denoised(xs, ss, c, deltas=False, prompt=False, cond_or_uncond=cond_or_uncond)

        denoised = CondBatch(list(conds), [0]).run(forward, x, sigma).float()
        return (x.float() - denoised) / sigma.float().view(-1, 1, 1, 1)

    def score(self, prompt_attached: bool = False) -> float:
        """The concepts' mean score for the student as it is now (prompt_attached: lp_attached's inference)."""
        return sum(self.toward_each(prompt_attached)) / len(self.totals)

    def toward_each(self, prompt_attached: bool = False) -> List[float]:
        moved = [0.0] * len(self.totals)
        with torch.no_grad():
            for j, concept, x, sig, eps_c, to_target in self.points:
                eps_e = self._eps(x, sig, concept, deltas=True, prompt=prompt_attached)
                moved[j] += float(((eps_e - eps_c) * to_target).sum())
        return [m / max(t, 1e-12) for m, t in zip(moved, self.totals)]

    def moved_each(self, prompt_attached: bool = False) -> List[float]:
        """The report's 'moved' for each concept: the size of the student's change in any direction."""
        moved = [0.0] * len(self.totals)
        with torch.no_grad():
            for j, concept, x, sig, eps_c, _ in self.points:
                eps_e = self._eps(x, sig, concept, deltas=True, prompt=prompt_attached)
                moved[j] += float(((eps_e - eps_c) ** 2).sum())
        return [math.sqrt(m / max(t, 1e-12)) for m, t in zip(moved, self.totals)]
