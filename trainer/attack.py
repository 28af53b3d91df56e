"""Erased or only hidden? A white-box attack that tries to bring an erased concept back.

Continuous tokens are appended to the concept's text encoding (the cross-attention context, i.e. what a
CONDITIONING holds) and optimised so that the erased model's noise prediction on x_t of the concept matches the
original model's (a soft-prompt / textual-inversion attack). x_t comes from trajectories of the concept sampled by
the original model, as the trainer samples its own. If the knowledge is still in the erased weights, a few tokens
find it; the tokens are a CONDITIONING a KSampler can use.

The tokens are an Adversary (adversary.py), the same one robust training runs inside its loop.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch

import comfy.model_management
import comfy.utils

from ..erasure.concept_erasure import ErasureError, family_name, model_context_dim
from ..erasure.conditioning_checks import check_width, conditioning_entries
from .adversary import Adversary, Predict
from .conditioning import CondBatch, encode_entries, weighted_mse
from .denoiser import Denoiser
from .host_autograd import trainable_model
from .prediction import prediction_kind, sampling_schedule
from .settings import default_resolution
from .trajectories import sample_trajectories

EVAL_CHUNK = 8


@dataclass(frozen=True)
class AttackSettings:
    tokens: int = 8
    iterations: int = 200
    learning_rate: float = 1e-2
    seed: int = 0
    pairs: int = 32             # (x_t, t) pairs drawn once from the original's trajectories; the loss is over them
    batch_size: int = 4         # pairs per attack step
    trajectories: int = 2
    sampling_steps: int = 50
    sampling_cfg: float = 3.0
    resolution: int = 0         # 0: the model's usual size

    def validate(self) -> "AttackSettings":
        for name, low in (("tokens", 1), ("iterations", 1), ("pairs", 1), ("batch_size", 1), ("trajectories", 1),
                          ("sampling_steps", 1), ("seed", 0), ("resolution", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ErasureError(f"attack {name} must be an integer of at least {low}, got {value!r}")
        if self.resolution and (self.resolution < 64 or self.resolution % 8):
            raise ErasureError(f"attack resolution must be 0 or a multiple of 8 from 64, got {self.resolution}")
        for name in ("learning_rate", "sampling_cfg"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ErasureError(f"attack {name} must be a finite number, got {value!r}")
        if self.learning_rate <= 0:
            raise ErasureError(f"attack learning_rate must be greater than 0, got {self.learning_rate}")
        return self


@dataclass
class AttackResult:
    conditioning: list          # the concept's CONDITIONING with the adversarial tokens appended to each entry
    tokens: torch.Tensor        # [tokens, width] float32, CPU
    loss_before: float          # erased vs original on the pairs, plain concept
    loss_after: float           # the same with the tokens appended
    losses: List[float] = field(default_factory=list)  # per step (its minibatch, before the step)

    def summary(self) -> str:
        recovered = 1 - self.loss_after / self.loss_before if self.loss_before > 0 else 0.0
        return (f"Attack on the erased concept: {self.tokens.shape[0]} adversarial tokens, {len(self.losses)} "
                f"iterations. Loss (erased model's noise prediction vs the original's, on the original's x_t of the "
                f"concept): before {self.loss_before:.4g}, after {self.loss_after:.4g} "
                f"({100 * recovered:.0f}% of the gap closed). A large closed share means the concept was hidden "
                "rather than removed: sample with the adversarial conditioning to see what came back.")


def attack_erasure(erased_model, original_model, concept, unconditional,
                   settings: Optional[AttackSettings] = None,
                   on_iteration: Optional[Callable[[int], None]] = None) -> AttackResult:
    """Find tokens that make `erased_model` predict for the concept what `original_model` predicts. Neither input
    model is changed (both are cloned; the clones are loaded as a sampler loads a model)."""
    s = (settings or AttackSettings()).validate()
    dims = {name: model_context_dim(m) for name, m in (("original_model", original_model),
                                                        ("erased_model", erased_model))}
    if dims["original_model"] != dims["erased_model"]:
        raise ErasureError(f"original_model is {family_name(dims['original_model'])} but erased_model is "
                           f"{family_name(dims['erased_model'])}; attack an erased model with its own original")
    context_dim = dims["original_model"]
    concept = conditioning_entries(concept, "concept")
    unconditional = conditioning_entries(unconditional, "unconditional", single=True)
    for name, cond in (("concept", concept), ("unconditional", unconditional)):
        check_width(cond, name, context_dim)
    kinds = {prediction_kind(m.get_model_object("model_sampling")) for m in (original_model, erased_model)}
    if len(kinds) != 1:
        raise ErasureError("original_model and erased_model predict different things (eps and v); attack an erased "
                           "model with its own original")
    try:
        with torch.inference_mode(False):
            return _attack(erased_model.clone(), original_model.clone(), concept, unconditional[0], s, context_dim,
                           kinds.pop(), on_iteration)
    finally:
        if torch.device(original_model.load_device).type != "cpu":
            comfy.model_management.soft_empty_cache()


def _predictor(denoiser: Denoiser) -> Predict:
    def predict(x, sigma, conds):
        return CondBatch(conds, [0]).run(
            lambda xs, ss, cond, cu: denoiser.output(xs, ss, cond, cond_or_uncond=cu, deltas=False, prompt=False),
            x, sigma)
    return predict


def _in_chunks(predict: Predict, x, sigma, conds) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([predict(x[i:i + EVAL_CHUNK], sigma[i:i + EVAL_CHUNK], conds[i:i + EVAL_CHUNK])
                          for i in range(0, x.shape[0], EVAL_CHUNK)])


def _attack(erased, original, concept, unconditional, s: AttackSettings, context_dim: int, kind: str,
            on_iteration) -> AttackResult:
    base = original.model
    channels = getattr(base.latent_format, "latent_channels", None) or base.diffusion_model.in_channels
    resolution = s.resolution or default_resolution(context_dim)
    latent_shape = (channels, resolution // 8, resolution // 8)
    device = torch.device(original.load_device)
    gen = torch.Generator().manual_seed(s.seed)
    concepts_c = encode_entries(base, concept, latent_shape, device, "positive", s.seed)
    uncond_c = encode_entries(base, [unconditional], latent_shape, device, "negative", s.seed)[0]
    timesteps, sigmas, all_sigmas = sampling_schedule(base.model_sampling, s.sampling_steps)
    check_interrupt = comfy.model_management.throw_exception_if_processing_interrupted
    progress = comfy.utils.ProgressBar(s.iterations)

    comfy.model_management.load_models_gpu([original])
    with trainable_model(base):
        teacher = Denoiser(base, original.model_options.get("transformer_options", {}), device, None, None, kind)
        choice = [i % len(concepts_c) for i in range(s.trajectories)]
        pool = sample_trajectories(teacher, concepts_c, uncond_c, choice, latent_shape, timesteps, sigmas, all_sigmas,
                                   s.sampling_cfg, gen, prompt=False, check_interrupt=check_interrupt)
        x_t, sigma, picked = pool.draw(s.pairs, gen)
        conds = [concepts_c[j] for j in picked]
        target = _in_chunks(_predictor(teacher), x_t, sigma, conds)

    comfy.model_management.load_models_gpu([erased])
    adversary = Adversary(s.tokens, s.learning_rate, gen)
    adversary.start(concepts_c)
    losses = []
    with trainable_model(erased.model):
        predict = _predictor(Denoiser(erased.model, erased.model_options.get("transformer_options", {}), device,
                                      None, None, kind))
        before = float(weighted_mse(_in_chunks(predict, x_t, sigma, conds), target))
        for it in range(s.iterations):
            check_interrupt()
            rows = torch.randperm(s.pairs, generator=gen)[:s.batch_size].tolist()
            losses.append(adversary.step(predict, x_t[rows], sigma[rows], [conds[i] for i in rows], target[rows]))
            progress.update(1)
            if on_iteration is not None:
                on_iteration(it + 1)
        with_tokens = [adversary.append(c, detach=True) for c in conds]
        after = float(weighted_mse(_in_chunks(predict, x_t, sigma, with_tokens), target))
    tokens = adversary.tokens.detach().float().cpu().clone()
    adversarial = [[torch.cat([entry[0], tokens.to(entry[0].dtype).unsqueeze(0).expand(entry[0].shape[0], -1, -1)],
                              dim=1), dict(entry[1])] for entry in concept]
    return AttackResult(adversarial, tokens, before, after, torch.stack(losses).tolist() if losses else [])
