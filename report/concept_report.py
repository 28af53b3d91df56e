"""Compare an erased model with its original on a list of prompts: a sample grid and a concept score.

The concept score (erasure/concept_score.py, where its formula and constants are) needs no classifier: for each
prompt, how far the erased model's noise prediction moved from the original's toward ESD's erasure target.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils

from ..erasure.concept_erasure import ErasureError, family_name, model_context_dim
from ..erasure.concept_score import ETA, NEGLIGIBLE, SCORE_LEVELS, to_target
from ..erasure.conditioning_checks import check_entries

SAMPLER, SCHEDULER = "euler", "normal"


class ReportError(ErasureError):
    """Bad report input; nothing was sampled."""


@dataclass
class ConceptScore:
    label: str
    toward: float  # nan when the prompt's prediction equals the unconditional one
    moved: float


def split_prompts(prompts, name: str = "prompts") -> List[list]:
    """One single-entry CONDITIONING per prompt (Conditioning Combine concatenates entries)."""
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ReportError(f"{name} must be a CONDITIONING with at least one prompt (CLIP Text Encode, several "
                          "joined with Conditioning (Combine))")
    check_entries(prompts, name, ReportError)
    return [[entry] for entry in prompts]


def parse_labels(labels: str, count: int) -> List[str]:
    names = [line.strip() for line in (labels or "").splitlines() if line.strip()]
    if not names:
        return [f"prompt {i + 1}" for i in range(count)]
    if len(names) != count:
        raise ReportError(f"labels has {len(names)} line(s) but there are {count} prompt(s); give one label per "
                          "prompt, in the order they were combined, or leave labels empty")
    return names


def _check_inputs(original, erased, prompts, unconditional, vae=None):
    dims = {name: model_context_dim(m) for name, m in (("original_model", original), ("erased_model", erased))}
    if dims["original_model"] != dims["erased_model"]:
        raise ReportError(f"original_model is {family_name(dims['original_model'])} but erased_model is "
                          f"{family_name(dims['erased_model'])}; compare an erased model with its own original")
    for name, conds in (("prompts", prompts), ("unconditional", unconditional)):
        for cond in conds:
            width = int(cond[0][0].shape[-1])
            if width != dims["original_model"]:
                raise ReportError(f"{name} has width {width} ({family_name(width)} text encoder) but the models take "
                                  f"{dims['original_model']}; encode prompts with the models' own CLIP")
    if vae is not None:
        model_channels = original.get_model_object("latent_format").latent_channels
        vae_channels = getattr(vae, "latent_channels", model_channels)
        if vae_channels != model_channels:
            raise ReportError(f"the VAE decodes {vae_channels}-channel latents but the model makes {model_channels}; "
                              "use the VAE of the models' checkpoint")


def _interrupt_callback(step, x0, x, total_steps):
    comfy.model_management.throw_exception_if_processing_interrupted()


def sample_latent(model, positive, negative, latent: torch.Tensor, seed: int, steps: int, cfg: float) -> torch.Tensor:
    """comfy's KSampler (euler, normal schedule, full denoise) from the seed's noise; returns LATENT samples."""
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, SAMPLER, SCHEDULER, positive, negative, latent,
                               callback=_interrupt_callback, disable_pbar=True, seed=seed)


def predict_eps(model, conditioning, unconditional, x0: torch.Tensor, noises: torch.Tensor,
                sigmas: Sequence[float], seed: int) -> torch.Tensor:
    """The model's noise prediction for `conditioning` at x0 + sigma_k * noise_k, through comfy's own sampling
    path (so every model patch, SDXL's pooled conds and lp_attached prompts apply). Returns [K, *x0.shape[1:]].

    x0 is in the model's internal latent space (after process_latent_in)."""
    found = []

    def evaluate(model_k, x, sigma_list, extra_args=None, callback=None, disable=None):
        s_in = x.new_ones([x.shape[0]])
        for k, sigma in enumerate(sigma_list.tolist()):
            x_k = x0.to(x) + noises[k:k + 1].to(x) * sigma
            denoised = model_k(x_k, sigma * s_in, **(extra_args or {}))
            found.append(((x_k - denoised) / sigma).float().cpu())
        return x

    zeros = torch.zeros_like(x0)
    with torch.no_grad():
        comfy.sample.sample_custom(model, zeros, 1.0, comfy.samplers.KSAMPLER(evaluate), torch.tensor(list(sigmas)),
                                   conditioning, unconditional, zeros, disable_pbar=True, seed=seed)
    return torch.cat(found)


def score_levels(model, levels: Sequence[float] = SCORE_LEVELS) -> List[float]:
    sampling = model.get_model_object("model_sampling")
    return [float(sampling.percent_to_sigma(p)) for p in levels]


def concept_scores(original, erased, prompts: Sequence[list], unconditional, latents: Sequence[torch.Tensor],
                   labels: Sequence[str], seed: int, eta: float = ETA, levels: Sequence[float] = SCORE_LEVELS,
                   step: Optional[Callable[[], None]] = None) -> List[ConceptScore]:
    """One ConceptScore per prompt; latents are the original model's LATENT samples for each prompt (batch 1)."""
    sigmas = score_levels(original, levels)
    base = original.model
    scores = []
    for prompt, latent, label in zip(prompts, latents, labels):
        x0 = base.process_latent_in(latent.float())
        generator = torch.Generator().manual_seed((seed + 1) % (1 << 64))
        noises = torch.randn((len(sigmas), *x0.shape[1:]), generator=generator)
        eps_c = predict_eps(original, prompt, unconditional, x0, noises, sigmas, seed)
        eps_u = predict_eps(original, unconditional, unconditional, x0, noises, sigmas, seed)
        eps_e = predict_eps(erased, prompt, unconditional, x0, noises, sigmas, seed)
        if step is not None:
            step()
        to_goal = to_target(eps_c, eps_u, eta)
        move = eps_e - eps_c
        norm = float((to_goal ** 2).sum())
        if norm <= NEGLIGIBLE * max(1.0, float((eps_c ** 2).sum())):
            scores.append(ConceptScore(label, math.nan, math.nan))
            continue
        toward = float((move * to_goal).sum()) / norm
        scores.append(ConceptScore(label, toward, math.sqrt(float((move ** 2).sum()) / norm)))
    return scores


def image_grid(rows: Sequence[Sequence[torch.Tensor]], gap: int) -> torch.Tensor:
    """rows of [1, H, W, 3] images -> one [1, H_total, W_total, 3] image with white gaps."""
    height, width = rows[0][0].shape[1:3]
    cols = len(rows[0])
    grid = torch.ones(1, len(rows) * height + (len(rows) - 1) * gap, cols * width + (cols - 1) * gap, 3)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            y, x = r * (height + gap), c * (width + gap)
            grid[0, y:y + height, x:x + width] = image[0, :height, :width].float().cpu()
    return grid


LABEL_PAD = 6  # px around the labels
LABEL_CHAR = 6  # px per character of PIL's default font (about 11 px high)
TITLE_BAND = 18  # px under the grid for the columns' titles
COLUMNS = ("original", "erased")


def labelled_size(rows: int, cell_h: int, cell_w: int, gap: int, labels: Sequence[str]) -> tuple:
    """(height, width) of the labelled grid: image_grid's, a column of row labels at the right, a band of column
    titles below. The cells stay where image_grid puts them, from the top left (demo_world/reading.py reads them)."""
    label_w = max(len(label) for label in labels) * LABEL_CHAR + 2 * LABEL_PAD
    return rows * cell_h + (rows - 1) * gap + TITLE_BAND, 2 * cell_w + gap + label_w


def label_grid(grid: torch.Tensor, labels: Sequence[str], cell_h: int, cell_w: int, gap: int) -> torch.Tensor:
    """The grid with each row's label at its right and "original" / "erased" under the columns, on white."""
    from PIL import Image, ImageDraw, ImageFont

    height, width = labelled_size(len(labels), cell_h, cell_w, gap, labels)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    pixels = (grid[0].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    canvas.paste(Image.fromarray(pixels), (0, 0))
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for r, label in enumerate(labels):
        draw.text((2 * cell_w + gap + LABEL_PAD, r * (cell_h + gap) + cell_h // 2 - 6), label, fill=(0, 0, 0),
                  font=font)
    for c, title in enumerate(COLUMNS):
        x = c * (cell_w + gap) + cell_w // 2 - len(title) * LABEL_CHAR // 2
        draw.text((max(0, x), height - TITLE_BAND + 3), title, fill=(0, 0, 0), font=font)
    out = torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0).unsqueeze(0)
    out[0, :grid.shape[1], :grid.shape[2]] = grid[0].float().cpu()  # the cells exactly as sampled
    return out


def format_summary(scores: Sequence[ConceptScore], seed: int, steps: int, cfg: float, width: int, height: int) -> str:
    name_width = max(6, *(len(s.label) for s in scores))
    lines = [f"Concept Erasure Report: {len(scores)} prompt(s), seed {seed}, {steps} steps, cfg {cfg:g}, "
             f"{width}x{height}",
             f"{'prompt':<{name_width}}  toward ESD target  moved"]
    for s in scores:
        if math.isnan(s.toward):
            lines.append(f"{s.label:<{name_width}}  n/a (the prompt predicts what the empty prompt does)")
        else:
            lines.append(f"{s.label:<{name_width}}  {s.toward:>17.2f}  {s.moved:>5.2f}")
    lines += ["",
              "toward: how far the erased model's noise prediction moved from the original's toward ESD's target "
              f"eps(empty) - {ETA:g} * (eps(prompt) - eps(empty)), at {len(SCORE_LEVELS)} noise levels on the "
              "original's sample: 0 = unchanged, 0.5 = treated like the empty prompt, 1 = the full ESD target.",
              "moved: the size of that change in any direction, on the same scale. An erased concept scores high on "
              "both; a concept to keep should be near 0 on both."]
    return "\n".join(lines)


def compare_models(original, erased, prompts, unconditional, vae, labels: str = "", seed: int = 0, steps: int = 20,
                   width: int = 512, height: int = 512, cfg: float = 7.0):
    """(grid IMAGE, summary STRING, scores): rows = prompts, columns = original | erased, same noise everywhere."""
    prompt_list = split_prompts(prompts)
    unconditional = split_prompts(unconditional, "unconditional")[0]
    names = parse_labels(labels, len(prompt_list))
    _check_inputs(original, erased, prompt_list, [unconditional], vae)
    ratio = getattr(vae, "downscale_ratio", 8)
    if not isinstance(ratio, int):
        raise ReportError("the VAE is not an image VAE of a Stable Diffusion model; use the checkpoint's VAE")
    if width % ratio or height % ratio:
        raise ReportError(f"width and height must be multiples of the VAE's downscale ratio {ratio}, "
                          f"got {width}x{height}")
    channels = original.get_model_object("latent_format").latent_channels
    latent = torch.zeros(1, channels, height // ratio, width // ratio)
    progress = comfy.utils.ProgressBar(3 * len(prompt_list))
    rows, originals = [], []
    with torch.inference_mode():
        for prompt in prompt_list:
            pair = []
            for model in (original, erased):
                samples = sample_latent(model, prompt, unconditional, latent, seed, steps, cfg)
                if model is original:
                    originals.append(samples)
                pair.append(vae.decode(samples)[:1])
                progress.update(1)
            rows.append(pair)
        scores = concept_scores(original, erased, prompt_list, unconditional, originals, names, seed,
                                step=lambda: progress.update(1))
    gap = max(1, width // 64)
    grid = label_grid(image_grid(rows, gap=gap), names, height, width, gap)
    return grid, format_summary(scores, seed, steps, cfg, width, height), scores
