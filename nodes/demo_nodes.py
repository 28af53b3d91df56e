"""Load Demo World: a tiny text-to-image model that draws coloured shapes, to try concept erasure in minutes."""
from __future__ import annotations

from ..demo_world.comfy_parts import KNOWN_WORDS, DemoWorldCLIP, DemoWorldVAE
from ..demo_world.world import load_world
from .types import CATEGORY


class LoadDemoWorld:
    DESCRIPTION = ("Loads the pack's demo world: a tiny SD1.5-family model (1.4 M-parameter UNet) trained to draw "
                   "one coloured shape (circle, square, triangle, cross, ring; red, green, blue, yellow) on a dark "
                   "background, with its own small text encoder and a fixed VAE. ComfyUI's own nodes take its "
                   "outputs: CLIP Text Encode ('a red square'), KSampler, VAE Decode. It samples on a CPU in about a "
                   "second, so an erasure trains in one to two minutes and you can see the concept go. Sample at "
                   "128x128 (16x16 latents, the size it was trained on), about 20 steps, cfg 4. Words it knows: "
                   + ", ".join(KNOWN_WORDS) + ".")
    CATEGORY = f"{CATEGORY}/demo"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    OUTPUT_TOOLTIPS = ("The demo world's UNet (comfy's SD1.5 UNetModel, small): erase from it, sample it.",
                       "The demo world's text encoder, for CLIP Text Encode. It knows only the world's words.",
                       "The demo world's VAE, for VAE Decode / VAE Encode: 8 pixels per latent cell, like SD's.")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def load(self):
        world = load_world()
        return (world.model, DemoWorldCLIP(world.text_encoder), DemoWorldVAE())


NODE_CLASS_MAPPINGS = {"LoadDemoWorld": LoadDemoWorld}
NODE_DISPLAY_NAME_MAPPINGS = {"LoadDemoWorld": "Load Demo World"}
