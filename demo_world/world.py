"""The trained world: load it, encode captions, sample images with comfy's sampler, read them back."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence

import torch
from safetensors.torch import load_file, save_file

import comfy.sample

from . import renderer
from .classifier import Classifier
from .reading import WORLD_FILE, classifier_from, part, spec_of
from .spec import DEMO, WorldSpec
from .text_encoder import TextEncoder
from .unet import build_unet
from .vocabulary import Vocabulary

SAMPLER, SCHEDULER, STEPS, CFG = "euler", "normal", 20, 4.0


@dataclass
class World:
    model: object  # comfy ModelPatcher (SD1.5-family BaseModel)
    text_encoder: TextEncoder
    classifier: Classifier
    metadata: Dict[str, str]
    spec: WorldSpec = DEMO

    @property
    def resolution(self) -> int:
        """Its images' side in ComfyUI's pixels (8 per latent cell, as SD's VAE): the trainer's `resolution`."""
        return 8 * self.spec.size

    @property
    def vocabulary(self) -> Vocabulary:
        return self.spec.vocabulary

    def conditioning(self, caption: str) -> list:
        return self.text_encoder.conditioning(caption)

    def unconditional(self) -> list:
        return self.text_encoder.conditioning("")


def state_dicts(model, text_encoder, classifier) -> Dict[str, torch.Tensor]:
    parts = {"unet": model.model.diffusion_model.state_dict(), "text": text_encoder.state_dict(),
             "classifier": classifier.state_dict()}
    return {f"{part}.{k}": v.detach().to(torch.float16).contiguous()
            for part, sd in parts.items() for k, v in sd.items()}


def save_world(path: Path, model, text_encoder, classifier, metadata: Dict[str, object],
               spec: WorldSpec = DEMO) -> None:
    metadata = dict(metadata, spec=spec.to_json())
    save_file(state_dicts(model, text_encoder, classifier), str(path),
              metadata={k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})


def load_world(path: Path = WORLD_FILE) -> World:
    if not Path(path).exists():
        raise FileNotFoundError(f"{path} not found; train it with: python benchmarks/train_demo_world.py")
    tensors = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    spec = spec_of(metadata)
    model = build_unet(spec=spec)
    model.model.diffusion_model.load_state_dict(part(tensors, "unet"))
    text_encoder = TextEncoder(spec.text_width, layers=spec.text_layers, vocabulary=spec.vocabulary)
    classifier = classifier_from(tensors, spec.vocabulary)
    text_encoder.load_state_dict(part(tensors, "text"))
    text_encoder.eval()
    unet = model.model.diffusion_model
    for p in list(unet.parameters()) + list(text_encoder.parameters()) + list(classifier.parameters()):
        p.requires_grad_(False)
    return World(model, text_encoder, classifier, metadata, spec)


def sample(model, positive: list, negative: list, seed: int, count: int, steps: int = STEPS,
           cfg: float = CFG) -> torch.Tensor:
    """`count` images [count, size, size, 3] for one prompt, at the size the world's UNet was built for; the same
    seed gives the same starting noise."""
    size = model.model.model_config.unet_config["image_size"]
    latent = torch.zeros(count, 4, size, size)
    noise = comfy.sample.prepare_noise(latent, seed)
    with torch.no_grad():
        samples = comfy.sample.sample(model, noise, steps, cfg, SAMPLER, SCHEDULER, positive, negative, latent,
                                      disable_pbar=True, seed=seed)
    return renderer.decode(samples)


def read_prompt_samples(world: World, model, captions: Sequence[str], seed: int, count: int,
                        steps: int = STEPS, cfg: float = CFG) -> List[tuple]:
    """Per caption: (predicted objects, predicted colours) of `count` samples from `model`."""
    uncond = world.unconditional()
    out = []
    for caption in captions:
        images = sample(model, world.conditioning(caption), uncond, seed, count, steps, cfg)
        out.append(world.classifier.read(images))
    return out
