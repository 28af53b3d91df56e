"""Concept Erasure Report: the original and the erased model side by side, with a concept score per prompt."""
from __future__ import annotations

from ..report import compare_models
from .types import CATEGORY


class ConceptErasureReport:
    DESCRIPTION = ("Samples every prompt with the original and the erased model from the same seed (rows = prompts, "
                   "columns = original | erased; euler, normal schedule) and scores each prompt without a "
                   "classifier: how far the erased model's noise prediction moved from the original's toward ESD's "
                   "erasure target. Erased concepts should score high, concepts to keep near 0.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("grid", "summary")
    OUTPUT_TOOLTIPS = ("Rows = prompts in the order they were combined; left = original, right = erased.",
                       "Per prompt: 'toward' (0 = unchanged, 0.5 = like the empty prompt, 1 = ESD's target) and "
                       "'moved' (size of the change in any direction, same scale).")
    FUNCTION = "report"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "original_model": ("MODEL", {"tooltip": "The model before erasure."}),
                "erased_model": ("MODEL", {"tooltip": "The same model with the erasure applied (Apply Concept "
                                                      "Erasure), or any model of the same family to compare."}),
                "prompts": ("CONDITIONING", {"tooltip": "The test prompts: the erased concept and concepts to keep, "
                                                        "each from its own CLIP Text Encode, joined with "
                                                        "Conditioning (Combine). Each entry is one row."}),
                "unconditional": ("CONDITIONING", {"tooltip": "The negative / empty prompt used for guidance and as "
                                                              "the 'empty prompt' of the score."}),
                "vae": ("VAE", {"tooltip": "Decodes the grid (the checkpoint's VAE)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "tooltip":
                                 "Noise seed; every cell starts from the same noise."}),
                "steps": ("INT", {"default": 20, "min": 1, "max": 200, "tooltip": "Sampling steps per image."}),
                "width": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 8, "tooltip": "Image width."}),
                "height": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 8, "tooltip": "Image height."}),
                "cfg": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 30.0, "step": 0.1, "round": 0.01,
                                  "tooltip": "Classifier-free guidance scale for the grid."}),
            },
            "optional": {
                "labels": ("STRING", {"multiline": True, "default": "", "tooltip":
                                      "One label per prompt, one per line, in the order the prompts were "
                                      "combined (used in the summary). Empty = prompt 1, prompt 2, ..."}),
            },
        }

    def report(self, original_model, erased_model, prompts, unconditional, vae, seed, steps, width, height, cfg,
               labels=""):
        grid, summary, _ = compare_models(original_model, erased_model, prompts, unconditional, vae, labels, seed,
                                          steps, width, height, cfg)
        # The summary also goes to the history as text, so the server's client (scripts/demo.py) can print it.
        return {"ui": {"text": [summary]}, "result": (grid, summary)}


NODE_CLASS_MAPPINGS = {"ConceptErasureReport": ConceptErasureReport}
NODE_DISPLAY_NAME_MAPPINGS = {"ConceptErasureReport": "Concept Erasure Report"}
