"""What the input model already carried when an erasure was trained: LoRAs, attention patches, wrappers.

Training runs on the model as given: its weight patches (LoRAs) are loaded into the weights, its
transformer_options patches run in every forward and its object patches (e.g. another sampling schedule) apply.
The summary is stored with the erasure's settings so that the file says which model it was trained on. Sampler
hooks (model_function_wrapper, CFG functions, upstream's ModelPatcher wrappers) are not run by the trainer, which
calls the UNet directly; they are listed under `not_seen_by_training`.
"""
from __future__ import annotations

import functools
from collections import Counter
from typing import Any, Dict, List

import torch

_SAMPLER_OPTIONS = ("model_function_wrapper", "sampler_cfg_function", "sampler_post_cfg_function",
                    "sampler_pre_cfg_function")


def _name(obj) -> str:
    if isinstance(obj, functools.partial):
        obj = obj.func
    return getattr(obj, "__qualname__", None) or type(obj).__qualname__


def _patch_kind(value) -> str:
    if isinstance(value, tuple) and value and isinstance(value[0], str):
        return value[0]  # ("lora", ...), ("diff", ...), ...
    if isinstance(value, tuple) and len(value) == 1 and torch.is_tensor(value[0]):
        return "diff"
    return type(value).__name__  # upstream's weight adapters (LoRAAdapter, ...)


def _callables(value) -> List[str]:
    return [_name(f) for f in (value if isinstance(value, (list, tuple)) else [value])]


def model_patches(model) -> Dict[str, Any]:
    """A JSON-able summary of the ModelPatcher's patches; {} for a plain model."""
    summary: Dict[str, Any] = {}
    patches = getattr(model, "patches", None) or {}
    if patches:
        kinds = Counter(_patch_kind(p[1]) for plist in patches.values() for p in plist)
        summary["weight_patches"] = {"weights": len(patches), "kinds": dict(sorted(kinds.items()))}
    options = getattr(model, "model_options", {}) or {}
    transformer = options.get("transformer_options", {}) or {}
    attention = {name: _callables(fns) for name, fns in (transformer.get("patches") or {}).items() if fns}
    if attention:
        summary["transformer_patches"] = attention
    replaced = {name: sorted(str(block) for block in blocks)
                for name, blocks in (transformer.get("patches_replace") or {}).items() if blocks}
    if replaced:
        summary["transformer_replacements"] = replaced
    objects = sorted(getattr(model, "object_patches", None) or {})
    if objects:
        summary["object_patches"] = objects
    not_seen = {key: _callables(options[key]) for key in _SAMPLER_OPTIONS if options.get(key)}
    wrappers = {f"{kind}/{key}": _callables(fns)
                for kind, by_key in (getattr(model, "wrappers", None) or {}).items()
                for key, fns in (by_key or {}).items() if fns}
    not_seen.update({f"wrapper {name}": fns for name, fns in wrappers.items()})
    if getattr(model, "hook_patches", None):
        not_seen["hook_patches"] = [str(len(model.hook_patches))]
    if not_seen:
        summary["not_seen_by_training"] = not_seen
    return summary
