"""Erase Concept, the front door: model, CLIP and the concept as text; and the settings nodes that feed it, one job
each. Both train exactly as Train Concept Erasure (Advanced) does with the same settings (train_node.run_training).
"""
from __future__ import annotations

from ..erasure.concept_erasure import ErasureError
from ..trainer.conditioning import encode_text
from ..trainer.erasure_loop import concept_names as lines  # one concept per line, blank lines dropped
from ..trainer.setting_fields import BY_NAME, group_fields
from .train_node import MODEL_TIP, OUTPUT_NAMES, OUTPUT_TOOLTIPS, OUTPUTS, run_training, widgets
from .types import CATEGORY, ERASURE_SETTINGS


def encode_lines(clip, texts):
    """One CONDITIONING holding each text as CLIP Text Encode gives it, combined as Conditioning (Combine) does."""
    return [entry for text in texts for entry in encode_text(clip, text)]


class EraseConcept:
    DESCRIPTION = ("Erases a concept from a model by training, inside ComfyUI: type the concept, Run. Returns the "
                   "erased model, the erasure (save it with Save Concept Erasure) and the loss curves.")
    CATEGORY = CATEGORY
    RETURN_TYPES = OUTPUTS
    RETURN_NAMES = OUTPUT_NAMES
    OUTPUT_TOOLTIPS = OUTPUT_TOOLTIPS
    FUNCTION = "erase"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": MODEL_TIP}),
                "clip": ("CLIP", {"tooltip": "The model's CLIP: it encodes the text and finds the concepts nearest the "
                                             "erased one to keep."}),
                "concept": ("STRING", {"default": "", "multiline": True, "tooltip":
                            "What to erase, one concept per line (e.g. Van Gogh); also the name stored in the file."}),
                "keep": ("STRING", {"default": "", "multiline": True, "tooltip":
                         "Concepts to keep unchanged, one per line; empty = the trainer finds the nearest itself."}),
                **widgets(f.name for f in group_fields("main")),
            },
            "optional": {
                "settings": (ERASURE_SETTINGS, {"tooltip": "From the Erasure ... Settings nodes; what they do not set "
                                                           "keeps its default."}),
            },
        }

    def erase(self, model, clip, concept, keep, settings=None, **main):
        concepts = lines(concept)
        if not concepts:
            raise ErasureError("Erase Concept: type the concept to erase (one per line), e.g. Van Gogh")
        kept = [k for k in lines(keep) if k not in concepts]
        values = dict(settings or {})
        candidates = values.pop("retain_candidates", "")
        values.update(main)
        preserve = encode_lines(clip, kept) if kept else None
        return run_training(model, encode_lines(clip, concepts), encode_text(clip, ""), preserve, values,
                            "\n".join(concepts), clip, candidates)


class _SettingsNode:
    """Outputs the settings it was given over those of the settings node chained into it."""

    GROUP = ""
    EXTRA = ()
    CATEGORY = CATEGORY + "/settings"
    RETURN_TYPES = (ERASURE_SETTINGS,)
    RETURN_NAMES = ("settings",)
    OUTPUT_TOOLTIPS = ("Connect to Erase Concept's settings (or to another settings node).",)
    FUNCTION = "settings"

    @classmethod
    def INPUT_TYPES(cls):
        names = [f.name for f in group_fields(cls.GROUP)] + list(cls.EXTRA)
        return {"required": widgets(names),
                "optional": {"settings": (ERASURE_SETTINGS, {"tooltip": "Settings from another settings node, "
                                                                        "combined with these."})}}

    def settings(self, settings=None, **values):
        unknown = [k for k in values if k not in BY_NAME and k not in self.EXTRA]
        if unknown:
            raise ErasureError(f"{type(self).__name__}: unknown settings {unknown}")
        return ({**(settings or {}), **values},)


class ErasureTrainingSettings(_SettingsNode):
    DESCRIPTION = "How Erase Concept trains: learning rates, guidance, prompt tokens, sampling, rank, scoring, stopping."
    GROUP = "training"


class ErasureKeepSettings(_SettingsNode):
    DESCRIPTION = "What Erase Concept keeps: the preserve weight and the retain set the trainer finds."
    GROUP = "keep"
    EXTRA = ("retain_candidates",)


class ErasureRobustSettings(_SettingsNode):
    DESCRIPTION = "Robust training: an inner attack during training, so the erased concept resists being brought back."
    GROUP = "robust"


class ErasureMemorySettings(_SettingsNode):
    DESCRIPTION = "Memory: the dtype the model trains in and gradient checkpointing."
    GROUP = "memory"


NODE_CLASS_MAPPINGS = {
    "EraseConcept": EraseConcept,
    "ErasureTrainingSettings": ErasureTrainingSettings,
    "ErasureKeepSettings": ErasureKeepSettings,
    "ErasureRobustSettings": ErasureRobustSettings,
    "ErasureMemorySettings": ErasureMemorySettings,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "EraseConcept": "Erase Concept",
    "ErasureTrainingSettings": "Erasure Training Settings",
    "ErasureKeepSettings": "Erasure Keep Settings",
    "ErasureRobustSettings": "Erasure Robust Settings",
    "ErasureMemorySettings": "Erasure Memory Settings",
}
