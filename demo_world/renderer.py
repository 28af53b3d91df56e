"""Ground truth: renders one object in one colour on a plain dark background, and the fixed 'VAE'.

Images are 16x16 RGB in [0, 1], [B, H, W, 3] like ComfyUI's IMAGE. The world has no learned VAE: the model's
latent is a fixed affine map of the pixels, z = GAIN * M (rgb - OFFSET), with M a 4x3 matrix with orthonormal
columns (the first three columns of the Householder reflection I - 1/2 * ones), so decoding is exact:
rgb = M^T z / GAIN + OFFSET. OFFSET puts the dark background near 0 and GAIN gives z a standard deviation near 1
(about 0.8), like SD's scaled latents: with smaller latents the eps-model must predict noise far more precisely
at high noise levels, and a small UNet then gets the image's overall colour wrong. The map works at full
resolution (no 8x downscale); latents handed to comfy's samplers are divided by SD1.5's latent scale factor
(0.18215) because comfy multiplies them back before the UNet sees them.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch

from .shapes import SHAPES
from .vocabulary import DEFAULT, Vocabulary

SIZE = 16
SUPERSAMPLE = 4
SD15_LATENT_SCALE = 0.18215
LATENT_MAP = (torch.eye(4) - 0.5)[:, :3]  # [4, 3], orthonormal columns
GAIN, OFFSET = 4.0, 0.1
RGB = {"red": (0.9, 0.15, 0.15), "green": (0.15, 0.8, 0.2), "blue": (0.2, 0.3, 0.95), "yellow": (0.95, 0.9, 0.15),
       "orange": (0.95, 0.5, 0.1), "purple": (0.6, 0.2, 0.85), "cyan": (0.1, 0.85, 0.9), "white": (0.92, 0.92, 0.92)}


@dataclass(frozen=True)
class Scene:
    obj: str
    colour: str
    cx: float
    cy: float
    radius: float
    background: float
    tint: Tuple[float, float, float]


def random_scene(rng: random.Random, obj: str, colour: str, size: int = SIZE) -> Scene:
    """The same scene at any size: positions and radius scale with the image side (16 is the demo world's)."""
    scale = size / SIZE
    return Scene(obj, colour, cx=size / 2 + rng.uniform(-1.5, 1.5) * scale,
                 cy=size / 2 + rng.uniform(-1.5, 1.5) * scale, radius=rng.uniform(4.0, 6.0) * scale,
                 background=rng.uniform(0.06, 0.14), tint=tuple(rng.uniform(-0.05, 0.05) for _ in range(3)))


def _mask(obj: str, dx: torch.Tensor, dy: torch.Tensor, r: float) -> torch.Tensor:
    if obj not in SHAPES:
        raise ValueError(f"unknown object {obj!r}; the renderer draws {tuple(SHAPES)}")
    return SHAPES[obj](dx, dy, r)


def render(scene: Scene, size: int = SIZE) -> torch.Tensor:
    """[size, size, 3] in [0, 1]; edges anti-aliased by supersampling."""
    n = size * SUPERSAMPLE
    coords = (torch.arange(n, dtype=torch.float32) + 0.5) / SUPERSAMPLE
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    cover = _mask(scene.obj, xx - scene.cx, yy - scene.cy, scene.radius).float()
    cover = cover.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(dim=(1, 3))[..., None]
    colour = torch.tensor([min(1.0, max(0.0, c + t)) for c, t in zip(RGB[scene.colour], scene.tint)])
    return cover * colour + (1 - cover) * scene.background


def render_batch(rng: random.Random, labels: Sequence[Tuple[str, str]], size: int = SIZE) -> torch.Tensor:
    return torch.stack([render(random_scene(rng, o, c, size), size) for o, c in labels])


def render_empty(rng: random.Random, count: int, size: int = SIZE) -> torch.Tensor:
    """Backgrounds with no object: the classifier's 'none' class."""
    return torch.stack([torch.full((size, size, 3), rng.uniform(0.06, 0.14)) for _ in range(count)])


def random_labels(rng: random.Random, count: int, vocabulary: Vocabulary = DEFAULT) -> List[Tuple[str, str]]:
    return [(rng.choice(vocabulary.objects), rng.choice(vocabulary.colours)) for _ in range(count)]


def images_to_model_latent(images: torch.Tensor) -> torch.Tensor:
    """[B, H, W, 3] in [0, 1] -> the UNet's x0, [B, 4, H, W]."""
    return GAIN * torch.einsum("cr,bhwr->bchw", LATENT_MAP, images - OFFSET)


def model_latent_to_images(latent: torch.Tensor) -> torch.Tensor:
    return (torch.einsum("cr,bchw->bhwr", LATENT_MAP, latent.float()) / GAIN + OFFSET).clamp(0, 1)


def encode(images: torch.Tensor) -> torch.Tensor:
    """IMAGE -> a LATENT 'samples' tensor as comfy's samplers take and return it."""
    return images_to_model_latent(images) / SD15_LATENT_SCALE


def decode(samples: torch.Tensor) -> torch.Tensor:
    """A LATENT 'samples' tensor from comfy.sample.sample -> IMAGE [B, H, W, 3]."""
    return model_latent_to_images(samples * SD15_LATENT_SCALE)


assert math.isclose(float((LATENT_MAP.T @ LATENT_MAP - torch.eye(3)).abs().max()), 0.0, abs_tol=1e-6)
