"""Loss curves per term, drawn with Pillow into a ComfyUI IMAGE ([1, H, W, 3] float in 0..1)."""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

COLORS = {"erase": (220, 60, 50), "key": (40, 110, 220), "preserve": (30, 150, 70), "total": (90, 90, 90)}
SCORE_COLOR = (150, 60, 170)
MOVED_COLOR = (230, 130, 20)
AXIS_COLOR = (110, 110, 110)
SCORE_AXIS = "score: 0 unchanged, 0.5 like the empty prompt, 1 ESD's target"
_FALLBACK = [(160, 80, 180), (200, 140, 20), (20, 160, 170)]


def _smooth(values: List[float], window: int) -> List[float]:
    if window <= 1 or len(values) <= window:
        return values
    kernel = np.ones(window) / window
    padded = np.concatenate([np.full(window - 1, values[0]), np.asarray(values, dtype=np.float64)])
    return np.convolve(padded, kernel, mode="valid").tolist()


def draw_loss_curves(losses: Dict[str, List[float]], width: int = 768, height: int = 384,
                     scores: Optional[Sequence[Tuple[int, float]]] = None, stop_at: float = 0.0,
                     moved: Optional[Sequence[Tuple[int, float]]] = None, retain=None,
                     rate_raises: Sequence[Tuple[int, float]] = (), stopped: Optional[dict] = None) -> torch.Tensor:
    """One line per term (log10 scale when every value is positive), lightly smoothed, with a legend; and the
    concept score measured during training ((iteration, score) pairs, erasure_score.py) on a linear axis at the
    right, with the stop_at_score line when there is one; and, on the same axis, how far the most-moved kept
    concept has moved (`moved`, the report's measure). `retain` (a RetainSet) is listed under the plot.
    rate_raises ((iteration, new rate), learning_rate.py) are marked on the iteration axis, and `stopped` (the
    file's {"iteration", "reason"}) with a line where training stopped before its last iteration."""
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    left, right, top, bottom = 64, 56 if scores or moved else 16, 28, 36 + (14 if retain is not None else 0)
    plot_w, plot_h = width - left - right, height - top - bottom
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline=(0, 0, 0))
    series = {k: [v for v in vals if math.isfinite(v)] for k, vals in losses.items() if vals}
    series = {k: v for k, v in series.items() if v}
    if not series:
        draw.text((left + 8, top + 8), "no losses recorded", fill=(0, 0, 0), font=font)
        return _to_tensor(image)
    log_scale = all(v > 0 for vals in series.values() for v in vals)
    transform = (lambda v: math.log10(v)) if log_scale else (lambda v: v)
    steps = max(len(v) for v in series.values())
    window = max(1, steps // 50)
    smoothed = {k: [transform(v) for v in _smooth(vals, window)] for k, vals in series.items()}
    low = min(min(v) for v in smoothed.values())
    high = max(max(v) for v in smoothed.values())
    if log_scale:  # whole decades at both ends, so every axis label is a power of ten
        low, high = math.floor(low), math.ceil(high)
    if high - low < 1e-12:
        low, high = low - 0.5, high + 0.5

    def point(i, v):
        x = left + (i / max(1, steps - 1)) * plot_w
        y = top + (1 - (v - low) / (high - low)) * plot_h
        return x, y

    for index, (name, values) in enumerate(smoothed.items()):
        color = COLORS.get(name, _FALLBACK[index % len(_FALLBACK)])
        if len(values) == 1:
            x, y = point(0, values[0])
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
        else:
            draw.line([point(i, v) for i, v in enumerate(values)], fill=color, width=2)
        draw.text((left + 8 + 110 * index, 8), f"{name} {series[name][-1]:.3g}", fill=color, font=font)
    ticks = decade_ticks(low, high) if log_scale else [high, low]
    for tick in ticks:
        y = point(0, tick)[1]
        if log_scale:
            draw.line([(left - 4, y), (left, y)], fill=(0, 0, 0))
        draw.text((4, y - 6), f"1e{tick}" if log_scale else f"{tick:.3g}", fill=(0, 0, 0), font=font)
    box = (left, top, plot_w, plot_h)
    if scores or moved:
        values = [v for _, v in [*(scores or []), *(moved or [])]]
        scale = (min(0.0, *values), max(1.0, stop_at, *values))
        if scores:
            _draw_scores(draw, font, scores, stop_at, box, steps, len(smoothed), scale)
        if moved:
            _draw_series(draw, moved, box, steps, scale, MOVED_COLOR)
            draw.text((left + 8 + 110 * (len(smoothed) + bool(scores)), 8), f"kept moved {moved[-1][1]:.2f}",
                      fill=MOVED_COLOR, font=font)
        if scores:
            _right_text(draw, font, left + plot_w - 4, top + 2, SCORE_AXIS, SCORE_COLOR)
    draw.text((left + 4, top + 2), "loss, log10 scale" if log_scale else "loss", fill=AXIS_COLOR, font=font)
    _mark_events(draw, font, box, steps, rate_raises, stopped)
    if retain is not None:
        kept = ", ".join(t for t, _ in retain.kept) or "none"
        draw.text((left, height - 16), f"kept: {kept}"[:width // 6], fill=MOVED_COLOR, font=font)
    draw.text((left, top + plot_h + 8), "1", fill=(0, 0, 0), font=font)
    draw.text((left + plot_w // 2 - 24, top + plot_h + 8), "iteration", fill=(0, 0, 0), font=font)
    _right_text(draw, font, left + plot_w, top + plot_h + 8, str(steps), (0, 0, 0))
    return _to_tensor(image)


def _right_text(draw, font, x_right, y, text, color) -> None:
    width = draw.textlength(text, font=font)
    draw.text((x_right - width, y), text, fill=color, font=font)


def _mark_events(draw, font, box, steps, rate_raises, stopped) -> None:
    """Where the learning rate was doubled (ticks on the iteration axis) and where training stopped early."""
    left, top, plot_w, plot_h = box
    point = _scaled(box, steps, (0.0, 1.0))
    for iteration, _ in rate_raises:
        x = point(iteration, 0.0)[0]
        draw.polygon([(x, top + plot_h - 7), (x - 4, top + plot_h), (x + 4, top + plot_h)], fill=AXIS_COLOR)
    if rate_raises:
        x = point(rate_raises[-1][0], 0.0)[0]
        draw.text((x + 6, top + plot_h - 14), f"rate x2 ({len(rate_raises)})", fill=AXIS_COLOR, font=font)
    if stopped and stopped.get("reason") != "iterations":
        x = point(int(stopped["iteration"]), 0.0)[0]
        for y in range(int(top), int(top + plot_h), 10):
            draw.line([(x, y), (x, y + 5)], fill=(0, 0, 0))
        _right_text(draw, font, x - 4, top + 16, f"stopped at {stopped['iteration']}", (0, 0, 0))


def _scaled(box, steps, scale):
    left, top, plot_w, plot_h = box
    low, high = scale

    def point(iteration, v):
        return (left + ((iteration - 1) / max(1, steps - 1)) * plot_w, top + (1 - (v - low) / (high - low)) * plot_h)

    return point


def _draw_series(draw, series, box, steps, scale, color) -> None:
    point = _scaled(box, steps, scale)
    points = [point(i, v) for i, v in series]
    if len(points) > 1:
        draw.line(points, fill=color, width=2)
    for x, y in points:
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)


def _draw_scores(draw, font, scores, stop_at, box, steps, legend_index, scale) -> None:
    left, top, plot_w, plot_h = box
    values = [v for _, v in scores]
    low, high = scale
    point = _scaled(box, steps, scale)
    _draw_series(draw, scores, box, steps, scale, SCORE_COLOR)
    if stop_at:
        y = point(1, stop_at)[1]
        for x in range(int(left), int(left + plot_w), 12):
            draw.line([(x, y), (x + 6, y)], fill=SCORE_COLOR)
    for tick in (high, low) + ((stop_at,) if stop_at else ()):
        draw.text((left + plot_w + 4, point(1, tick)[1] - 6), f"{tick:.2g}", fill=SCORE_COLOR, font=font)
    draw.text((left + 8 + 110 * legend_index, 8), f"score {values[-1]:.2f}", fill=SCORE_COLOR, font=font)


def decade_ticks(low: int, high: int, most: int = 8) -> List[int]:
    """Exponents to label between two whole decades: every one, or every k-th when there are more than `most`."""
    every = max(1, math.ceil((high - low) / (most - 1)))
    return list(range(int(high), int(low) - 1, -every))


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).unsqueeze(0)
