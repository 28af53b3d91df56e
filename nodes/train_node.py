"""Train Concept Erasure: a thin node over trainer/."""
from __future__ import annotations

from ..erasure import apply_erasure
from ..report import draw_loss_curves
from ..trainer import TrainSettings, encode_candidates, train_erasure
from ..trainer.setting_fields import BY_NAME
from .types import CATEGORY, CONCEPT_ERASURE

# The widget order of every workflow saved since the node was made: never reorder, only append optional inputs.
REQUIRED = ("method", "iterations", "learning_rate", "prompt_learning_rate", "negative_guidance", "prompt_tokens",
            "placement", "erase_weight", "key_weight", "preserve_weight", "sampling_steps", "sampling_cfg",
            "trajectory_refresh", "batch_size", "resolution", "seed", "rank", "dtype", "gradient_checkpointing")
OPTIONAL = ("adversarial_steps", "adversarial_every", "adversarial_tokens", "adversarial_learning_rate",
            "score_every", "stop_at_score", "min_score_rise", "factor_alpha", "output_strength")
RETAIN_OPTIONAL = ("retain", "retain_candidates", "retain_size", "retain_watch", "preserve_images")
OUTPUTS = ("MODEL", CONCEPT_ERASURE, "IMAGE")
OUTPUT_NAMES = ("model", "erasure", "loss_curves")
OUTPUT_TOOLTIPS = (
    "The input model with the erasure applied, ready for a KSampler (the input model is unchanged).",
    "The trained erasure; save it with Save Concept Erasure.",
    "Loss per term over the iterations, the concept score (right axis) and, with a retain set, how far kept "
    "concepts moved.",
)
MODEL_TIP = "The SD1.x, SD2.x or SDXL model to erase from; it is not changed and is the frozen teacher."
CLIP_TIP = "The model's CLIP: the trainer uses it to find the concepts nearest the erased one and keep them."
CANDIDATES_TIP = "Your own candidates for the retain set, one per line; empty = the pack's vocabulary."


def widgets(names):
    return {name: BY_NAME[name].widget() if name in BY_NAME else EXTRA_WIDGETS[name] for name in names}


EXTRA_WIDGETS = {"retain_candidates": ("STRING", {"default": "", "multiline": True, "tooltip": CANDIDATES_TIP}),
                 "clip": ("CLIP", {"tooltip": CLIP_TIP})}


def run_training(model, concept, unconditional, preserve, values: dict, concept_label: str, clip,
                 retain_candidates: str = ""):
    """Train with `values` (setting name -> value; missing names keep the defaults); the nodes' shared body."""
    settings = TrainSettings(**values).validate()
    candidates = encode_candidates(clip, retain_candidates) if clip is not None and settings.retain != "off" else None
    result = train_erasure(model, concept, unconditional, preserve, settings, concept_label, candidates=candidates)
    recorded = result.erasure.settings
    curves = draw_loss_curves(result.losses, scores=result.scores, stop_at=settings.stop_at_score,
                              moved=result.moved, retain=result.retain,
                              rate_raises=recorded.get("learning_rate_raises", ()), stopped=recorded.get("stopped"))
    return (apply_erasure(model, result.erasure), result.erasure, curves)


class TrainConceptErasure:
    """Every setting as a widget; Erase Concept is the short way to the same training (help: web/docs/)."""

    DESCRIPTION = ("Erases a concept from a model by training, every setting as a widget: the node that workflows "
                   "shared before Erase Concept use. Returns the erased model, the erasure and the loss curves.")
    CATEGORY = CATEGORY
    RETURN_TYPES = OUTPUTS
    RETURN_NAMES = OUTPUT_NAMES
    OUTPUT_TOOLTIPS = OUTPUT_TOOLTIPS
    FUNCTION = "train"

    @classmethod
    def INPUT_TYPES(cls):
        required = {
            "model": ("MODEL", {"tooltip": MODEL_TIP}),
            "concept": ("CONDITIONING", {"tooltip": "What to erase: CLIP Text Encode of the concept; several with "
                                                    "Conditioning (Combine)."}),
            "unconditional": ("CONDITIONING", {"tooltip": "CLIP Text Encode of the empty prompt, same CLIP."}),
            **widgets(REQUIRED),
            "concept_label": ("STRING", {"default": "", "multiline": False, "tooltip":
                              "Name of the erased concept, stored in the file; several concepts one per line."}),
        }
        optional = {
            "preserve": ("CONDITIONING", {"tooltip": "Concepts to keep unchanged, the ones nearest the erased "
                                                     "concept first; Conditioning (Combine) for several."}),
            **widgets(OPTIONAL + ("clip",) + RETAIN_OPTIONAL),
        }
        return {"required": required, "optional": optional}

    def train(self, model, concept, unconditional, concept_label="", preserve=None, clip=None, retain_candidates="",
              **values):
        return run_training(model, concept, unconditional, preserve, values, concept_label, clip, retain_candidates)


NODE_CLASS_MAPPINGS = {"TrainConceptErasure": TrainConceptErasure}
NODE_DISPLAY_NAME_MAPPINGS = {"TrainConceptErasure": "Train Concept Erasure (Advanced)"}
