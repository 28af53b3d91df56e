"""The weight deltas' learning rate, raised until the concept score moves (min_score_rise).

A fixed rate cannot fit every model: ESD's 1e-5 is its rate for full deltas on an 860 M UNet; the pack's rank-32
factors move the concept score 12-15x slower than that on an SD1.5-sized UNet, and on the benchmark's small
worlds 1e-5 moves it by 0.01-0.03 in 300 iterations, where they need about 3e-4. With min_score_rise > 0 (off by
default: on the demo world it erased less than a fixed 3e-4, see RESULTS.md) training starts at learning_rate and,
every WINDOW iterations, measures the held-out concept score (erasure_score.py): while it rose less than
min_score_rise per 100 iterations over the window, the rate is doubled, up to MAX_FACTOR times learning_rate. The
first window that rises fast enough fixes the rate for the rest of the run; it is never lowered.
"""
from __future__ import annotations

from typing import List, Tuple

WINDOW = 10
MAX_FACTOR = 32.0  # five doublings: ESD's 1e-5 for SD1.5 -> 3.2e-4, the rate the benchmark's tiny UNets need


class RateRaise:
    def __init__(self, group: dict, min_score_rise: float):
        self.group = group
        self.start = float(group["lr"])
        self.min_rise = min_score_rise
        self.active = min_score_rise > 0
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
            return
        self.group["lr"] = self.rate * 2
        self.raises.append((iteration, self.rate))

    @property
    def rate(self) -> float:
        return float(self.group["lr"])

    def record(self) -> dict:
        """For the erasure's settings: the rate the run ended with and when it was raised."""
        return {"learning_rate_used": self.rate, "learning_rate_raises": [[i, lr] for i, lr in self.raises]}
