"""The weight deltas' learning rate, raised until the concept score moves (min_score_rise).

A fixed rate cannot fit every model: ESD's 1e-5 (its rate for full deltas on an 860 M UNet; factors step alike
with factor_alpha fan_in) moved the concept score on two of the benchmark's small worlds by 0.09 and 0.27 in 300
iterations, and with min_score_rise 0.5 they took rates 4-16x higher. With min_score_rise > 0 (the default, 0.5)
training starts at learning_rate and, every WINDOW iterations, measures the held-out concept score
(erasure_score.py): while it rose less than min_score_rise per 100 iterations over the window, the rate is
doubled, up to MAX_FACTOR times learning_rate. The first window that rises fast enough fixes the rate for the rest
of the run; it is never lowered. The other parameter groups (lp's prompt) are held still (rate 0) until then: a
prompt that learns at its own fixed rate while the deltas barely move takes over the erasure the deltas should
carry (in a pilot on the demo world, two seeds, holding it raised erasure by 3.7 and 3.8 points).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

WINDOW = 10
MAX_FACTOR = 32.0  # five doublings: 1e-5 -> 3.2e-4; the benchmark's small worlds took up to 1.6e-4


class RateRaise:
    def __init__(self, group: dict, min_score_rise: float, held: Sequence[dict] = ()):
        self.group = group
        self.start = float(group["lr"])
        self.min_rise = min_score_rise
        self.active = min_score_rise > 0
        self.held = [(g, g["lr"]) for g in held] if self.active else []
        for g, _ in self.held:
            g["lr"] = 0.0
        self.last = 0.0  # the score before the first step: the deltas start at zero, the student is the original
        self.raises: List[Tuple[int, float]] = []  # (iteration, new rate)

    def due(self, iteration: int) -> bool:
        """iteration: 1-based, after its optimizer step."""
        return self.active and iteration % WINDOW == 0

    def update(self, iteration: int, score: float) -> None:
        rise = (score - self.last) * 100.0 / WINDOW
        self.last = score
        if rise >= self.min_rise or self.rate * 2 > self.start * MAX_FACTOR:
            self.active = False
            for g, lr in self.held:
                g["lr"] = lr
            self.held = []
            return
        self.group["lr"] = self.rate * 2
        self.raises.append((iteration, self.rate))

    @property
    def rate(self) -> float:
        return float(self.group["lr"])

    def record(self) -> dict:
        """For the erasure's settings: the rate the run ended with and when it was raised."""
        return {"learning_rate_used": self.rate, "learning_rate_raises": [[i, lr] for i, lr in self.raises]}
