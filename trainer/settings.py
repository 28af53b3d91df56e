"""Every training setting in one place, checked before anything is loaded or trained."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict

from ..erasure.concept_erasure import PLACEMENTS, ErasureError
from .setting_fields import (CHECKPOINTING, DTYPES, FACTOR_ALPHAS, FACTOR_SCALES, FIELDS, METHODS,  # noqa: F401 (re-exported)
                             PRESERVE_IMAGES, RETAINS)

PROMPT_METHODS = ("lp", "lp_attached")
MAX_SAMPLING_STEPS = 1000


class _Behaviour:
    """What one training run does (the fields are setting_fields.FIELDS); to_dict() is stored in the erasure file
    as its settings."""

    @property
    def uses_prompt(self) -> bool:
        return self.method in PROMPT_METHODS

    @property
    def adversarial(self) -> bool:
        """Robust training: an inner attack finds tokens that bring the concept back, and the erase term uses them."""
        return self.adversarial_steps > 0 and self.erase_weight > 0

    @property
    def factor_scale(self) -> str:
        """The factor_alpha that trains: auto is fan_in, and rank with adversarial_steps. On the pack's benchmark
        robust training with fan_in factors resisted the attack far less (RESULTS.md, "The attack"), while plain training needs fan_in to
        step like ESD's full deltas on SD1.5-sized layers (learning_rate.py)."""
        if self.factor_alpha != "auto":
            return self.factor_alpha
        return "rank" if self.adversarial else "fan_in"

    @property
    def trains_key(self) -> bool:
        """The key term (the model with the prompt reproduces the concept) exists only for `lp`."""
        return self.method == "lp" and self.key_weight > 0

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self):
        _choice("method", self.method, METHODS)
        _choice("placement", self.placement, PLACEMENTS)
        _choice("dtype", self.dtype, DTYPES)
        _choice("gradient_checkpointing", self.gradient_checkpointing, CHECKPOINTING)
        _choice("factor_alpha", self.factor_alpha, FACTOR_ALPHAS)
        _choice("retain", self.retain, RETAINS)
        _choice("preserve_images", self.preserve_images, PRESERVE_IMAGES)
        _at_least("retain_size", self.retain_size, 1)
        _finite("retain_watch", self.retain_watch)
        if self.retain_watch < 0:
            raise ErasureError(f"retain_watch must be 0 (off) or more, got {self.retain_watch}")
        _at_least("iterations", self.iterations, 1)
        _at_least("sampling_steps", self.sampling_steps, 1)
        if self.sampling_steps > MAX_SAMPLING_STEPS:
            raise ErasureError(f"sampling_steps must be at most {MAX_SAMPLING_STEPS} (the model's timesteps), "
                               f"got {self.sampling_steps}")
        _at_least("trajectory_refresh", self.trajectory_refresh, 1)
        _at_least("batch_size", self.batch_size, 1)
        _at_least("rank", self.rank, 0)
        _at_least("seed", self.seed, 0)
        _at_least("adversarial_steps", self.adversarial_steps, 0)
        _at_least("score_every", self.score_every, 0)
        _finite("stop_at_score", self.stop_at_score)
        if self.stop_at_score < 0:
            raise ErasureError(f"stop_at_score must be 0 (off) or more, got {self.stop_at_score}")
        _finite("min_score_rise", self.min_score_rise)
        if self.min_score_rise < 0:
            raise ErasureError(f"min_score_rise must be 0 (a fixed learning_rate) or more, got {self.min_score_rise}")
        if self.stop_at_score and not self.score_every:
            raise ErasureError("stop_at_score needs the score measured: set score_every above 0 (e.g. 50)")
        if self.adversarial_steps:
            _at_least("adversarial_every", self.adversarial_every, 1)
            _at_least("adversarial_tokens", self.adversarial_tokens, 1)
            _positive("adversarial_learning_rate", self.adversarial_learning_rate)
        if self.uses_prompt:
            _at_least("prompt_tokens", self.prompt_tokens, 1)
            _positive("prompt_learning_rate", self.prompt_learning_rate)
        _positive("learning_rate", self.learning_rate)
        _finite("output_strength", self.output_strength)
        if not 0 < self.output_strength <= 2:
            raise ErasureError(f"output_strength must be above 0 and at most 2 (1 = the deltas as trained), "
                               f"got {self.output_strength}")
        for name in ("negative_guidance", "sampling_cfg"):
            _finite(name, getattr(self, name))
        for name in ("erase_weight", "key_weight", "preserve_weight"):
            _finite(name, getattr(self, name))
            if getattr(self, name) < 0:
                raise ErasureError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.method == "lp" and self.key_weight == 0:
            raise ErasureError("method lp with key_weight 0 would save its prompt untrained (random) as the key; "
                               "set key_weight above 0 (default 0.1), or use esd_x to train weight deltas only")
        if self.erase_weight == 0 and not self.trains_key:
            raise ErasureError("erase_weight is 0 and there is no key term: nothing would be trained")
        if self.resolution != 0 and (self.resolution < 64 or self.resolution % 8):
            raise ErasureError(f"resolution must be 0 (the model's usual size) or a multiple of 8 from 64, "
                               f"got {self.resolution}")
        if self.method == "esd_u" and self.rank == 0:
            raise ErasureError("esd_u trains almost every weight of the UNet; full deltas would be as large as the "
                               "model. Set rank > 0 (e.g. 8) to train LoRA factors instead")
        return self


def default_resolution(context_dim: int) -> int:
    """resolution 0: the model's usual image size (SDXL 1024, SD1.x/SD2.x 512)."""
    return 1024 if context_dim == 2048 else 512


def _choice(name, value, choices):
    if value not in choices:
        raise ErasureError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def _at_least(name, value, low):
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ErasureError(f"{name} must be an integer of at least {low}, got {value!r}")


def _finite(name, value):
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ErasureError(f"{name} must be a finite number, got {value!r}")


def _positive(name, value):
    _finite(name, value)
    if value <= 0:
        raise ErasureError(f"{name} must be greater than 0, got {value}")


TrainSettings = dataclasses.make_dataclass(
    "TrainSettings", [(f.name, f.type, dataclasses.field(default=f.default)) for f in FIELDS], bases=(_Behaviour,),
    frozen=True)
TrainSettings.__module__ = __name__
TrainSettings.__doc__ = _Behaviour.__doc__
