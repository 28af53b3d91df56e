"""The demo world as ComfyUI objects: a CLIP that CLIPTextEncode takes and a VAE that VAEDecode / VAEEncode take.

The world's latents are its pixels at 1/8 of the image size, like SD's VAE: a 128x128 image is a 16x16 latent.
Decoding renders each latent cell as an 8x8 block, so ComfyUI's image sizes (Empty Latent Image, the report's
width and height) mean what they mean for SD1.5.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from . import renderer
from .text_encoder import TextEncoder
from .vocabulary import CONTEXT_LENGTH, DEFAULT, EOS

PIXELS_PER_LATENT = 8
KNOWN_WORDS = DEFAULT.known_words  # the demo world's (Load Demo World's description lists them)


class DemoWorldError(ValueError):
    pass


def words_of(text: str) -> list:
    """The prompt's words, lower case, punctuation dropped ('A red Square.' -> ['a', 'red', 'square'])."""
    return re.findall(r"[a-z]+", text.lower())


class DemoWorldCLIP:
    """The world's text encoder behind the methods ComfyUI's text nodes call (fork and upstream); it knows the
    words of the world's own vocabulary (the text encoder's)."""

    def __init__(self, text_encoder: TextEncoder):
        self.text_encoder = text_encoder
        self.vocabulary = text_encoder.vocabulary

    def clone(self):
        return DemoWorldCLIP(self.text_encoder)

    def example(self) -> str:
        """'a red square' in the demo world (a colour that reads well after 'a', the only article it knows)."""
        colours = self.vocabulary.colours
        colour = next((c for c in colours if c[0] not in "aeiou"), colours[0])
        return f"a {colour} {self.vocabulary.objects[1]}"

    def tokenize(self, text: str, return_word_ids: bool = False, **kwargs) -> dict:
        words, known = words_of(text), self.vocabulary.known_words
        unknown = [w for w in words if w not in known]
        if unknown:
            raise DemoWorldError(f"the demo world does not know {', '.join(repr(w) for w in unknown)} in "
                                 f"{text!r}; it knows only: {', '.join(known)} (e.g. '{self.example()}')")
        if len(words) > CONTEXT_LENGTH - 2:
            raise DemoWorldError(f"{text!r} has {len(words)} words; the demo world reads at most "
                                 f"{CONTEXT_LENGTH - 2} (e.g. '{self.example()}')")
        return {"demo_world": self.vocabulary.tokenize([" ".join(words)])}

    def retain_candidates(self) -> list:
        """Prompts of the world's own words to pick a retain (preserve) set from: "a {word}" for every object word
        and synonym, every colour alone, and "a {colour} {object}" for every colour and object."""
        v = self.vocabulary
        return ([f"a {w}" for o in v.objects for w in v.words_for(o)] + list(v.colours)
                + [f"a {c} {o}" for c in v.colours for o in v.objects])

    def encode_from_tokens(self, tokens: dict, return_pooled=False, return_dict: bool = False, **kwargs):
        ids = tokens["demo_world"]
        with torch.no_grad():
            cond = self.text_encoder(ids).detach().float()
        # The pooled vector sits at the end-of-text token, as in CLIP; SD1.x models do not use it.
        eos = (ids == self.vocabulary.token_ids[EOS]).float().argmax(dim=1)
        pooled = cond[torch.arange(cond.shape[0]), eos]
        if return_dict:
            return {"cond": cond, "pooled_output": pooled}
        return (cond, pooled) if return_pooled else cond

    def encode_from_tokens_scheduled(self, tokens: dict, unprojected: bool = False, add_dict: dict = None,
                                     show_pbar: bool = True) -> list:
        out = self.encode_from_tokens(tokens, return_dict=True)
        cond = out.pop("cond")
        out.update(add_dict or {})
        return [[cond, out]]

    def encode(self, text: str) -> torch.Tensor:
        return self.encode_from_tokens(self.tokenize(text))


class DemoWorldVAE:
    """The world's fixed linear 'VAE' (demo_world.renderer) at 8 pixels per latent cell."""

    latent_channels = 4
    output_channels = 3
    downscale_ratio = PIXELS_PER_LATENT
    upscale_ratio = PIXELS_PER_LATENT

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        """LATENT samples [B, 4, h, w] -> IMAGE [B, 8h, 8w, 3]."""
        if samples.ndim != 4 or samples.shape[1] != self.latent_channels:
            raise DemoWorldError(f"the demo world's VAE decodes [batch, 4, h, w] latents, got {list(samples.shape)}")
        images = renderer.decode(samples.detach().float().cpu())
        return images.repeat_interleave(PIXELS_PER_LATENT, 1).repeat_interleave(PIXELS_PER_LATENT, 2)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """IMAGE [B, H, W, 3] -> LATENT samples [B, 4, H/8, W/8] (each 8x8 block averaged; edges cropped)."""
        if pixels.ndim != 4 or pixels.shape[-1] < 3:
            raise DemoWorldError(f"the demo world's VAE encodes [batch, H, W, 3] images, got {list(pixels.shape)}")
        h, w = (s // PIXELS_PER_LATENT * PIXELS_PER_LATENT for s in pixels.shape[1:3])
        if h == 0 or w == 0:
            raise DemoWorldError(f"images must be at least {PIXELS_PER_LATENT} pixels wide and high")
        rgb = pixels[:, :h, :w, :3].detach().float().cpu().permute(0, 3, 1, 2)
        pooled = F.avg_pool2d(rgb, PIXELS_PER_LATENT).permute(0, 2, 3, 1)
        return renderer.encode(pooled)

    def decode_tiled(self, samples: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.decode(samples)

    def encode_tiled(self, pixels: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.encode(pixels)

    def spacial_compression_decode(self) -> int:
        return PIXELS_PER_LATENT

    def spacial_compression_encode(self) -> int:
        return PIXELS_PER_LATENT

    def temporal_compression_decode(self):
        return None
