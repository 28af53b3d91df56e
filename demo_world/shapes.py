"""The shapes the renderer draws, by the object word that names each: (dx, dy, radius) -> inside, on the
supersampled grid (dx, dy: offsets from the object's centre, in pixels; y grows downwards).

A world's objects pick their shapes here by name (its spec's objects), so a new world may draw new shapes while the
older worlds' renders stay bit for bit what they were.
"""
from __future__ import annotations

import math

import torch


def _polygon_star(dx: torch.Tensor, dy: torch.Tensor, r: float, inner: float = 0.45) -> torch.Tensor:
    """A five-pointed star, one point up: inside the edge from each point to the next inner corner."""
    rho = torch.sqrt(dx ** 2 + dy ** 2)
    angle = torch.remainder(torch.atan2(dx, -dy), 2 * math.pi / 5)  # 0 at a point
    angle = torch.minimum(angle, 2 * math.pi / 5 - angle)  # folded: 0 (point) .. pi/5 (inner corner)
    px, py = r, 0.0
    qx, qy = inner * r * math.cos(math.pi / 5), inner * r * math.sin(math.pi / 5)
    ux, uy = rho * torch.cos(angle), rho * torch.sin(angle)
    return (qx - px) * (uy - py) - (qy - py) * (ux - px) >= 0  # on the centre's side of the edge


def _kite(dx: torch.Tensor, dy: torch.Tensor, r: float, top: float, waist: float, bottom: float,
          half_width: float) -> torch.Tensor:
    """Widest (half_width) at `waist`, narrowing straight to points at `top` and `bottom` (units of r)."""
    y, x = dy / r, dx.abs() / r
    upper = (y >= top) & (y < waist) & (x < half_width * (y - top) / (waist - top))
    lower = (y >= waist) & (y < bottom) & (x < half_width * (bottom - y) / (bottom - waist))
    return upper | lower


def _triangle(dx: torch.Tensor, dy: torch.Tensor, r: float) -> torch.Tensor:
    top, bottom = -r, 0.8 * r  # apex up, base below the centre
    half_width = r * (dy - top) / (bottom - top)
    return (dy > top) & (dy < bottom) & (dx.abs() < half_width)


def _heart(dx: torch.Tensor, dy: torch.Tensor, r: float) -> torch.Tensor:
    x, y = dx / (0.85 * r), -dy / (0.85 * r) + 0.1
    return (x ** 2 + y ** 2 - 1) ** 3 - x ** 2 * y ** 3 <= 0


SHAPES = {  # every shape any world draws, by the object word that names it; (dx, dy, radius) -> inside
    "circle": lambda dx, dy, r: torch.sqrt(dx ** 2 + dy ** 2) < r,
    "ring": lambda dx, dy, r: (torch.sqrt(dx ** 2 + dy ** 2) < r) & (torch.sqrt(dx ** 2 + dy ** 2) > 0.55 * r),
    "square": lambda dx, dy, r: (dx.abs() < 0.8 * r) & (dy.abs() < 0.8 * r),
    "triangle": _triangle,
    "cross": lambda dx, dy, r: (((dx.abs() < 0.3 * r) & (dy.abs() < r)) | ((dy.abs() < 0.3 * r) & (dx.abs() < r))),
    # The heldout world's: a diamond, and two shapes that look like it at 16x16 (a kite, widest above its centre,
    # and a pointy-top hexagon, a diamond with its side corners cut off).
    "diamond": lambda dx, dy, r: _kite(dx, dy, r, -1.0, 0.0, 1.0, 0.7),
    "kite": lambda dx, dy, r: _kite(dx, dy, r, -0.85, -0.4, 1.0, 0.75),
    "hexagon": lambda dx, dy, r: (dx.abs() < 0.62 * r) & (dy.abs() + 0.8 * dx.abs() < r),
    "star": _polygon_star,
    "heart": _heart,
    "crescent": lambda dx, dy, r: ((torch.sqrt(dx ** 2 + dy ** 2) < r)
                                   & (torch.sqrt((dx - 0.5 * r) ** 2 + (dy + 0.1 * r) ** 2) > 0.8 * r)),
}
