"""Load / Apply / Save / Recover nodes: thin wrappers over erasure/."""
from __future__ import annotations

import os

from ..erasure import apply_erasure, list_erasures, save_erasure
from ..erasure.concept_erasure import ErasureError
from ..erasure.file_format import PRECISIONS
from ..erasure.folders import default_folder, load_named_erasure
from .types import CATEGORY, CONCEPT_ERASURE

_ERASURE_TIP = "A concept erasure: learned prompt tokens and weight deltas, from Load Concept Erasure or Erase Concept."
_MODEL_TIP = "The original model (the one the erasure was trained on, or the same family). It is not changed."


class LoadConceptErasure:
    DESCRIPTION = "Loads a concept erasure (.safetensors) from models/concept_erasure, checking the file first."
    CATEGORY = CATEGORY
    RETURN_TYPES = (CONCEPT_ERASURE,)
    RETURN_NAMES = ("erasure",)
    OUTPUT_TOOLTIPS = ("The loaded erasure, for Apply Concept Erasure or Recover Erased Concept.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"erasure_name": (list_erasures(), {
            "tooltip": "An erasure file in models/concept_erasure (or a path added for concept_erasure in "
                       "extra_model_paths.yaml)."})}}

    def load(self, erasure_name):
        return (load_named_erasure(erasure_name),)


class ApplyConceptErasure:
    DESCRIPTION = ("Applies a concept erasure to a model: adds its weight deltas (scaled by strength) and, for "
                   "erasures trained with the prompt kept at inference, attaches the learned prompt tokens to "
                   "the cross-attention. Returns a patched copy; the input model is unchanged.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with the concept erased, ready for a KSampler.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": _MODEL_TIP}),
            "erasure": (CONCEPT_ERASURE, {"tooltip": _ERASURE_TIP}),
            "strength": ("FLOAT", {"default": 1.0, "min": -2.0, "max": 2.0, "step": 0.05, "tooltip":
                         "Scales the weight deltas: 1 = as trained, 0 = off (model unchanged), negative pushes "
                         "the other way. The prompt tokens are attached whenever strength is not 0."}),
        }}

    def apply(self, model, erasure, strength):
        return (apply_erasure(model, erasure, strength),)


class RecoverErasedConcept:
    DESCRIPTION = ("Applies an erasure together with its learned prompt, the 'key' of the paper's v3: the erased "
                   "weights hide the concept, and with the key attached the model can generate it again. Use it "
                   "to check that knowledge was hidden rather than destroyed. The input model is unchanged. "
                   "Erasures of method lp_attached have no key (Apply already attaches their prompt): refused.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The erased model with the key prompt attached.",)
    FUNCTION = "recover"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": _MODEL_TIP}),
            "erasure": (CONCEPT_ERASURE, {"tooltip": "An erasure trained with method lp; its learned prompt is "
                                                     "the key."}),
        }}

    def recover(self, model, erasure):
        if not erasure.has_prompt:
            raise ErasureError(f"this erasure (method {erasure.method or 'unknown'}) has no learned prompt, so "
                               "there is no key to recover the concept with; train it with method lp")
        if erasure.prompt_at_inference:
            raise ErasureError(f"this erasure (method {erasure.method or 'unknown'}) keeps its prompt attached at "
                               "inference, so Apply Concept Erasure already attaches it and Recover would return the "
                               "same model: the prompt is part of the erasure, not a key. Train with method lp for an "
                               "erasure whose prompt is a key")
        return (apply_erasure(model, erasure, 1.0, attach_prompt=True),)


class SaveConceptErasure:
    DESCRIPTION = ("Saves an erasure to models/concept_erasure as .safetensors with its settings in the header, the "
                   "weight deltas in fp16 unless asked otherwise. Never overwrites: a number is added to the name, as "
                   "ComfyUI's savers do.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "erasure": (CONCEPT_ERASURE, {"tooltip": "The erasure to save (from Erase Concept or Load Concept Erasure)."}),
            "filename_prefix": ("STRING", {"default": "concept_erasure/erased", "tooltip":
                                "Name inside models/concept_erasure (a leading 'concept_erasure/' is optional; "
                                "subfolders allowed, '..' is not). _00001_ etc. is appended."}),
            "precision": (list(PRECISIONS), {"default": "fp16", "tooltip":
                          "dtype of the stored weight deltas: fp16 halves the file, bf16 keeps fp32's range, fp32 stores them exactly; "
                          "prompt tokens are stored exactly."}),
        }}

    def save(self, erasure, filename_prefix, precision="fp16"):
        path = save_erasure(erasure, filename_prefix, precision)
        name = os.path.relpath(path, default_folder()).replace(os.sep, "/")
        return {"ui": {"erasure_files": [name]}}


NODE_CLASS_MAPPINGS = {
    "LoadConceptErasure": LoadConceptErasure,
    "ApplyConceptErasure": ApplyConceptErasure,
    "SaveConceptErasure": SaveConceptErasure,
    "RecoverErasedConcept": RecoverErasedConcept,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LoadConceptErasure": "Load Concept Erasure",
    "ApplyConceptErasure": "Apply Concept Erasure",
    "SaveConceptErasure": "Save Concept Erasure",
    "RecoverErasedConcept": "Recover Erased Concept (key)",
}
