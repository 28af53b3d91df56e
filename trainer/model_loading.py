"""Loading the model for training: the memory plan (memory_plan.py) says what the run needs, ComfyUI's model
management frees it and loads the UNet whole onto its device, or the run is refused before anything changes."""
from __future__ import annotations

import inspect

import torch

import comfy.model_management

from .memory_plan import MemoryPlan, MemoryPlanner, TrainingMemoryError, fit
from .settings import TrainSettings


def load_whole(patcher, plan: MemoryPlan) -> None:
    """Load the UNet fully onto its device, asking ComfyUI to free what the plan needs beside it (it unloads other
    models); a partial (lowvram) load is refused: every weight must be on the device for training."""
    kwargs = {}
    if "force_full_load" in inspect.signature(comfy.model_management.load_models_gpu).parameters:
        kwargs["force_full_load"] = True
    comfy.model_management.load_models_gpu([patcher], memory_required=plan.beyond_weights, **kwargs)
    device = torch.device(patcher.load_device)
    params = list(patcher.model.diffusion_model.parameters())
    elsewhere = [p for p in params if p.device.type != device.type]
    if elsewhere:
        raise TrainingMemoryError(
            f"ComfyUI loaded the UNet only in part onto {device} ({len(params) - len(elsewhere)} of {len(params)} "
            f"weights; lowvram mode), and training needs all of it there: {plan.describe()}. Free memory on the "
            "device (close other programs, or start ComfyUI without --lowvram / --novram) or lower the resolution "
            "or rank. Nothing was changed.")


def plan_and_load(patcher, planner: MemoryPlanner, s: TrainSettings, resolution: int) -> MemoryPlan:
    device = torch.device(patcher.load_device)
    mm = comfy.model_management
    return fit(planner, s, resolution, s.gradient_checkpointing, free_now=lambda: mm.get_free_memory(device),
               total_memory=mm.get_total_memory(device), load=lambda plan: load_whole(patcher, plan))
