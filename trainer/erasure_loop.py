"""The training loop: ESD targets from the frozen model, learnable prompt + weight deltas for the student
(the terms are in iteration.py). Before the first iteration the run's memory is planned and the model is loaded
whole onto its device, or the run is refused (memory_plan.py).
"""
from __future__ import annotations

import datetime
import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

import comfy.model_management
import comfy.utils

from ..erasure.concept_erasure import ConceptErasure, model_context_dim
from ..erasure.conditioning_checks import check_width, conditioning_entries
from ..erasure.version import PACK_VERSION
from .checkpointing import checkpointed_transformers
from .conditioning import Prompt, encode_entries, pair_weights, read_prompts
from .denoiser import Denoiser
from .erasure_score import HeldOutScore
from .host_autograd import trainable_model
from .iteration import build_trainables, loss_terms, optimizer_step
from .learning_rate import RateRaise
from .memory_plan import MemoryPlan, MemoryPlanner, RunShape
from .model_loading import plan_and_load
from .model_patches import model_patches
from .precision import compute_dtype, loss_scaler, weight_dtype
from .prediction import prediction_kind, sampling_schedule
from .retain_set import SAMPLES as RETAIN_SAMPLES, Candidates, RetainSet, choose
from .settings import TrainSettings, default_resolution
from .trajectories import kept_trajectories, sample_trajectories

log = logging.getLogger(__name__)
# The evidence behind these warnings is in benchmarks/RESULTS.md ("The attack") and on the trainer's help page.
ROBUST_WITHOUT_PRESERVE = (
    "adversarial_steps without a preserve conditioning: robust training also erases concepts near the one you "
    "erase. Connect preserve with the concepts to keep, the ones closest to the erased concept first, and raise "
    "preserve_weight (e.g. 3); or connect clip, and the trainer finds them itself (retain).")
ROBUST_WITH_FAN_IN = (
    "adversarial_steps with factor_alpha fan_in: robust training resisted the attack far less this way than with "
    "factor_alpha rank on the pack's benchmark. Set factor_alpha to auto (the default, rank for robust training) "
    "or rank.")
ROBUST_BELOW_FULL_STRENGTH = (
    "adversarial_steps with output_strength {strength:g}: robust training resisted the attack with all of its deltas "
    "saved, and less below that on the pack's benchmark. Set output_strength to 1 for robust training.")

MAX_WATCH_WEIGHT = 16.0  # retain_watch doubles a kept concept's preserve weight at most to this


class TrainingError(RuntimeError):
    """Training stopped (e.g. the loss became NaN); no erasure was produced and the input model is unchanged."""


@dataclass
class TrainingResult:
    erasure: ConceptErasure
    losses: Dict[str, List[float]] = field(default_factory=dict)
    memory: Optional[MemoryPlan] = None
    scores: List[Tuple[int, float]] = field(default_factory=list)  # (iteration, concept score), erasure_score.py
    moved: List[Tuple[int, float]] = field(default_factory=list)  # (iteration, most any kept concept moved)
    retain: Optional[RetainSet] = None


def concept_names(label: str) -> List[str]:
    return [line.strip() for line in (label or "").splitlines() if line.strip()]


def train_erasure(model, concept, unconditional, preserve=None, settings: Optional[TrainSettings] = None,
                  concept_label: str = "", on_iteration: Optional[Callable[[int], None]] = None,
                  candidates: Optional[Candidates] = None) -> TrainingResult:
    """Train an erasure of `concept` on `model` (a ComfyUI MODEL, never changed). Inputs are checked first.

    candidates (retain_set.encode_candidates, from the user's CLIP): what the trainer builds its retain set from
    when settings.retain asks for one (auto: when nothing is kept through `preserve`).

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
    kept = [p for p in preserve if p.weight > 0]
    retain_from = _retain_candidates(settings, candidates, kept, context_dim, sampling)
    if settings.adversarial and not kept and retain_from is None:
        log.warning(ROBUST_WITHOUT_PRESERVE)
    if settings.adversarial and settings.rank > 0 and settings.factor_scale == "fan_in":
        log.warning(ROBUST_WITH_FAN_IN)
    if settings.adversarial and settings.output_strength < 1:
        log.warning(ROBUST_BELOW_FULL_STRENGTH.format(strength=settings.output_strength))
    try:
        with torch.inference_mode(False):
            result = _train(model, [p for p in concept if p.weight > 0], unconditional[0], kept, settings,
                            context_dim, kind, concept_names(concept_label), on_iteration, retain_from)
    finally:
        if torch.device(model.load_device).type != "cpu":
            comfy.model_management.soft_empty_cache()
    result.erasure.settings.update(recorded)
    return result


def _retain_candidates(s: TrainSettings, candidates: Optional[Candidates], kept: List[Prompt], context_dim: int,
                       sampling) -> Optional[Tuple[Candidates, List[Prompt]]]:
    """The candidates as Prompts when this run builds a retain set, else None."""
    if s.retain == "off" or s.preserve_weight == 0 or (s.retain == "auto" and kept):
        return None
    if candidates is None or not candidates.entries:
        if candidates is None and not kept:
            log.info("no preserve and no CLIP: the trainer cannot find the concepts near the one erased to keep "
                     "them; connect clip (or preserve) to the trainer, or use Erase Concept")
        return None
    entries = conditioning_entries(candidates.entries, "retain candidates")
    check_width(entries, "retain candidates", context_dim)
    return candidates, read_prompts(entries, "retain candidates", sampling)


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

    def finish(self, iteration: int) -> None:
        """Training stopped early at `iteration`: read back what is pending."""
        if self.pending:
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


def _train(model, concept, unconditional, preserve, settings: TrainSettings, context_dim: int, kind: str,
           concepts: List[str], on_iteration, retain_from=None) -> TrainingResult:
    s = settings
    use_preserve = (bool(preserve) or retain_from is not None) and s.preserve_weight > 0
    patcher = model.clone()
    base = patcher.model
    channels = getattr(base.latent_format, "latent_channels", None) or base.diffusion_model.in_channels
    resolution = s.resolution or default_resolution(context_dim)
    latent_shape = (channels, resolution // 8, resolution // 8)
    device = torch.device(patcher.load_device)
    dtype = compute_dtype(s.dtype, device, weight_dtype(base.diffusion_model))
    gen = torch.Generator().manual_seed(s.seed)

    concepts_c = encode_entries(base, concept, latent_shape, device, "positive", s.seed)
    uncond_c = encode_entries(base, [unconditional], latent_shape, device, "negative", s.seed)[0]
    def encode(prompts):
        return encode_entries(base, prompts, latent_shape, device, "positive", s.seed)

    preserve_c = encode(preserve) if use_preserve else []
    planned = preserve_c or (encode(retain_from[1][:1]) if retain_from is not None else [])
    options = patcher.model_options.get("transformer_options", {})
    planner = MemoryPlanner(RunShape(base, options, device, dtype, channels, context_dim, kind, concepts_c, uncond_c,
                                     planned))
    plan = plan_and_load(patcher, planner, s, resolution)
    timesteps, sigmas, all_sigmas = sampling_schedule(base.model_sampling, s.sampling_steps)

    token_scale = float(torch.cat([c["c_crossattn"].flatten().float().cpu() for c in concepts_c]).std())
    parts = build_trainables(base.diffusion_model, s, context_dim, token_scale, device, gen)
    scaler = loss_scaler(dtype, device)
    losses = _LossLog(s, sync_every=1 if device.type == "cpu" else 10)
    progress = comfy.utils.ProgressBar(s.iterations)
    check_interrupt = comfy.model_management.throw_exception_if_processing_interrupted

    def backward(loss):
        (scaler.scale(loss) if scaler is not None else loss).backward()

    scores: List[Tuple[int, float]] = []
    stopped = {"iteration": s.iterations, "reason": "iterations"}
    with trainable_model(base, dtype), parts.deltas.attached(), \
            checkpointed_transformers(base.diffusion_model, parts.deltas, plan.checkpointing):
        denoiser = Denoiser(base, options, device, parts.deltas, parts.prompt, kind)
        scorer = HeldOutScore(denoiser, concepts_c, uncond_c, latent_shape, timesteps, sigmas, all_sigmas,
                              s.sampling_cfg, s.seed, base.model_sampling, check_interrupt) \
            if s.score_every or s.min_score_rise else None
        retain = None
        if retain_from is not None:
            found, prompts = retain_from
            judge = HeldOutScore(denoiser, concepts_c, uncond_c, latent_shape, timesteps, sigmas, all_sigmas,
                                 s.sampling_cfg, s.seed, base.model_sampling, check_interrupt, seed_offset=3,
                                 samples=RETAIN_SAMPLES)
            retain = choose(judge, prompts, found.texts, encode, concept, unconditional, concepts, found.source,
                            s.retain_size)
            log.info(retain.describe())
            preserve = list(preserve) + retain.kept_prompts
            preserve_c = preserve_c + encode(retain.kept_prompts)
            use_preserve = bool(preserve_c)
        labels = [f"preserve {i + 1}" for i in range(len(preserve_c) - len(retain.kept if retain else []))] + \
            [t for t, _ in (retain.kept if retain else [])]
        watch = HeldOutScore(denoiser, preserve_c, uncond_c, latent_shape, timesteps, sigmas, all_sigmas,
                             s.sampling_cfg, s.seed, base.model_sampling, check_interrupt, seed_offset=2) \
            if use_preserve and s.score_every else None
        own_images = None
        if use_preserve and s.preserve_images == "own":
            keep_gen = torch.Generator().manual_seed((s.seed + 4) % (1 << 64))
            own_images = kept_trajectories(denoiser, preserve_c, uncond_c, latent_shape, timesteps, sigmas,
                                           all_sigmas, s.sampling_cfg, keep_gen, check_interrupt,
                                           [p.timesteps for p in preserve])
        moved: List[Tuple[int, float]] = []
        moved_each: List[list] = []
        raised: List[list] = []
        rate = RateRaise(parts.optimizer.param_groups[0], s.min_score_rise, parts.optimizer.param_groups[1:])
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
            preserve_at = None
            if own_images is not None:  # the kept concepts' own images
                x_p, sigma_p, kept = own_images.draw(s.batch_size, keep_gen)
                preserve_at = (x_p, sigma_p)
            else:
                kept = torch.randint(len(preserve_c), (s.batch_size,), generator=gen).tolist() if use_preserve else []
                sigma_p = sigma
            terms = loss_terms(denoiser, s, x_t, sigma, uncond_c, [concepts_c[j] for j in picked],
                               [preserve_c[j] for j in kept], backward,
                               pair_weights([concept[j] for j in picked], device),
                               pair_weights([preserve[j] for j in kept], device, sigma_p, all_sigmas),
                               parts.adversary, it, check_interrupt, preserve_at)
            optimizer_step(parts, scaler)
            losses.add(it + 1, terms)
            progress.update(1)
            if on_iteration is not None:
                on_iteration(it + 1)
            scheduled = s.score_every and ((it + 1) % s.score_every == 0 or it + 1 == s.iterations)
            raising = rate.due(it + 1)
            if scheduled and watch is not None:
                each = watch.moved_each(prompt_attached=s.method == "lp_attached")
                moved.append((it + 1, max(each)))
                moved_each.append([it + 1, [round(m, 4) for m in each]])
                for k, m in enumerate(each):
                    if s.retain_watch and m > s.retain_watch and preserve[k].weight < MAX_WATCH_WEIGHT:
                        preserve[k].weight *= 2
                        raised.append([it + 1, labels[k], round(m, 4), preserve[k].weight])
            if scheduled or raising:
                scores.append((it + 1, scorer.score(prompt_attached=s.method == "lp_attached")))
                if raising:
                    rate.update(it + 1, scores[-1][1])
                if scheduled and s.stop_at_score and scores[-1][1] >= s.stop_at_score and it + 1 < s.iterations:
                    stopped = {"iteration": it + 1, "reason": f"concept score {scores[-1][1]:.3f} reached "
                                                              f"stop_at_score {s.stop_at_score:g}"}
                    losses.finish(it + 1)
                    progress.update(s.iterations - it - 1)
                    break

    prompt = parts.prompt
    erasure = ConceptErasure(
        context_dim=context_dim,
        prompt_k=prompt.prompt_k.detach().float().cpu().clone() if prompt is not None else None,
        prompt_v=prompt.prompt_v.detach().float().cpu().clone() if prompt is not None else None,
        placement=s.placement,
        deltas=parts.deltas.export(s.output_strength),
        prompt_at_inference=s.method == "lp_attached",
        concepts=concepts,
        method=s.method,
        settings=dict(s.to_dict(), factor_alpha_used=s.factor_scale, compute_dtype=plan.dtype,
                      gradient_checkpointing_used=plan.checkpointing, stopped=stopped,
                      preserve_prompts=len(preserve) if use_preserve else 0,
                      concept_scores=[[i, round(v, 4)] for i, v in scores], **rate.record(),
                      **({"retain_set": retain.record()} if retain else {}),
                      **({"preserve_moved": {"labels": labels, "moved": moved_each}, "preserve_raises": raised}
                         if watch is not None else {})),
        base_model=type(base.model_config).__name__,
        pack_version=PACK_VERSION,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    return TrainingResult(erasure, losses.history, plan, scores, moved, retain)
