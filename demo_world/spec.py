"""What makes one synthetic world differ from another: latent size, UNet shape, text-encoder depth.

Every world shares the vocabulary, the renderer's scenes (scaled to its size) and the fixed linear 'VAE'. The demo
world is DEMO (demo_world/world.safetensors); the benchmark's other worlds are trained by
benchmarks/train_demo_world.py --world NAME into benchmarks/worlds/NAME.safetensors. A world file records its spec
in its metadata, so a file loads into the shape it was trained in.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Dict, Tuple


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
    notes: str = field(default="", compare=False)

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
        values = json.loads(text)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


# Cross-attention only at the 8x8 level (input_blocks.3, middle_block, output_blocks.0/1), as SDXL skips
# attention at its highest resolution: it keeps a training step at batch 32 near 0.3 s on one CPU core.
DEMO = WorldSpec("demo", notes="16x16 latents, 2 levels, cross-attention at 8x8 only, 1 text layer")
DEEP = WorldSpec("deep", transformer_depth=(0, 2), transformer_depth_output=(0, 0, 2, 2), transformer_depth_middle=2,
                 text_layers=3, notes="16x16 latents, two transformer blocks per attention site (8x8), 3 text layers")
LARGE = WorldSpec("large", size=32, channel_mult=(1, 2, 2), num_res_blocks=(1, 1, 1), transformer_depth=(0, 0, 1),
                  transformer_depth_output=(0, 0, 0, 0, 1, 1), text_layers=2,
                  notes="32x32 latents, 3 levels, cross-attention at 8x8 only, 2 text layers")
WORLDS: Dict[str, WorldSpec] = {w.name: w for w in (DEMO, DEEP, LARGE)}
