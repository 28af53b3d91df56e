"""Every training setting written once: name, default, range, group and tooltip.

TrainSettings (settings.py), the nodes' widgets (Train Concept Erasure (Advanced), Erase Concept and its settings
nodes) and the node reference are built from FIELDS. Tooltips say what a setting does, its unit and when to change
it, in one sentence; the evidence behind a default is on the node's help page (web/docs/) and in RESULTS.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from ..erasure.concept_erasure import PLACEMENTS

METHODS = ("lp", "lp_attached", "esd_x", "esd_u")
DTYPES = ("auto", "bf16", "fp16", "fp32")
CHECKPOINTING = ("auto", "on", "off")
FACTOR_SCALES = ("rank", "fan_in")  # what DeltaSet scales factors by (deltas.py)
FACTOR_ALPHAS = ("auto",) + FACTOR_SCALES  # auto: fan_in, or rank for robust training (factor_scale)
PRESERVE_IMAGES = ("own", "concept")  # where the preserve term is evaluated (iteration.py)
RETAINS = ("auto", "add", "off")  # auto: build a retain set when preserve is not connected (retain_set.py)
MAX_SEED = 0xFFFFFFFFFFFFFFFF

# The settings nodes that feed Erase Concept, one job each; "main" fields are Erase Concept's own widgets.
GROUPS = ("main", "training", "keep", "robust", "memory")


@dataclass(frozen=True)
class Field:
    name: str
    default: Any
    group: str
    tip: str
    low: Optional[float] = None
    high: Optional[float] = None
    step: Optional[float] = None
    choices: Optional[Tuple[str, ...]] = None

    @property
    def type(self) -> type:
        return str if self.choices else type(self.default)

    def widget(self) -> tuple:
        """The ComfyUI input spec of this setting."""
        if self.choices:
            return (list(self.choices), {"default": self.default, "tooltip": self.tip})
        kind = "INT" if isinstance(self.default, int) else "FLOAT"
        options = {"default": self.default, "min": self.low, "max": self.high, "step": self.step, "tooltip": self.tip}
        return (kind, options)


def _int(name, default, group, low, high, tip, step=1):
    return Field(name, default, group, tip, low, high, step)


def _float(name, default, group, low, high, step, tip):
    return Field(name, float(default), group, tip, low, high, step)


def _choice(name, default, group, choices, tip):
    return Field(name, default, group, tip, choices=tuple(choices))


FIELDS: Tuple[Field, ...] = (
    _choice("method", "lp", "main", METHODS,
            "lp: hide the concept behind a learned prompt (the key); lp_attached: keep the prompt at inference; "
            "esd_x / esd_u: the ESD baselines."),
    _int("iterations", 1000, "main", 1, 100000, "Training steps; the most it trains when stop_at_score is set."),
    _float("learning_rate", 1e-5, "training", 1e-8, 1.0, 1e-7,
           "Adam rate of the weight deltas at the start (ESD's 1e-5); min_score_rise raises it where the model "
           "needs more."),
    _float("prompt_learning_rate", 1e-3, "training", 1e-8, 1.0, 1e-7, "Adam rate of the prompt tokens (lp methods)."),
    _float("negative_guidance", 2.0, "training", 0.0, 10.0, 0.1,
           "How far the concept is pushed away from itself in the ESD target (ESD uses 1); raise it if the concept "
           "is still drawn."),
    _int("prompt_tokens", 10, "training", 1, 77, "Number of learnable prompt tokens (lp methods)."),
    _choice("placement", "mid", "training", PLACEMENTS,
            "Cross-attention blocks that get the prompt tokens (lp methods): middle, middle + output, or all."),
    _float("erase_weight", 1.0, "training", 0.0, 100.0, 0.01, "Weight of the erase (ESD) term."),
    _float("key_weight", 0.1, "training", 0.0, 100.0, 0.01,
           "Weight of the key term (lp only, above 0): the model with the prompt must still draw the concept."),
    _float("preserve_weight", 1.0, "keep", 0.0, 100.0, 0.01,
           "Weight of the term that holds kept concepts to the original; raise it (e.g. 3) for robust training."),
    _int("sampling_steps", 50, "training", 1, 1000, "Euler steps used to generate the training images."),
    _float("sampling_cfg", 3.0, "training", 0.0, 30.0, 0.1, "CFG used to generate the training images."),
    _int("trajectory_refresh", 25, "training", 1, 100000,
         "Iterations between fresh training images; 1 samples every iteration like ESD (much slower)."),
    _int("batch_size", 1, "training", 1, 64, "Training pairs per iteration, and trajectories per refresh."),
    _int("resolution", 0, "training", 0, 2048, "Training image size in pixels; 0 = the model's usual (512, SDXL 1024).",
         step=8),
    _int("seed", 0, "main", 0, MAX_SEED, "Seed of every random draw; the same seed gives the same erasure on the CPU."),
    _int("rank", 32, "training", 0, 1024,
         "Rank of the weight deltas' LoRA factors; 0 = full deltas as ESD trains them (large files, not for esd_u)."),
    _choice("dtype", "auto", "memory", DTYPES,
            "Dtype the model computes in while training; auto = as ComfyUI loaded it (fp16/bf16 on a GPU, fp32 on "
            "the CPU)."),
    _choice("gradient_checkpointing", "auto", "memory", CHECKPOINTING,
            "Recompute activations in backward: less memory, slower; auto = only when the run would not fit "
            "otherwise."),
    _int("adversarial_steps", 0, "robust", 0, 1000,
         "Robust training (0 = off): attack steps that look for tokens bringing the concept back, trained against."),
    _int("adversarial_every", 5, "robust", 1, 100000, "Iterations between refits of the adversarial tokens."),
    _int("adversarial_tokens", 8, "robust", 1, 75, "Adversarial tokens appended to the concept."),
    _float("adversarial_learning_rate", 1e-2, "robust", 1e-6, 10.0, 1e-4, "Adam rate of the adversarial tokens."),
    _int("score_every", 50, "training", 0, 100000,
         "Iterations between measurements of the concept score (drawn on the curves, stored in the file); 0 = off."),
    _float("stop_at_score", 0.0, "training", 0.0, 5.0, 0.01,
           "Stop once the concept score reaches this (0.5 = like the empty prompt, 1 = ESD's target); 0 = run every "
           "iteration."),
    _float("min_score_rise", 0.5, "training", 0.0, 10.0, 0.01,
           "Double the learning rate while the concept score rises less than this per 100 iterations at the start; "
           "0 = fixed rate."),
    _choice("factor_alpha", "auto", "training", FACTOR_ALPHAS,
            "Scale of rank factors: fan_in steps like full deltas, rank like a usual LoRA; auto = fan_in, rank for "
            "robust training."),
    _float("output_strength", 1.0, "training", 0.05, 2.0, 0.05,
           "Share of the trained deltas saved; lower it (e.g. 0.7) if neighbouring concepts go with the erased one."),
    _choice("preserve_images", "own", "keep", PRESERVE_IMAGES,
            "Hold kept concepts to the original on their own images (own) or on the erased concept's (concept)."),
    _choice("retain", "auto", "keep", RETAINS,
            "Keep the nearest concepts the trainer finds with the CLIP: auto when you name none, add to yours, or "
            "off."),
    _int("retain_size", 8, "keep", 1, 64, "How many of the nearest concepts retain keeps."),
    _float("retain_watch", 0.0, "keep", 0.0, 10.0, 0.01,
           "Double a kept concept's weight each time it has moved more than this (the report's 'moved'); 0 = off."),
)

BY_NAME: Dict[str, Field] = {f.name: f for f in FIELDS}


def group_fields(group: str) -> Tuple[Field, ...]:
    return tuple(f for f in FIELDS if f.group == group)
