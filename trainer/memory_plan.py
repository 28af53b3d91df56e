"""How much memory a training run needs, counted before it starts, and whether the device can hold it.

The plan is made of:
  weights        the UNet as ComfyUI loaded it (resident whatever the trainer does)
  weight copies  the same weights converted to the compute dtype for the run (0 when they are loaded in it)
  trainable      deltas and prompt tokens: float32 values and Adam's two moments
  iteration      the peak of one iteration on top of those: activations kept for backward (fewer with gradient
                 checkpointing), gradients, the teacher's batch, the optimizer's temporaries, a step of trajectory
                 sampling, the trajectory pool, the encoded conditioning
The iteration is counted, not estimated: the trainer's own iteration code runs once on a shape-only copy of the
model (memory_count.py), with the same settings, so every tensor it creates is seen with its size.
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from .checkpointing import checkpointed_transformers
from .conditioning import Cond, CondBatch
from .deltas import target_layers
from .denoiser import Denoiser
from .host_autograd import trainable_model
from .iteration import build_trainables, loss_terms, optimizer_step
from .memory_count import (LiveBytes, counting_device, fake_mode, shape_only_model, tensor_bytes,
                           with_sdpa_attention)
from .precision import NAMES
from .settings import TrainSettings

log = logging.getLogger(__name__)

GiB = 2 ** 30
# Not tensors, so not counted: the caching allocator's rounding and fragmentation and the cuBLAS / cuDNN
# workspaces. Kept free on accelerators on top of the plan.
ACCELERATOR_HEADROOM = 0.10
ACCELERATOR_RESERVE = 256 * 2 ** 20
LOW_RANK = 32  # what a refusal offers instead of full deltas (the node's default)


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


@dataclass(frozen=True)
class MemoryPlan:
    device: str
    dtype: str
    checkpointing: bool
    resolution: int
    weights: int
    weight_copies: int
    trainable_params: int
    trainable: int
    iteration: int
    settings: TrainSettings
    estimated: bool = False  # the count failed (e.g. an attention kernel without a shape-only version)

    @property
    def headroom(self) -> int:
        if torch.device(self.device).type == "cpu":
            return 0
        return int(ACCELERATOR_HEADROOM * (self.weight_copies + self.trainable + self.iteration)) + ACCELERATOR_RESERVE

    @property
    def counted(self) -> int:
        """Everything the count saw: weights, copies, trainable state and the iteration's peak."""
        return self.weights + self.weight_copies + self.trainable + self.iteration

    @property
    def beyond_weights(self) -> int:
        """What must be free once the UNet is loaded."""
        return self.weight_copies + self.trainable + self.iteration + self.headroom

    @property
    def total(self) -> int:
        return self.weights + self.beyond_weights

    def describe(self) -> str:
        s = self.settings
        deltas = "full deltas" if s.rank == 0 else f"rank {s.rank}"
        parts = [f"weights {gib(self.weights)}"]
        if self.weight_copies:
            parts.append(f"{self.dtype} copy of the weights {gib(self.weight_copies)}")
        parts.append(f"trainable {gib(self.trainable)} ({self.trainable_params / 1e6:.1f} M parameters with Adam's "
                     "moments)")
        parts.append(f"one iteration {gib(self.iteration)}")
        if self.headroom:
            parts.append(f"allocator headroom {gib(self.headroom)}")
        return (f"{gib(self.total)} on {self.device} ({s.method}, {deltas}, {self.dtype}, {self.resolution} px, "
                f"batch {s.batch_size}, gradient checkpointing {'on' if self.checkpointing else 'off'}: "
                f"{', '.join(parts)}{'; the iteration estimated, not counted' if self.estimated else ''})")


class TrainingMemoryError(RuntimeError):
    """The run cannot fit the device; raised before the first iteration, nothing was changed."""


@dataclass
class RunShape:
    """What the count needs to know of a run besides its settings: the model and its conditioning."""

    base_model: object
    transformer_options: dict
    load_device: object
    compute_dtype: torch.dtype
    latent_channels: int
    context_dim: int
    kind: str
    concepts: Sequence[Cond]
    unconditional: Cond
    preserves: Sequence[Cond]


class MemoryPlanner:
    """Counts plans for a run, caching each (settings, resolution, checkpointing) it has counted."""

    def __init__(self, run: RunShape):
        self.run = run
        self._cache: Dict[tuple, MemoryPlan] = {}
        unet = run.base_model.diffusion_model
        tensors = list(unet.parameters()) + list(unet.buffers())
        self.weights = sum(t.numel() * t.element_size() for t in tensors)
        itemsize = torch.empty((), dtype=run.compute_dtype).element_size()
        self.weight_copies = sum(t.numel() * itemsize for t in tensors
                                 if t.is_floating_point() and t.dtype != run.compute_dtype)

    def plan(self, s: TrainSettings, resolution: int, checkpointing: bool) -> MemoryPlan:
        key = (dataclasses.astuple(s), resolution, checkpointing)
        if key not in self._cache:
            estimated = False
            try:
                iteration, trainable, params = self._count(s, resolution, checkpointing, self.run.transformer_options)
            except Exception as first:  # an attention kernel with no shape-only version (xformers, sage, a chunked
                try:                    # kernel sizing itself by data): PyTorch's fused attention stands in
                    iteration, trainable, params = self._count(s, resolution, checkpointing,
                                                               with_sdpa_attention(self.run.transformer_options))
                    log.info("concept erasure: training memory counted with PyTorch attention standing in for the "
                             "host's (%s: %s)", type(first).__name__, first)
                except Exception as e:  # a host the shape-only run cannot follow must not stop training
                    log.warning("concept erasure: could not count the training memory (%s: %s); estimating it "
                                "from ComfyUI's inference estimate instead", type(e).__name__, e)
                    iteration, trainable, params = self._estimate(s, resolution)
                    estimated = True
            self._cache[key] = MemoryPlan(
                device=str(torch.device(self.run.load_device)), dtype=NAMES[self.run.compute_dtype],
                checkpointing=checkpointing, resolution=resolution, weights=self.weights,
                weight_copies=self.weight_copies, trainable_params=params, trainable=trainable, iteration=iteration,
                settings=s, estimated=estimated)
        return self._cache[key]

    def _estimate(self, s: TrainSettings, resolution: int) -> Tuple[int, int, int]:
        """The fallback: trainable parameters from the layer shapes (exact), the iteration as ComfyUI's own inference
        estimate for the teacher's batch (a rough figure: fit() does not refuse on it)."""
        run = self.run
        layers = target_layers(run.base_model.diffusion_model, s.method)
        params = sum(m.weight.numel() if s.rank == 0 else s.rank * (m.weight.shape[0] + m.weight[0].numel())
                     for m in layers.values())
        params += 2 * s.prompt_tokens * run.context_dim if s.uses_prompt else 0
        rows = s.batch_size * (3 if run.preserves else 2)
        shape = [rows, run.latent_channels, resolution // 8, resolution // 8]
        return int(run.base_model.memory_required(shape)), 12 * params, params

    def _count(self, s: TrainSettings, resolution: int, checkpointing: bool,
               options: dict) -> Tuple[int, int, int]:
        # Python's cycle collector would free some tensors at moments that differ from run to run; without it the
        # count is the same every time (and errs on the high side, as a real run's uncollected cycles do).
        collecting = gc.isenabled()
        gc.disable()
        try:
            return self._count_once(s, resolution, checkpointing, options)
        finally:
            if collecting:
                gc.enable()

    def _count_once(self, s: TrainSettings, resolution: int, checkpointing: bool,
                    options: dict) -> Tuple[int, int, int]:
        run = self.run
        device = counting_device(run.load_device)
        latent = (run.latent_channels, resolution // 8, resolution // 8)
        mode = fake_mode()
        model = shape_only_model(run.base_model, run.compute_dtype, device, mode)
        with torch.inference_mode(False), mode, trainable_model(model, transformer_options=options):
            parts = build_trainables(model.diffusion_model, s, run.context_dim, 1.0, device,
                                     torch.Generator().manual_seed(0),
                                     foreach=torch.device(run.load_device).type == "cuda")
            params = parts.parameters()
            for p in params:  # Adam's moments exist from the first step on: make them before counting
                p.grad = torch.zeros_like(p)
            parts.optimizer.step()
            parts.optimizer.zero_grad(set_to_none=True)
            state = [t for st in parts.optimizer.state.values() for t in st.values()
                     if torch.is_tensor(t) and t.numel() > 1]
            trainable = tensor_bytes(params + state)

            def fake(cond: Cond) -> Cond:
                return {k: torch.zeros(v.shape, dtype=v.dtype, device=device) for k, v in cond.items()}

            widest = max(run.concepts, key=lambda c: c["c_crossattn"].shape[1])
            concepts = [fake(widest)] * s.batch_size
            preserves = [fake(run.preserves[0])] * s.batch_size if run.preserves else []
            x_t = torch.zeros((s.batch_size, *latent), device=device)
            sigma = torch.ones(s.batch_size, device=device)
            denoiser = Denoiser(model, options, device, parts.deltas, parts.prompt, run.kind)
            uncond = fake(run.unconditional)
            with parts.deltas.attached(), checkpointed_transformers(model.diffusion_model, parts.deltas,
                                                                    checkpointing), LiveBytes() as live:
                loss_terms(denoiser, s, x_t, sigma, uncond, concepts, preserves, lambda loss: loss.backward(),
                           adversary=parts.adversary)
                optimizer_step(parts, None)
                with torch.no_grad():  # a step of trajectory sampling: concept (and uncond for CFG) rows
                    rows = concepts + ([uncond] * s.batch_size if s.sampling_cfg != 1.0 else [])
                    CondBatch(rows, [0, 1] if s.sampling_cfg != 1.0 else [0]).run(
                        lambda xs, ss, cond, cu: denoiser.denoised(xs, ss, cond, deltas=True,
                                                                   prompt=s.method == "lp_attached",
                                                                   cond_or_uncond=cu),
                        x_t.repeat(len(rows) // s.batch_size, 1, 1, 1), sigma.repeat(len(rows) // s.batch_size))
        # held through the run: the trajectory pool, and the encoded conditioning (SDXL's is a few MB)
        pool = (s.sampling_steps + 1) * s.batch_size * math.prod(latent) * 4
        conds = tensor_bytes(t for c in [*run.concepts, run.unconditional, *run.preserves] for t in c.values())
        return live.peak + pool + conds, trainable, sum(p.numel() for p in params)


def alternatives(s: TrainSettings, resolution: int, checkpointing: bool) -> List[Tuple[str, TrainSettings, int, bool]]:
    """Cheaper variants of a run to offer when it does not fit: (what to change, settings, resolution, ckpt)."""
    out = []
    if not checkpointing:
        out.append(("gradient_checkpointing on", s, resolution, True))
    low_rank = s
    if s.rank == 0 or s.rank > LOW_RANK:
        low_rank = dataclasses.replace(s, rank=LOW_RANK)
        out.append((f"rank {LOW_RANK} with gradient_checkpointing on", low_rank, resolution, True))
    if s.batch_size > 1:
        out.append(("batch_size 1 with gradient_checkpointing on", dataclasses.replace(low_rank, batch_size=1),
                    resolution, True))
    smaller = max(256, (resolution * 3 // 4) // 64 * 64)
    if smaller < resolution:
        what = f"resolution {smaller}" + (f" with rank {LOW_RANK}" if low_rank is not s else "")
        out.append((what + " and gradient_checkpointing on", low_rank, smaller, True))
    return out


def refusal(planner: MemoryPlanner, plan: MemoryPlan, available: int, where: str,
            need: Callable[[MemoryPlan], int] = lambda p: p.beyond_weights) -> TrainingMemoryError:
    """The error that names the need, the free memory and what would fit (`need`: the part of a plan that must fit
    into `available`)."""
    fits, others = [], []
    for what, s, resolution, ckpt in alternatives(plan.settings, plan.resolution, plan.checkpointing):
        try:
            other = planner.plan(s, resolution, ckpt)
        except Exception as e:  # the message must come out whatever a variant does
            log.warning("concept erasure: could not count the variant '%s': %s", what, e)
            continue
        (fits if need(other) <= available else others).append(
            f"{what} (needs {gib(need(other))}, {gib(other.total)} in all)")
    if fits:
        advice = "What would fit: " + "; ".join(fits) + "."
    elif others:
        advice = "Nothing cheaper that was tried fits either: " + "; ".join(others) + "."
    else:
        advice = "Lower the resolution or use a smaller rank."
    return TrainingMemoryError(
        f"Training needs {plan.describe()}; that is {gib(need(plan))} but only {gib(available)} are "
        f"free on {plan.device} {where}. {advice} Nothing was changed.")


def fit(planner: MemoryPlanner, s: TrainSettings, resolution: int, setting: str, free_now: Callable[[], int],
        total_memory: int, load: Callable[[MemoryPlan], None]) -> MemoryPlan:
    """Choose gradient checkpointing (setting auto/on/off), load the model, and return the plan that fits.

    Refuses before loading when even the smallest candidate exceeds the device's total memory, and after loading
    (ComfyUI has unloaded what it could) when none fits the free memory. An estimated plan refuses nothing: auto
    then takes checkpointing, the cheaper side.
    """
    order = [False, True] if setting == "auto" else [setting == "on"]
    first = planner.plan(s, resolution, order[0])
    if first.estimated:  # no count to decide on: load, keep memory low when allowed to, and go on
        load(first)
        return planner.plan(s, resolution, setting != "off")
    if first.total > total_memory:
        last = planner.plan(s, resolution, order[-1])
        if last.total > total_memory:
            raise refusal(planner, last, total_memory, "in all (the device's total memory)", lambda p: p.total)
    load(first)
    available = free_now()
    for ckpt in order:
        plan = planner.plan(s, resolution, ckpt)
        if plan.beyond_weights <= available:
            return plan
    raise refusal(planner, plan, available, "beside the loaded model after ComfyUI unloaded what it could")
