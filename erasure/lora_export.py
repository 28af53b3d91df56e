"""An erasure as a standard LoRA file (kohya layout), for ComfyUI's LoRA loaders, A1111/Forge and diffusers.

Per layer, with N = lora_unet_<diffusers module path>:
  N.lora_down.weight [rank, in(, kh, kw)], N.lora_up.weight [out, rank(, 1, 1)], N.alpha (0-d)
      delta = up @ down * alpha / rank (kohya's convention, also the erasure's LowRankDelta)
  N.diff  the full delta (format "exact" only; ComfyUI and A1111/Forge read it, diffusers does not)
Format "lora" writes every delta as factors: full deltas are compressed by SVD to the asked rank, and the largest
relative (Frobenius) error of a layer is returned and written in the metadata.
Tensors keep the erasure's dtype (fp32, fp16 or bf16; fp64 becomes fp32); SVD runs in fp32. Every layer gets the same
alpha (see _common_alpha).
"""
from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from safetensors.torch import save_file

from .concept_erasure import ConceptErasure, ErasureError, LowRankDelta, check_compatible, model_family
from .unet_names import UnetNames, model_unet_names, standard_unet_names
from .version import PACK_VERSION

FORMATS = ("exact", "lora")
LORA_FORMAT_VERSION = "1"
# modelspec architecture ids and kohya's ss_base_model_version per context size
_ARCHITECTURE = {768: "stable-diffusion-v1", 1024: "stable-diffusion-v2", 2048: "stable-diffusion-xl-v1-base"}
_SS_BASE = {768: "sd_v1", 1024: "sd_v2", 2048: "sdxl_base_v1-0"}
_RESOLUTION = {768: "512x512", 1024: "768x768", 2048: "1024x1024"}


@dataclass
class LoraExport:
    tensors: Dict[str, torch.Tensor]
    metadata: Dict[str, str]
    max_relative_error: float  # 0 for exact exports
    worst_layer: str  # kohya name of the layer with that error ("" when 0)


def _export_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float32 if t.dtype == torch.float64 else t.dtype


def svd_factors(delta: torch.Tensor, rank: int, alpha: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """(up [out, r], down [r, *in_shape], relative Frobenius error) with r <= rank and
    up @ down * alpha / r the best rank-r approximation of delta (truncated SVD; alpha None means alpha = r).

    The error is measured on the factors as stored (after the cast to the delta's dtype).
    """
    dtype = _export_dtype(delta)
    matrix = delta.detach().to("cpu", torch.float32).reshape(delta.shape[0], -1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    r = max(1, min(int(rank), s.numel()))
    scale = 1.0 if alpha is None else float(alpha) / r
    root = s[:r].sqrt()
    up = (u[:, :r] * (root / scale)).to(dtype).contiguous()
    down = (root[:, None] * vh[:r]).to(dtype).reshape(r, *delta.shape[1:]).contiguous()
    norm = float(torch.linalg.norm(matrix))
    residual = float(torch.linalg.norm(matrix - (up.float() @ down.float().reshape(r, -1)) * scale))
    return up, down, (residual / norm if norm > 0 else 0.0)


def _common_alpha(erasure: ConceptErasure, rank: int) -> float:
    """One alpha for every layer of the file: diffusers' kohya reader keeps a single alpha for attention layers
    (it cannot match per-layer alphas to them), so layers with another alpha have their up factor rescaled."""
    alphas = Counter(float(d.alpha) for d in erasure.deltas.values() if isinstance(d, LowRankDelta) and d.alpha)
    return alphas.most_common(1)[0][0] if alphas else float(rank)


def _names_for(erasure: ConceptErasure, model) -> UnetNames:
    if model is not None:
        check_compatible(model, erasure)
        return model_unet_names(model)
    names = standard_unet_names(erasure.context_dim)
    connect = "connect the model the erasure was made for to the 'model' input"
    if names is None:
        raise ErasureError(f"no standard UNet layout is known for cross-attention context {erasure.context_dim} "
                           f"(base {erasure.base_model or '?'}); {connect} so its layers can be named")
    for key, delta in erasure.deltas.items():
        if key not in names.shapes:
            raise ErasureError(f"the erasure changes {key!r}, which {names.description} does not have (erasure base "
                               f"{erasure.base_model or '?'}); {connect}")
        if tuple(delta.shape) != names.shapes[key]:
            raise ErasureError(f"the erasure's delta for {key!r} has shape {list(delta.shape)} but "
                               f"{names.description} has {list(names.shapes[key])} (erasure base "
                               f"{erasure.base_model or '?'}); {connect}")
    return names


def lora_tensors(erasure: ConceptErasure, fmt: str = "exact", rank: int = 32, model=None) -> LoraExport:
    """The LoRA file's tensors and metadata. `model` (optional) is the base the erasure was made for: it names the
    layers by its own UNet layout; without it the released SD1.x / SD2.x / SDXL layout is used and checked."""
    if fmt not in FORMATS:
        raise ErasureError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "lora" and int(rank) < 1:
        raise ErasureError(f"rank must be at least 1 for the lora format, got {rank}")
    if erasure.prompt_at_inference and erasure.has_prompt:
        raise ErasureError(
            f"this erasure (method {erasure.method or 'lp_attached'}) attaches its learned prompt to the "
            "cross-attention at inference, so the prompt is part of the erased model; a LoRA holds weights only "
            "and cannot express it. Train with method lp (the prompt stays a separate key and the erased model is "
            "weights only) to share the erasure as a LoRA, or share the erasure file itself")
    if not erasure.deltas:
        raise ErasureError("this erasure has no weight deltas, so there is nothing to write as a LoRA")
    names = _names_for(erasure, model)

    tensors: Dict[str, torch.Tensor] = {}
    errors: Dict[str, float] = {}
    ranks = set()
    alpha = _common_alpha(erasure, rank)
    for key, delta in sorted(erasure.deltas.items()):
        if not names.patchable.get(key):
            raise ErasureError(f"the erasure's delta for {key!r} is not the weight of a linear or convolution layer; "
                               "a LoRA can only change those")
        name = names.kohya_name(key)
        if isinstance(delta, LowRankDelta):
            up, down = delta.up.detach(), delta.down.detach()
            if float(delta.alpha) != alpha:
                up = up.float() * (float(delta.alpha) / alpha)
            up, down = up.to(_export_dtype(delta.up)), down.to(_export_dtype(down))
        elif fmt == "exact":
            tensors[f"{name}.diff"] = delta.detach().to(_export_dtype(delta))
            continue
        else:
            up, down, errors[name] = svd_factors(delta, rank, alpha)
        if down.ndim > 2:  # a convolution: up is a 1x1 convolution, as kohya, A1111 and diffusers expect
            up = up.reshape(*up.shape, *([1] * (down.ndim - 2)))
        ranks.add(int(down.shape[0]))
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.lora_up.weight"] = up
        tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    tensors = {k: v.to("cpu").contiguous().clone() for k, v in tensors.items()}

    worst = max(errors, key=errors.get, default="")
    max_error = errors.get(worst, 0.0)
    has_diff = any(k.endswith(".diff") for k in tensors)
    metadata = _metadata(erasure, fmt, int(rank), ranks, {alpha} if ranks else set(), has_diff, max_error,
                         worst if max_error > 0 else "", model)
    return LoraExport(tensors, metadata, max_error, worst if max_error > 0 else "")


def _single(values: set, has_diff: bool) -> str:
    if len(values) != 1 or has_diff:
        return "Dynamic"  # kohya's word for per-layer values
    value = next(iter(values))
    return f"{value:g}" if isinstance(value, float) else str(value)


def _metadata(erasure: ConceptErasure, fmt: str, rank: int, ranks: set, alphas: set, has_diff: bool,
              max_error: float, worst: str, model) -> Dict[str, str]:
    dim = erasure.context_dim
    concepts = ", ".join(erasure.concepts) or "unnamed concept"
    created = erasure.created or time.strftime("%Y-%m-%dT%H:%M:%S%z")
    title = f"Concept erasure: {concepts}"
    description = (f"Erases {concepts} (method {erasure.method or '?'}, Bui et al. arXiv 2403.12326) from "
                   f"{erasure.base_model or 'its base model'}; written by ComfyUI Concept Erasure {PACK_VERSION}. "
                   "Apply at strength 1 to the UNet only.")
    architecture = _ARCHITECTURE.get(dim, f"stable-diffusion-context-{dim}")
    prediction = None
    if model is not None:
        model_type = getattr(getattr(model.model, "model_type", None), "name", "")
        prediction = {"EPS": "epsilon", "V_PREDICTION": "v"}.get(model_type)
        if dim == 1024 and prediction:
            architecture = "stable-diffusion-v2-768-v" if prediction == "v" else "stable-diffusion-v2-512"
    meta = {
        # what LoRA browsers and trainers show (kohya sd-scripts' ss_ keys, Stability's modelspec)
        "ss_network_module": "networks.lora",
        "ss_network_dim": _single(ranks, has_diff),
        "ss_network_alpha": _single(alphas, False),
        "ss_base_model_version": _SS_BASE.get(dim, ""),
        "ss_v2": "True" if dim == 1024 else "False",
        "ss_training_comment": description,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{architecture}/lora",
        "modelspec.implementation": ("https://github.com/Stability-AI/generative-models" if dim == 2048
                                     else "diffusers"),
        "modelspec.title": title,
        "modelspec.description": description,
        "modelspec.date": created,
        "modelspec.resolution": _RESOLUTION.get(dim, ""),
        "modelspec.tags": ", ".join(t for t in ["concept erasure", erasure.method, *erasure.concepts] if t),
        # the erasure itself, so the file can be imported back as one
        "concept_erasure.lora_format": LORA_FORMAT_VERSION,
        "concept_erasure.export": fmt,
        "concept_erasure.concepts": json.dumps(erasure.concepts),
        "concept_erasure.method": erasure.method,
        "concept_erasure.settings": json.dumps(erasure.settings, sort_keys=True),
        "concept_erasure.base_model": erasure.base_model or (model_family(model) if model is not None else ""),
        "concept_erasure.context_dim": str(dim),
        "concept_erasure.pack_version": PACK_VERSION,
        "concept_erasure.created": erasure.created,
        "concept_erasure.key_prompt": "not included" if erasure.has_prompt else "none",
    }
    if prediction:
        meta["modelspec.prediction_type"] = prediction
    if fmt == "lora":
        meta["concept_erasure.rank"] = str(rank)
        meta["concept_erasure.max_relative_error"] = f"{max_error:.6g}"
        meta["concept_erasure.max_error_layer"] = worst
    return {k: v for k, v in meta.items() if v != ""}


def write_lora_file(export: LoraExport, path: str) -> None:
    """Write to exactly `path` (the caller chooses a fresh name; see folders.save_lora)."""
    save_file(export.tensors, path, metadata=export.metadata)
