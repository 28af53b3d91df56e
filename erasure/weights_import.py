"""Published weights as an erasure, for the base MODEL they were made from. Safetensors only.

- A LoRA file (kohya 'lora_unet_...', ComfyUI 'diffusion_model....', diffusers / PEFT 'unet....lora_A', diffusers'
  attention processors; LECO, concept sliders, SPM, this pack's own export) -> low-rank deltas (full deltas for
  '.diff' layers).
- A partial or full UNet state dict (ESD's and UCE's releases: diffusers-keyed, or ComfyUI/sgm-keyed, with or
  without 'unet.' / 'model.diffusion_model.' prefixes) -> deltas = released weight - the model's weight, for the
  layers where they differ.
An erasure changes only the weights of the UNet's linear and conv layers: text-encoder parts, biases and norms are
left out and listed in the erasure's settings ("source"), with a warning.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from typing import Dict, List, Optional, Tuple

import torch
from safetensors import safe_open

from .concept_erasure import (ConceptErasure, Delta, ErasureError, LowRankDelta, check_compatible, family_name,
                              model_context_dim, model_family)
from .file_format import FORMAT_KEY, _looks_like_pickle, load_erasure
from .unet_names import UnetNames, model_unet_names
from .version import PACK_VERSION

log = logging.getLogger(__name__)

PICKLE_EXTENSIONS = (".pt", ".pth", ".ckpt", ".bin", ".pkl")
# LoRA tensor name endings -> what they hold; the longest match wins.
_LORA_PARTS = {
    ".lora_down.weight": "down", ".lora_up.weight": "up",  # kohya, ComfyUI, A1111
    ".lora_A.weight": "down", ".lora_B.weight": "up",  # PEFT / diffusers
    ".lora.down.weight": "down", ".lora.up.weight": "up",  # diffusers' converted kohya files
    "_lora.down.weight": "down", "_lora.up.weight": "up",  # diffusers attention processors (to_k_lora)
    ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up",
    ".alpha": "alpha",
    ".diff": "diff",  # a full delta (ComfyUI, A1111)
    ".diff_b": "bias", ".lora_B.bias": "bias", ".w_norm": "norm", ".b_norm": "norm",
}
_UNSUPPORTED = {".lora_mid.": "LoCon with a Tucker core (lora_mid)", ".dora_scale": "DoRA (dora_scale)",
                ".lora_magnitude_vector": "DoRA (lora_magnitude_vector)", ".hada_": "LoHa (hada_*)",
                ".lokr_": "LoKr (lokr_*)", ".oft_": "OFT (oft_*)", ".a1.weight": "GLoRA", ".set_weight": "set_weight"}
_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "unet.", "base_model.model.")
_TEXT_ENCODER = ("lora_te", "text_encoder", "te_", "te1.", "te2.", "te1_", "te2_", "cond_stage_model.",
                 "conditioner.", "text_model.", "clip_l.", "clip_g.", "t5xxl.")
_UNET_ROOTS = ("lora_unet_", "lycoris_", "down_blocks", "mid_block", "up_blocks", "input_blocks", "middle_block",
               "output_blocks", "conv_in", "conv_out", "conv_norm_out", "time_embedding", "time_embed",
               "add_embedding", "label_emb", "class_embedding", "out.")
_CONTEXT_LAYER = re.compile(r"attn2[._]to_[kv]$")  # its input size is the cross-attention context size


def convert_hint(name: str) -> str:
    stem = os.path.splitext(name)[0]
    return (f"{name} is a pickled PyTorch file; pickle files can run code when they are loaded, so this pack reads "
            "safetensors only. Convert it once, outside ComfyUI, in a Python you trust the file in: "
            "import torch; from safetensors.torch import save_file; "
            f"sd = torch.load('{name}', map_location='cpu', weights_only=True); sd = sd.get('state_dict', sd); "
            f"save_file({{k: v.contiguous() for k, v in sd.items() if torch.is_tensor(v)}}, '{stem}.safetensors') "
            "(weights_only=True refuses files that would run code), then put the .safetensors file in models/loras")


def _open(path: str):
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise ErasureError(f"{name}: no such file ({path})")
    if name.lower().endswith(PICKLE_EXTENSIONS):
        raise ErasureError(convert_hint(name))
    if not name.lower().endswith(".safetensors"):
        raise ErasureError(f"{name}: only .safetensors files are read")
    with open(path, "rb") as f:
        head = f.read(8)
    if _looks_like_pickle(head):
        raise ErasureError(f"{name}: this is a pickle renamed to .safetensors. " + convert_hint(name))
    try:
        return safe_open(path, framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types
        raise ErasureError(f"{name}: not a readable safetensors file ({e})") from e


def _split_lora_key(key: str) -> Tuple[str, str]:
    """(module name, part) for a LoRA tensor name; part is '' when the key is not a known LoRA tensor."""
    for marker, kind in _UNSUPPORTED.items():
        if marker in key:
            return key[:key.index(marker)], "unsupported:" + kind
    for suffix in sorted(_LORA_PARTS, key=len, reverse=True):
        if key.endswith(suffix):
            return key[:-len(suffix)], _LORA_PARTS[suffix]
    return key, ""


def _canonical(name: str) -> str:
    """One spelling per module: without wrapper prefixes or diffusers' '.processor', with to_out.0."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix):], True
    name = name.replace(".processor.", ".")
    if name.endswith(".to_out"):
        name += ".0"
    return name


def _is_text_encoder(name: str) -> bool:
    return name.startswith(_TEXT_ENCODER)


def _is_unet_like(name: str) -> bool:
    return name.startswith(_UNET_ROOTS)


def _file_family(meta: Dict[str, str]) -> str:
    for field in ("concept_erasure.base_model", "ss_base_model_version", "modelspec.architecture"):
        if meta.get(field):
            return f"{field} {meta[field][:60]!r}"
    return ""


def _check_family(name: str, dims: Dict[int, str], model, meta: Dict[str, str]) -> None:
    model_dim = model_context_dim(model)
    for dim, example in dims.items():
        if dim != model_dim:
            hint = _file_family(meta)
            raise ErasureError(
                f"{name} was made for {family_name(dim)} models (cross-attention context {dim} in {example}"
                f"{', ' + hint if hint else ''}) but the model is {model_family(model)}, a {family_name(model_dim)} "
                f"model (context {model_dim}); connect the base model the file was made for")


def _float(name: str, key: str, t: torch.Tensor) -> torch.Tensor:
    if not t.is_floating_point():
        raise ErasureError(f"{name}: tensor {key!r} has dtype {t.dtype}; weights must be floating point")
    return t


# -- LoRA files --------------------------------------------------------------------------------------------------

def _peft_alphas(meta: Dict[str, str]) -> Tuple[Optional[float], Dict[str, float], bool]:
    """(lora_alpha, alpha_pattern, use_rslora) from diffusers' lora_adapter_metadata, when present."""
    raw = meta.get("lora_adapter_metadata")
    if not raw:
        return None, {}, False
    try:
        config = json.loads(raw)
    except ValueError:
        return None, {}, False
    config = {k[len("unet."):] if k.startswith("unet.") else k: v for k, v in config.items()}
    alpha = config.get("lora_alpha")
    pattern = config.get("alpha_pattern") or {}
    return (float(alpha) if isinstance(alpha, (int, float)) else None,
            {str(k): float(v) for k, v in pattern.items() if isinstance(v, (int, float))},
            bool(config.get("use_rslora")))


def _lora_deltas(f, name: str, names: UnetNames, model, meta: Dict[str, str]):
    table = names.spellings()
    layers: Dict[str, Dict[str, str]] = {}  # module name as in the file -> part -> tensor key
    skipped: Dict[str, List[str]] = {}
    for key in f.keys():
        module, part = _split_lora_key(key)
        if _is_text_encoder(module):
            skipped.setdefault("text encoder", []).append(key)
            continue
        if part.startswith("unsupported:"):
            raise ErasureError(f"{name}: layer {module!r} is a {part.split(':', 1)[1]} layer; only plain LoRA "
                               "(lora_down / lora_up, lora_A / lora_B) and full diff layers can become an erasure")
        if part == "":
            raise ErasureError(f"{name}: tensor {key!r} is not part of a LoRA layer this importer knows")
        if part in ("bias", "norm"):
            skipped.setdefault("biases and norms", []).append(key)
            continue
        layers.setdefault(module, {})[part] = key

    dims = {}
    for module, parts in layers.items():
        if "down" in parts and _CONTEXT_LAYER.search(_canonical(module)):
            dims.setdefault(int(f.get_slice(parts["down"]).get_shape()[1]), module)
    _check_family(name, dims, model, meta)

    peft_alpha, alpha_pattern, rslora = _peft_alphas(meta)
    deltas: Dict[str, Delta] = {}
    styles = set()
    for module, parts in sorted(layers.items()):
        canonical = _canonical(module)
        key = table.get(canonical)
        if key is None:
            where = "a UNet layer" if _is_unet_like(canonical) else "a layer"
            raise ErasureError(f"{name}: {where} {module!r} that {names.description} does not have; the file was "
                               f"made for another model{' (' + _file_family(meta) + ')' if _file_family(meta) else ''}"
                               "; connect the base model it was made for")
        if key in deltas:
            raise ErasureError(f"{name}: two layers of the file name the same model weight {key!r}")
        styles.add("kohya" if module.startswith(("lora_unet_", "lycoris_")) else
                   "ComfyUI" if module.startswith(("diffusion_model.", "model.diffusion_model.")) else "diffusers")
        deltas[key] = _lora_layer(f, name, module, parts, key, names, peft_alpha, alpha_pattern, rslora, canonical)
    if not deltas:
        raise ErasureError(f"{name}: the file changes no UNet layer (skipped: "
                           f"{', '.join(f'{len(v)} {k}' for k, v in skipped.items()) or 'nothing'}); an erasure "
                           "changes the UNet")
    return deltas, {"kind": "lora", "key_style": ", ".join(sorted(styles))}, skipped


def _lora_layer(f, name, module, parts, key, names, peft_alpha, alpha_pattern, rslora, canonical) -> Delta:
    shape = names.shapes[key]
    if "diff" in parts:
        if "down" in parts or "up" in parts:
            raise ErasureError(f"{name}: layer {module!r} has both a diff and LoRA factors")
        diff = _float(name, parts["diff"], f.get_tensor(parts["diff"]))
        if tuple(diff.shape) != shape:
            raise ErasureError(f"{name}: {module}.diff has shape {list(diff.shape)} but {names.description} has "
                               f"{list(shape)} for {key!r}")
        return diff
    missing = [p for p in ("down", "up") if p not in parts]
    if missing:
        raise ErasureError(f"{name}: LoRA layer {module!r} has no {' or '.join(missing)} tensor")
    down = _float(name, parts["down"], f.get_tensor(parts["down"]))
    up = _float(name, parts["up"], f.get_tensor(parts["up"]))
    if up.ndim > 2 and any(s != 1 for s in up.shape[2:]):
        raise ErasureError(f"{name}: LoRA layer {module!r} has an up tensor of shape {list(up.shape)}; only 1x1 "
                           "up convolutions are supported")
    up = up.reshape(up.shape[0], -1)
    rank = int(down.shape[0]) if down.ndim >= 2 else 0
    if rank == 0 or up.shape[1] != rank or (up.shape[0], *down.shape[1:]) != shape:
        raise ErasureError(
            f"{name}: LoRA layer {module!r} (down {list(down.shape)}, up {list(up.shape)}) does not fit "
            f"{names.description}'s {key!r} of shape {list(shape)}; the file was made for another model")
    if "alpha" in parts:
        alpha_tensor = f.get_tensor(parts["alpha"])
        if alpha_tensor.numel() != 1:
            raise ErasureError(f"{name}: {parts['alpha']} must be a single number")
        alpha = float(alpha_tensor.float().item())
    else:  # PEFT files: diffusers' adapter metadata, else scale 1 (what every loader assumes without an alpha)
        alpha = float(rank) if peft_alpha is None else peft_alpha
        for pattern, value in alpha_pattern.items():
            if re.match(rf"(.*\.)?({pattern})$", canonical):
                alpha = value
        if rslora:
            alpha *= math.sqrt(rank)
    if not math.isfinite(alpha):
        raise ErasureError(f"{name}: LoRA layer {module!r} has alpha {alpha}")
    return LowRankDelta(up.contiguous(), down.contiguous(), alpha)


# -- UNet state dicts --------------------------------------------------------------------------------------------

def _coarser(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    bits = {torch.float64: 52, torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}
    return a if bits.get(a, 23) <= bits.get(b, 23) else b


def _weight_deltas(f, name: str, names: UnetNames, model, meta: Dict[str, str]):
    if model.patches:
        raise ErasureError(
            f"the model already has {len(model.patches)} weight patches (a LoRA or an erasure applied); connect "
            "the MODEL straight from its loader so the released weights are compared with the base model's")
    table = names.spellings()
    entries: Dict[str, str] = {}  # ModelPatcher key -> tensor key in the file
    unknown: List[str] = []
    skipped: Dict[str, List[str]] = {}
    dims = {}
    for tensor_key in f.keys():
        canonical = _canonical(tensor_key)
        module, _, param = canonical.rpartition(".")
        if param == "weight" and _CONTEXT_LAYER.search(module):
            shape = f.get_slice(tensor_key).get_shape()
            if len(shape) == 2:
                dims.setdefault(int(shape[1]), tensor_key)
        key = table.get(canonical) if param in ("weight", "bias") else None
        if key is None:
            if _is_unet_like(canonical) and not _is_text_encoder(tensor_key):
                unknown.append(tensor_key)
            else:
                skipped.setdefault("not part of the UNet", []).append(tensor_key)
            continue
        if key in entries:
            raise ErasureError(f"{name}: {entries[key]!r} and {tensor_key!r} name the same model weight {key!r}")
        entries[key] = tensor_key
    _check_family(name, dims, model, meta)
    if unknown:
        raise ErasureError(f"{name}: {len(unknown)} UNet tensor(s) that {names.description} does not have, e.g. "
                           f"{unknown[0]!r}; the file was made for another model"
                           f"{' (' + _file_family(meta) + ')' if _file_family(meta) else ''}")
    if not entries:
        raise ErasureError(f"{name}: no UNet weights found (neither LoRA layers nor UNet tensors the model has)")

    import comfy.model_management

    comfy.model_management.load_models_gpu([model])  # the model's own weights in place, no other clone's patches
    state = model.model.state_dict()
    deltas: Dict[str, Delta] = {}
    for key, tensor_key in sorted(entries.items()):
        released = _float(name, tensor_key, f.get_tensor(tensor_key))
        base = state[key]
        if tuple(released.shape) != tuple(base.shape):
            raise ErasureError(f"{name}: {tensor_key!r} has shape {list(released.shape)} but {names.description} "
                               f"has {list(base.shape)} for {key!r}; the file was made for another model")
        base = base.detach().to("cpu")
        coarse = _coarser(released.dtype, base.dtype)
        if torch.equal(released.to(coarse), base.to(coarse)):
            continue  # the same weight, up to the storage precision of the two
        if names.patchable.get(key):
            deltas[key] = released.float() - base.float()
        else:
            skipped.setdefault("biases and norms", []).append(tensor_key)
    if not deltas:
        raise ErasureError(f"{name}: every UNet weight in the file equals the model's; nothing was changed from "
                           "this base model (is it the model the file was made from?)")
    return deltas, {"kind": "unet_weights", "compared": len(entries)}, skipped


# -- the erasure ---------------------------------------------------------------------------------------------------

def _own_fields(meta: Dict[str, str]) -> dict:
    """Method, concepts and settings of a LoRA this pack exported."""
    fields = {}
    try:
        if meta.get("concept_erasure.method"):
            fields["method"] = meta["concept_erasure.method"]
        concepts = json.loads(meta.get("concept_erasure.concepts", "null"))
        if isinstance(concepts, list) and all(isinstance(c, str) for c in concepts):
            fields["concepts"] = concepts
        settings = json.loads(meta.get("concept_erasure.settings", "null"))
        if isinstance(settings, dict):
            fields["settings"] = settings
    except ValueError:
        pass
    return fields


def import_weights(path: str, model, concepts: Optional[List[str]] = None, display_name: str = "") -> ConceptErasure:
    """An erasure holding what the file changes in `model`'s UNet. The model and the file are not changed."""
    name = display_name or os.path.basename(path)
    with _open(path) as f:
        meta = dict(f.metadata() or {})
        if FORMAT_KEY in meta:  # already an erasure file
            erasure = load_erasure(path)
            check_compatible(model, erasure)
            return erasure
        names = model_unet_names(model)
        lora = any(_split_lora_key(k)[1] for k in f.keys())
        reader = _lora_deltas if lora else _weight_deltas
        deltas, source, skipped = reader(f, name, names, model, meta)

    own = _own_fields(meta)
    source = {"file": name, **source, "layers": len(deltas)}
    for field in ("ss_output_name", "modelspec.title", "ss_base_model_version", "modelspec.architecture"):
        if meta.get(field):
            source[field] = meta[field][:200]
    if skipped:
        source["left_out"] = {reason: {"count": len(keys), "examples": keys[:3]} for reason, keys in skipped.items()}
        log.warning("%s: left out %s (an erasure changes only UNet linear/conv weights)", name,
                    ", ".join(f"{len(keys)} {reason} tensor(s)" for reason, keys in skipped.items()))
    try:
        erasure = ConceptErasure(
            context_dim=model_context_dim(model), deltas=deltas, concepts=list(concepts or own.get("concepts", [])),
            method=own.get("method", "imported"), settings={**own.get("settings", {}), "source": source},
            base_model=model_family(model), pack_version=PACK_VERSION, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        check_compatible(model, erasure)
    except ErasureError as e:  # e.g. a NaN in the file: say which file
        raise ErasureError(f"{name}: {e}") from e
    return erasure
