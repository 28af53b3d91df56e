"""What makes one synthetic world differ from another: latent size, UNet shape, text encoder, vocabulary, shapes.

Every world shares the renderer's scenes (scaled to its size) and the fixed linear 'VAE'; its objects are the
renderer's shapes it draws (each object word names one, shapes.SHAPES) and its colours the renderer's colours
it paints. The demo world is DEMO (demo_world/world.safetensors); the benchmark's other worlds are trained by
benchmarks/train_demo_world.py --world NAME into benchmarks/worlds/NAME.safetensors. A world file records its spec
in its metadata, so a file loads into the shape it was trained in; a field added later takes its default, the
value every world had before it existed.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Dict, Tuple

from .renderer import RGB
from .shapes import SHAPES
from .vocabulary import DEFAULT, Vocabulary


@dataclass(frozen=True)
class WorldSpec:
    name: str
    size: int = 16  # latent side (the world's images are size x size pixels)
    model_channels: int = 32
    channel_mult: Tuple[int, ...] = (1, 2)
    num_res_blocks: Tuple[int, ...] = (1, 1)
    transformer_depth: Tuple[int, ...] = (0, 1)  # per input block: where cross-attention sits
    transformer_depth_output: Tuple[int, ...] = (0, 0, 1, 1)
    transformer_depth_middle: int = 1
    text_layers: int = 1
    text_width: int = 64
    objects: Tuple[str, ...] = DEFAULT.objects  # the renderer's shapes this world draws, by name
    colours: Tuple[str, ...] = DEFAULT.colours
    synonyms: Tuple[Tuple[str, ...], ...] = DEFAULT.synonyms  # (object, synonym, ...)
    notes: str = field(default="", compare=False)

    def __post_init__(self):
        unknown = [o for o in self.objects if o not in SHAPES] + [c for c in self.colours if c not in RGB]
        if unknown:
            raise ValueError(f"world {self.name!r}: the renderer cannot draw {unknown}")

    @cached_property
    def vocabulary(self) -> Vocabulary:
        return Vocabulary(self.objects, self.colours, self.synonyms)

    def unet_config(self, context_dim: int) -> dict:
        return dict(
            in_channels=4, out_channels=4, model_channels=self.model_channels, channel_mult=list(self.channel_mult),
            num_res_blocks=list(self.num_res_blocks), transformer_depth=list(self.transformer_depth),
            transformer_depth_output=list(self.transformer_depth_output),
            transformer_depth_middle=self.transformer_depth_middle, use_spatial_transformer=True, legacy=False,
            num_heads=-1, num_head_channels=16, use_linear_in_transformer=True, adm_in_channels=None,
            image_size=self.size, context_dim=context_dim)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "WorldSpec":
        def frozen(value):
            return tuple(frozen(v) for v in value) if isinstance(value, list) else value

        return cls(**{k: frozen(v) for k, v in json.loads(text).items()})


# Cross-attention only at the 8x8 level (input_blocks.3, middle_block, output_blocks.0/1), as SDXL skips
# attention at its highest resolution: it keeps a training step at batch 32 near 0.3 s on one CPU core.
DEMO = WorldSpec("demo", notes="16x16 latents, 2 levels, cross-attention at 8x8 only, 1 text layer")
DEEP = WorldSpec("deep", transformer_depth=(0, 2), transformer_depth_output=(0, 0, 2, 2), transformer_depth_middle=2,
                 text_layers=3, notes="16x16 latents, two transformer blocks per attention site (8x8), 3 text layers")
LARGE = WorldSpec("large", size=32, channel_mult=(1, 2, 2), num_res_blocks=(1, 1, 1), transformer_depth=(0, 0, 1),
                  transformer_depth_output=(0, 0, 0, 0, 1, 1), text_layers=2,
                  notes="32x32 latents, 3 levels, cross-attention at 8x8 only, 2 text layers")
# Kept out of tuning: no erasure setting is chosen by a run on it. Its own words (the concept "diamond" has two
# synonyms and two lookalikes, "kite" and a pointy-top "hexagon"), colours and a 128-wide text encoder, and
# cross-attention at 16x16 (input_blocks.3 only: one more site in the output blocks made the file 5.3 MB and a step
# 25% slower) as well as 8x8.
HELDOUT = WorldSpec("heldout", size=32, channel_mult=(1, 2, 2), num_res_blocks=(1, 1, 1), transformer_depth=(0, 1, 1),
                    transformer_depth_output=(0, 0, 0, 0, 1, 1), text_layers=2, text_width=128,
                    objects=("diamond", "kite", "hexagon", "star", "heart", "crescent"),
                    colours=("orange", "purple", "cyan", "white"),
                    synonyms=(("diamond", "rhombus", "lozenge"), ("crescent", "moon")),
                    notes="32x32 latents, 3 levels, cross-attention at 16x16 (down) and 8x8, 2 text layers 128 wide, "
                          "its own vocabulary; kept out of tuning")
WORLDS: Dict[str, WorldSpec] = {w.name: w for w in (DEMO, DEEP, LARGE, HELDOUT)}
