"""Attack Erased Concept: a thin node over trainer/attack.py."""
from __future__ import annotations

from ..trainer import AttackSettings, attack_erasure
from .types import CATEGORY

_DEFAULTS = AttackSettings()


class AttackConceptErasure:
    DESCRIPTION = (
        "Erased or only hidden? A white-box attack: learns a few continuous tokens, appended to the concept's "
        "conditioning, that make the erased model predict for the concept what the original model predicts (on "
        "images the original generates for the concept). If the concept comes back when you sample with the "
        "adversarial conditioning, the erasure hid it rather than removed it. Neither model is changed. Erasure "
        "Robust Settings (adversarial_steps) trains erasures that resist this attack.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CONDITIONING", "STRING")
    RETURN_NAMES = ("adversarial", "summary")
    OUTPUT_TOOLTIPS = (
        "The concept's conditioning with the adversarial tokens appended: plug it into a KSampler with the erased "
        "model as the positive prompt to see what came back.",
        "The attack's loss (erased vs original noise prediction) before and after.",
    )
    FUNCTION = "attack"

    @classmethod
    def INPUT_TYPES(cls):
        d = _DEFAULTS
        return {
            "required": {
                "erased_model": ("MODEL", {"tooltip": "The model with the concept erased (Apply Concept Erasure, "
                                                      "Erase Concept's model, or any erased checkpoint). "
                                                      "It is not changed."}),
                "original_model": ("MODEL", {"tooltip": "The model before erasure: it generates the concept's images "
                                                        "and gives the predictions to recover. It is not changed."}),
                "concept": ("CONDITIONING", {"tooltip": "CLIP Text Encode of the erased concept; the tokens are "
                                                        "appended to it."}),
                "unconditional": ("CONDITIONING", {"tooltip": "CLIP Text Encode of the empty prompt (guidance of "
                                                              "the original's images of the concept)."}),
                "tokens": ("INT", {"default": d.tokens, "min": 1, "max": 75, "tooltip":
                                   "Number of adversarial tokens appended to the concept's conditioning."}),
                "iterations": ("INT", {"default": d.iterations, "min": 1, "max": 100000, "tooltip":
                                       "Optimizer steps of the attack; more finds more of what is hidden."}),
                "learning_rate": ("FLOAT", {"default": d.learning_rate, "min": 1e-6, "max": 10.0, "step": 1e-4,
                                            "tooltip": "Adam learning rate of the adversarial tokens."}),
                "seed": ("INT", {"default": d.seed, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "tooltip":
                                 "Seed of the original's images, the pairs drawn from them and the tokens' start."}),
            },
            "optional": {
                "resolution": ("INT", {"default": d.resolution, "min": 0, "max": 2048, "step": 8, "tooltip":
                                       "Image size of the attack's latents in pixels; 0 = 512 (SD1.x/SD2.x) or "
                                       "1024 (SDXL)."}),
                "sampling_steps": ("INT", {"default": d.sampling_steps, "min": 1, "max": 1000, "tooltip":
                                           "Steps of the Euler schedule the original samples the concept with."}),
            },
        }

    def attack(self, erased_model, original_model, concept, unconditional, tokens, iterations, learning_rate, seed,
               resolution=_DEFAULTS.resolution, sampling_steps=_DEFAULTS.sampling_steps):
        settings = AttackSettings(tokens=tokens, iterations=iterations, learning_rate=learning_rate, seed=seed,
                                  resolution=resolution, sampling_steps=sampling_steps)
        result = attack_erasure(erased_model, original_model, concept, unconditional, settings)
        return {"ui": {"text": [result.summary()]}, "result": (result.conditioning, result.summary())}


NODE_CLASS_MAPPINGS = {"AttackConceptErasure": AttackConceptErasure}
NODE_DISPLAY_NAME_MAPPINGS = {"AttackConceptErasure": "Attack Erased Concept"}
