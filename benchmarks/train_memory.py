"""Peak training memory of the real SD1.5 (512 px), SD2.x v-prediction (768 px) and SDXL (1024 px) UNets.

  .venv/bin/python benchmarks/train_memory.py                     # counted: no GPU needed, a few minutes
  .venv/bin/python benchmarks/train_memory.py --gpu               # also measured on CUDA, and s / 1000 iterations
  .venv/bin/python benchmarks/train_memory.py --cpu-check         # counted vs the CPU allocator, real SD1.5 UNet
  options: --families sd15,sdxl  --configs lp:8:off,lp:0:on  (method:rank:checkpointing)  --preserve 1 (counted
           with that many preserve prompts connected, as train_concept_erasure.json connects one)

Counted: the trainer's own memory plan (trainer/memory_plan.py) for the model as ComfyUI loads it on a GPU
(fp16 weights, dtype auto, PyTorch attention, one iteration of the default settings run on a shape-only copy of
the model), so the figures need no GPU and no weights. Columns: the UNet's weights, the trainable state (fp32 deltas / prompt and
Adam's two moments), the iteration's peak on top (activations, gradients, teacher batch, optimizer temporaries,
trajectory pool), their sum (the counted peak), and the plan's total with the allocator headroom it keeps free on
a GPU (what the trainer asks the device for).

--gpu builds each UNet on the GPU with random fp16 weights, trains through the trainer for --iterations, and
measures torch.cuda.max_memory_allocated above the weights (which exist before the run) and the time per 1000
iterations, next to the counted figure beside the weights; --plain also runs train_speed.py's plain ESD-x loop on
SD1.5 (its own peak and speed).
--cpu-check does the same on the CPU for the real SD1.5 UNet at a small resolution (fp32, 2 iterations),
measuring with the profiler's allocation events.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "scripts"))

DEFAULT_CONFIGS = ("lp:32:off", "lp:32:on", "lp:0:off", "lp:0:on", "lp_attached:32:off", "esd_x:32:off",
                   "esd_x:0:off", "esd_u:32:off", "esd_u:32:on")
GiB = 2 ** 30


def bootstrap(cpu: bool, threads: int):
    import torch

    torch.set_num_threads(threads)
    from comfy.cli_args import args

    args.cpu = cpu
    # ComfyUI's attention on NVIDIA GPUs (PyTorch SDPA, which keeps no attention matrix), so that the counts made
    # without a GPU are the counts of a GPU run
    args.use_pytorch_cross_attention = True
    import comfy.model_management  # noqa: F401  (after args: upstream refuses to start on a CPU otherwise)
    from pack_import import import_pack

    import_pack()


def parse_config(text: str):
    method, rank, ckpt = text.split(":")
    return method, int(rank), ckpt


def settings_for(method, rank, ckpt, **extra):
    from comfyui_concept_erasure.trainer import TrainSettings

    return TrainSettings(method=method, rank=rank, gradient_checkpointing=ckpt, **extra)


def counted_plan(family, settings, resolution, device="cuda", preserve=0):
    """The trainer's plan for the family's UNet as loaded in fp16 on `device`, counted on a shape-only model
    (with `preserve` preserve prompts connected, as the training workflow connects one)."""
    import torch

    from comfyui_concept_erasure.trainer.conditioning import encode_entries
    from comfyui_concept_erasure.trainer.memory_plan import MemoryPlanner, RunShape
    from comfyui_concept_erasure.trainer.prediction import prediction_kind
    from sd_architectures import build, conditioning

    base = build(family, "meta", torch.float16)
    latent = (4, resolution // 8, resolution // 8)
    concept = encode_entries(base, conditioning(family, 1), latent, "cpu", "positive", 0)
    uncond = encode_entries(base, conditioning(family, 2), latent, "cpu", "negative", 0)[0]
    kept = [encode_entries(base, conditioning(family, 3 + i), latent, "cpu", "positive", 0)[0]
            for i in range(preserve)]
    width = concept[0]["c_crossattn"].shape[-1]
    run = RunShape(base, {}, device, torch.float16, 4, width, prediction_kind(base.model_sampling), concept, uncond,
                   kept)
    return MemoryPlanner(run).plan(settings, resolution, settings.gradient_checkpointing == "on")


def gib(n):
    return f"{n / GiB:.2f}"


def counted_table(families, configs, preserve=0):
    from sd_architectures import FAMILIES

    print("| model | method | rank | checkpointing | weights | trainable | iteration | counted peak | plan (with "
          "headroom) | fits | count s |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---|---:|")
    for family in families:
        name, resolution = FAMILIES[family]
        for method, rank, ckpt in configs:
            started = time.time()
            plan = counted_plan(family, settings_for(method, rank, ckpt), resolution, preserve=preserve)
            fits = [f"{gb} GB" for gb in (8, 12, 16, 24) if plan.total <= gb * 10 ** 9 * 0.97]
            print(f"| {name} {resolution} | {method} | {rank or 'full'} | {ckpt} | {gib(plan.weights)} | "
                  f"{gib(plan.trainable)} | {gib(plan.iteration)} | {gib(plan.counted)} | {gib(plan.total)} | "
                  f"{fits[0] + ' card' if fits else 'none of 8-24 GB'} | {time.time() - started:.0f} |", flush=True)


def measured_run(family, settings, resolution, device, dtype, iterations):
    """Train on a real model of the family on `device`; returns (weights, measured peak beside them, plan, s / it)."""
    import torch

    import comfy.model_patcher
    from comfyui_concept_erasure.trainer import train_erasure
    from memory_probe import allocator_peak
    from sd_architectures import build, conditioning

    base = build(family, device, dtype)
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=torch.device(device), offload_device="cpu")
    weights = sum(t.numel() * t.element_size() for t in base.diffusion_model.state_dict().values())
    s = settings_for(settings.method, settings.rank, settings.gradient_checkpointing, iterations=iterations,
                     resolution=resolution, sampling_steps=settings.sampling_steps)
    started = time.perf_counter()

    def run():
        with torch.inference_mode():
            return train_erasure(patcher, conditioning(family, 1), conditioning(family, 2), None, s)

    peak, result = allocator_peak(device, run)
    seconds = time.perf_counter() - started
    del patcher, base
    return weights, peak, result.memory, seconds / iterations


def measured_table(families, configs, device, iterations, resolution=None):
    import torch

    from sd_architectures import FAMILIES

    dtype = torch.float16 if device == "cuda" else torch.float32
    print("| model | method | rank | checkpointing | weights | measured beside them | counted beside them | "
          "counted / measured | peak in all, measured | s / 1000 it |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    for family in families:
        name, default_resolution = FAMILIES[family]
        res = resolution or default_resolution
        for method, rank, ckpt in configs:
            settings = settings_for(method, rank, ckpt, sampling_steps=50 if device == "cuda" else 2)
            weights, measured, plan, per_it = measured_run(family, settings, res, device, dtype, iterations)
            counted = plan.counted - plan.weights
            print(f"| {name} {res} | {method} | {rank or 'full'} | {ckpt} | {gib(weights)} | {gib(measured)} | "
                  f"{gib(counted)} | {counted / measured:.3f} | {gib(weights + measured)} | {per_it * 1000:.0f} |",
                  flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default="sd15,sd2v,sdxl")
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help="method:rank:checkpointing,...")
    p.add_argument("--gpu", action="store_true", help="also measure on CUDA")
    p.add_argument("--plain", action="store_true", help="with --gpu: train_speed.py's plain ESD loop on SD1.5")
    p.add_argument("--iterations", type=int, default=30, help="iterations of each measured run")
    p.add_argument("--cpu-check", action="store_true", help="counted vs the CPU allocator on the real SD1.5 UNet")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--preserve", type=int, default=0, help="counted: this many preserve prompts connected")
    p.add_argument("--measured-only", action="store_true",
                   help="with --gpu / --cpu-check: skip the counted table (each measured row has its count)")
    a = p.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    bootstrap(cpu=not a.gpu, threads=a.threads)
    import torch

    families = [f for f in a.families.split(",") if f]
    configs = [parse_config(c) for c in a.configs.split(",") if c]
    print(f"torch {torch.__version__}; counted as loaded on a GPU: fp16 weights, dtype auto, default settings")
    if not (a.measured_only and (a.gpu or a.cpu_check)):
        counted_table(families, configs, a.preserve)
    if a.cpu_check:
        print("\nCPU check: real SD1.5 UNet (random fp32 weights), 256 px, 2 iterations, sampling_steps 2")
        measured_table(["sd15"], configs, "cpu", 2, resolution=256)
    if a.gpu:
        print(f"\nMeasured on {torch.cuda.get_device_name()}: {a.iterations} iterations per run")
        measured_table(families, configs, "cuda", a.iterations)
        if a.plain:
            import train_speed

            print("\nPlain ESD-x loop vs the trainer, SD1.5 at 512 px (train_speed.py --gpu):")
            sys.argv = ["train_speed.py", "--gpu", "--iterations", str(a.iterations)]
            train_speed.main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
