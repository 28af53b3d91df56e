"""The training loop: ESD targets from the frozen model, learnable prompt + weight deltas for the student.

Per iteration (x_t, t pairs come from trajectories sampled by the student, see trajectories.py):
  teacher (no deltas, no prompt), one batched call:   e0 = eps*(x_t, uncond), ep = eps*(x_t, c) [, eps*(x_t, c_p)]
  target = e0 - eta * (ep - e0)
  erase:    |eps_theta(x_t, c) - target|^2      without the prompt (lp, esd_*) or with it (lp_attached)
  key:      |eps_theta,P(x_t, c) - ep|^2         lp only: the prompt carries the concept, the weights lose it
  preserve: |eps_theta(x_t, c_p) - eps*(x_t, c_p)|^2   one preserved concept drawn per pair
"eps" is the UNet's own output: eps for eps models, v for v-prediction models (the ESD combination is affine,
so the same formula holds in either parameterisation).
"""
from __future__ import annotations

import datetime
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

import comfy.model_management
import comfy.utils

from ..erasure.concept_erasure import ConceptErasure, PromptPatch, model_context_dim
from ..erasure.version import PACK_VERSION
from .conditioning import (CondBatch, Prompt, check_width, conditioning_entries, encode_entries, pair_weights,
                           read_prompts)
from .deltas import DeltaSet, target_layers
from .denoiser import Denoiser
from .host_autograd import trainable_model
from .model_patches import model_patches
from .prediction import prediction_kind, sampling_schedule
from .settings import TrainSettings
from .trajectories import sample_trajectories


class TrainingError(RuntimeError):
    """Training stopped (e.g. the loss became NaN); no erasure was produced and the input model is unchanged."""


@dataclass
class TrainingResult:
    erasure: ConceptErasure
    losses: Dict[str, List[float]] = field(default_factory=dict)


def autocast_dtype(setting: str, device) -> Optional[torch.dtype]:
    """The autocast dtype, or None to compute in the weights' own dtype (fp32, and auto on the CPU)."""
    device = torch.device(device)
    if setting == "fp32" or (setting == "auto" and device.type != "cuda"):
        return None
    if setting == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[setting]


def default_resolution(context_dim: int) -> int:
    return 1024 if context_dim == 2048 else 512


def concept_names(label: str) -> List[str]:
    return [line.strip() for line in (label or "").splitlines() if line.strip()]


def train_erasure(model, concept, unconditional, preserve=None, settings: Optional[TrainSettings] = None,
                  concept_label: str = "", on_iteration: Optional[Callable[[int], None]] = None) -> TrainingResult:
    """Train an erasure of `concept` on `model` (a ComfyUI MODEL, never changed). Inputs are checked first.

    on_iteration(n) is called after each iteration n (1-based); the loop also advances a comfy ProgressBar and
    stops on ComfyUI's interrupt (InterruptProcessingException), like a sampler.
    """
    settings = (settings or TrainSettings()).validate()
    context_dim = model_context_dim(model)
    concept = conditioning_entries(concept, "concept")
    unconditional = conditioning_entries(unconditional, "unconditional", single=True)
    preserve = conditioning_entries(preserve, "preserve") if preserve is not None else []
    for name, cond in (("concept", concept), ("unconditional", unconditional), ("preserve", preserve)):
        check_width(cond, name, context_dim)
    sampling = model.get_model_object("model_sampling")
    kind = prediction_kind(sampling)
    concept, unconditional, preserve = (read_prompts(entries, name, sampling) for entries, name in (
        (concept, "concept"), (unconditional, "unconditional"), (preserve, "preserve")))
    recorded = _recorded_inputs(model, concept, preserve)
    try:
        with torch.inference_mode(False):
            result = _train(model, [p for p in concept if p.weight > 0], unconditional[0],
                            [p for p in preserve if p.weight > 0], settings, context_dim, kind,
                            concept_names(concept_label), on_iteration)
    finally:
        if torch.device(model.load_device).type != "cpu":
            comfy.model_management.soft_empty_cache()
    result.erasure.settings.update(recorded)
    return result


def _recorded_inputs(model, concept: List[Prompt], preserve: List[Prompt]) -> Dict[str, object]:
    """Stored with the settings: what the input model carried, and conditioning strengths / ranges if any."""
    recorded: Dict[str, object] = {"input_model_patches": model_patches(model)}
    if any(p.weight != 1.0 or p.timesteps is not None for p in concept + preserve):
        recorded["conditioning"] = {"concept": [p.record() for p in concept],
                                    "preserve": [p.record() for p in preserve]}
    return recorded


class _LossLog:
    """Loss values per term; read back from the device every `sync_every` iterations, checked for NaN/inf."""

    def __init__(self, settings: TrainSettings, sync_every: int):
        self.settings = settings
        self.sync_every = sync_every
        self.history: Dict[str, List[float]] = {}
        self.pending: List[Dict[str, torch.Tensor]] = []

    def add(self, iteration: int, terms: Dict[str, torch.Tensor]) -> None:
        self.pending.append({k: v.detach().float() for k, v in terms.items()})
        if len(self.pending) >= self.sync_every or iteration == self.settings.iterations:
            self._flush(iteration)

    def _flush(self, last_iteration: int) -> None:
        s = self.settings
        first = last_iteration - len(self.pending) + 1
        for name in self.pending[0]:
            values = torch.stack([p[name] for p in self.pending]).tolist()
            for offset, value in enumerate(values):
                if not math.isfinite(value):
                    raise TrainingError(
                        f"training diverged: the {name} loss is {value} at iteration {first + offset} of "
                        f"{s.iterations} (method {s.method}, learning_rate {s.learning_rate:g}); lower the learning "
                        "rate or use dtype fp32")
            self.history.setdefault(name, []).extend(values)
        self.pending.clear()


def _mse(a: torch.Tensor, b: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean squared error; with per-pair weights, each pair's mean times its weight, averaged over pairs."""
    if weights is None:
        return F.mse_loss(a, b)
    return ((a - b).pow(2).flatten(1).mean(1) * weights).mean()


def _loss_terms(denoiser: Denoiser, s: TrainSettings, x_t, sigma, uncond, concepts, preserves, backward,
                concept_weights: Optional[torch.Tensor] = None,
                preserve_weights: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """One iteration's loss terms, back-propagated (concepts / preserves: one cond per pair, or no preserves).

    concept_weights / preserve_weights: per pair (the conditioning's strength and range), None = all 1.
    """
    def run(conds, cond_or_uncond, x, sig, **views):
        return CondBatch(conds, cond_or_uncond).run(
            lambda xs, ss, cond, cu: denoiser.output(xs, ss, cond, cond_or_uncond=cu, **views), x, sig)

    chunks = 3 if preserves else 2
    with torch.no_grad():  # teacher: uncond, concept [, preserved concept] in one batch
        teacher = run([uncond] * len(concepts) + concepts + preserves, [1, 0, 0][:chunks],
                      x_t.repeat(chunks, 1, 1, 1), sigma.repeat(chunks), deltas=False, prompt=False)
    e0, ep, *kept = teacher.chunk(chunks)
    target = e0 - s.negative_guidance * (ep - e0)

    terms: Dict[str, torch.Tensor] = {}
    erase = s.erase_weight > 0
    if erase or preserves:  # student without the key prompt (with it for lp_attached): erase [+ preserve]
        parts = int(erase) + int(bool(preserves))
        student = run((concepts if erase else []) + preserves, [0] * parts, x_t.repeat(parts, 1, 1, 1),
                      sigma.repeat(parts), deltas=True, prompt=s.method == "lp_attached").chunk(parts)
        loss = 0.0
        if erase:
            terms["erase"] = _mse(student[0], target, concept_weights)
            loss = loss + s.erase_weight * terms["erase"]
        if preserves:
            terms["preserve"] = _mse(student[-1], kept[0], preserve_weights)
            loss = loss + s.preserve_weight * terms["preserve"]
        backward(loss)
    if s.trains_key:  # student with the key prompt reproduces the original concept
        keyed = run(concepts, [0], x_t, sigma, deltas=True, prompt=True)
        terms["key"] = _mse(keyed, ep, concept_weights)
        backward(s.key_weight * terms["key"])
    return terms


def _train(model, concept, unconditional, preserve, settings: TrainSettings, context_dim: int, kind: str,
           concepts: List[str], on_iteration) -> TrainingResult:
    s = settings
    use_preserve = bool(preserve) and s.preserve_weight > 0
    patcher = model.clone()
    base = patcher.model
    channels = getattr(base.latent_format, "latent_channels", None) or base.diffusion_model.in_channels
    size = (s.resolution or default_resolution(context_dim)) // 8
    latent_shape = (channels, size, size)
    rows = s.batch_size * (3 if use_preserve else 2)
    training_memory = 3 * patcher.memory_required([rows, *latent_shape])  # activations kept for backward
    comfy.model_management.load_models_gpu([patcher], memory_required=training_memory)
    device = torch.device(patcher.load_device)
    gen = torch.Generator().manual_seed(s.seed)

    concepts_c = encode_entries(base, concept, latent_shape, device, "positive", s.seed)
    uncond_c = encode_entries(base, [unconditional], latent_shape, device, "negative", s.seed)[0]
    preserve_c = encode_entries(base, preserve, latent_shape, device, "positive", s.seed) if use_preserve else []
    timesteps, sigmas, all_sigmas = sampling_schedule(base.model_sampling, s.sampling_steps)

    deltas = DeltaSet(target_layers(base.diffusion_model, s.method), s.rank, gen, device)
    groups = [{"params": deltas.parameters(), "lr": s.learning_rate}]
    prompt = None
    if s.uses_prompt:  # initialised at the scale of the text encoder's tokens
        scale = float(torch.cat([c["c_crossattn"].flatten().float().cpu() for c in concepts_c]).std())
        prompt_k = torch.nn.Parameter((torch.randn(s.prompt_tokens, context_dim, generator=gen) * scale).to(device))
        prompt_v = torch.nn.Parameter((torch.randn(s.prompt_tokens, context_dim, generator=gen) * scale).to(device))
        prompt = PromptPatch(prompt_k, prompt_v, s.placement)
        groups.append({"params": [prompt_k, prompt_v], "lr": s.prompt_learning_rate})
    optimizer = torch.optim.Adam(groups)
    amp = autocast_dtype(s.dtype, device)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 and device.type == "cuda" else None
    log = _LossLog(s, sync_every=1 if device.type == "cpu" else 10)
    progress = comfy.utils.ProgressBar(s.iterations)
    check_interrupt = comfy.model_management.throw_exception_if_processing_interrupted

    def backward(loss):
        (scaler.scale(loss) if scaler is not None else loss).backward()

    with trainable_model(base), deltas.attached():
        denoiser = Denoiser(patcher, deltas, prompt, kind, amp)
        pool = None
        for it in range(s.iterations):
            check_interrupt()
            if it % s.trajectory_refresh == 0:
                choice = torch.randint(len(concepts_c), (s.batch_size,), generator=gen).tolist()
                pool = sample_trajectories(denoiser, concepts_c, uncond_c, choice, latent_shape, timesteps, sigmas,
                                           all_sigmas, s.sampling_cfg, gen, prompt=s.method == "lp_attached",
                                           check_interrupt=check_interrupt,
                                           timestep_ranges=[p.timesteps for p in concept])
            x_t, sigma, picked = pool.draw(s.batch_size, gen)
            kept = torch.randint(len(preserve_c), (s.batch_size,), generator=gen).tolist() if use_preserve else []
            terms = _loss_terms(denoiser, s, x_t, sigma, uncond_c, [concepts_c[j] for j in picked],
                                [preserve_c[j] for j in kept], backward,
                                pair_weights([concept[j] for j in picked], device),
                                pair_weights([preserve[j] for j in kept], device, sigma, all_sigmas))
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            log.add(it + 1, terms)
            progress.update(1)
            if on_iteration is not None:
                on_iteration(it + 1)

    erasure = ConceptErasure(
        context_dim=context_dim,
        prompt_k=prompt.prompt_k.detach().float().cpu().clone() if prompt is not None else None,
        prompt_v=prompt.prompt_v.detach().float().cpu().clone() if prompt is not None else None,
        placement=s.placement,
        deltas=deltas.export(),
        prompt_at_inference=s.method == "lp_attached",
        concepts=concepts,
        method=s.method,
        settings=s.to_dict(),
        base_model=type(base.model_config).__name__,
        pack_version=PACK_VERSION,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    return TrainingResult(erasure, log.history)
