"""The concept score, the one figure the report prints and the trainer watches: how far the erased model's noise
prediction eps'(c) moved from the original's eps(c) toward ESD's erasure target eps(u) - ETA (eps(c) - eps(u)),
at the SCORE_LEVELS noise levels on the original model's own sample for c:

    toward = <eps'(c) - eps(c), target - eps(c)> / |target - eps(c)|^2     (summed over noise levels)
    moved  = |eps'(c) - eps(c)| / |target - eps(c)|

toward 0 = unchanged, 0.5 = the erased model treats the prompt as the empty prompt, 1 = ESD's target; `moved`
counts movement in any direction, so a kept prompt should show both near 0. report/concept_report.py computes it
with ComfyUI's sampler for the Concept Erasure Report, trainer/erasure_score.py on held-out points while training.
"""
from __future__ import annotations

import torch

ETA = 1.0
SCORE_LEVELS = (0.2, 0.4, 0.6, 0.8)  # where on the sampling schedule (model_sampling.percent_to_sigma)
NEGLIGIBLE = 1e-12  # |target - eps(c)|^2 below this share of |eps(c)|^2: the prompt predicts as the empty one


def to_target(eps_c: torch.Tensor, eps_u: torch.Tensor, eta: float = ETA) -> torch.Tensor:
    """target - eps(c), with target = eps(u) - eta (eps(c) - eps(u))."""
    return (1 + eta) * (eps_u - eps_c)
