"""Save an erasure as a standard LoRA; make an erasure from published weights. Thin wrappers over erasure/."""
from __future__ import annotations

import logging
import os

from ..erasure.folders import lora_folder, list_weight_files, resolve_weight_file, save_lora
from ..erasure.lora_export import FORMATS, lora_tensors, write_lora_file
from ..erasure.weights_import import import_weights
from .types import CATEGORY, CONCEPT_ERASURE

log = logging.getLogger(__name__)


class SaveConceptErasureAsLoRA:
    DESCRIPTION = ("Saves an erasure as a standard LoRA file in models/loras (kohya key names), so ComfyUI's own "
                   "Load LoRA nodes, A1111/Forge and diffusers apply it without this pack. Only weight changes can be "
                   "a LoRA: erasures of method lp, esd_x and esd_u; lp_attached is refused (its prompt is part of the "
                   "model). Never overwrites: a number is added to the name.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "erasure": (CONCEPT_ERASURE, {"tooltip": "The erasure to share (from Train or Load Concept "
                                                         "Erasure)."}),
                "filename_prefix": ("STRING", {"default": "concept_erasure/erased", "tooltip":
                                    "Name inside models/loras (subfolders allowed, '..' is not); _00001_ etc. is "
                                    "appended. Load LoRA lists the file at once."}),
                "format": (list(FORMATS), {"default": "exact", "tooltip":
                           "exact: the deltas as trained (full ones as diffs diffusers cannot read); lora: all as low-rank factors, read "
                           "by ComfyUI, A1111/Forge and diffusers."}),
                "rank": ("INT", {"default": 32, "min": 1, "max": 4096, "step": 1, "tooltip":
                         "format lora only: the rank full deltas are compressed to; higher is closer to the erasure and larger."}),
            },
            "optional": {
                "model": ("MODEL", {"tooltip": "The base model the erasure was made for, to name its layers; without it the released "
                                               "SD1.x / SD2.x / SDXL layout is assumed."}),
            },
        }

    def save(self, erasure, filename_prefix, format, rank, model=None):
        export = lora_tensors(erasure, format, rank, model)
        path = save_lora(lambda p: write_lora_file(export, p), filename_prefix)
        name = os.path.relpath(path, lora_folder()).replace(os.sep, "/")
        if format == "lora":
            log.info("Saved %s: largest relative error of a layer %.3g (%s)", name, export.max_relative_error,
                     export.worst_layer or "none")
        return {"ui": {"lora_files": [name], "max_relative_error": [export.max_relative_error]}}


class LoadConceptErasureFromWeights:
    DESCRIPTION = ("Turns published weights into an erasure for the given base model: a LoRA file (kohya, ComfyUI "
                   "or diffusers keys; LECO, concept sliders, SPM, or this pack's export) becomes low-rank deltas; a "
                   "partial or full UNet state dict (ESD, UCE releases) becomes the difference to the model's "
                   "weights, where they differ. Safetensors only; the source is recorded in the erasure.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (CONCEPT_ERASURE,)
    RETURN_NAMES = ("erasure",)
    OUTPUT_TOOLTIPS = ("The erasure, for Apply Concept Erasure, Save Concept Erasure and Concept Erasure Report.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The base model the weights were made from, straight from its loader. "
                                           "It is not changed."}),
            "weights_name": (list_weight_files(), {"tooltip":
                             "A .safetensors file in models/loras or models/concept_erasure. Pickled files (.pt, "
                             ".ckpt, .bin) are refused with a note on converting them safely."}),
            "concept_label": ("STRING", {"default": "", "multiline": False, "tooltip":
                              "What the weights erase, stored in the erasure (published files rarely say). Several: "
                              "one per line. Empty keeps the file's own label, if any."}),
        }}

    def load(self, model, weights_name, concept_label):
        concepts = [c.strip() for c in concept_label.splitlines() if c.strip()]
        return (import_weights(resolve_weight_file(weights_name), model, concepts, weights_name),)


NODE_CLASS_MAPPINGS = {
    "SaveConceptErasureAsLoRA": SaveConceptErasureAsLoRA,
    "LoadConceptErasureFromWeights": LoadConceptErasureFromWeights,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "SaveConceptErasureAsLoRA": "Save Concept Erasure as LoRA",
    "LoadConceptErasureFromWeights": "Concept Erasure from Weights",
}
