"""Training speed: a plain ESD loop against the trainer, same model, same iterations, one process.

(a) plain ESD-x, written here as ESD does it: a trainable copy of the UNet; every iteration samples x_t afresh
    (a random number of the sampling_steps Euler/DDIM steps, cond+uncond batched, with the student), calls the
    frozen model twice (uncond, concept) and takes one Adam step on the attn2 weights;
(b) the trainer through the Train Concept Erasure node (method esd_x with full deltas, rank 0, as (a) trains;
    the memory plan counted before the first iteration is part of its time; trajectories reused for
    trajectory_refresh iterations, one batched teacher call, weight deltas on one copy of the UNet).
Prints seconds per 100 iterations of both and the ratio, plus the relative error of each result to the ESD target
on held-out x_t (1.0 = untrained), so speed is not bought with quality.

  .venv/bin/python benchmarks/train_speed.py                      # CPU, tiny SD1.5-shaped UNet, 16x16 latents
  .venv/bin/python benchmarks/train_speed.py --refresh-sweep 1,5,25,100 --iterations 60
  .venv/bin/python benchmarks/train_speed.py --gpu               # SD1.5-sized UNet, random weights, 64x64
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bootstrap(cpu: bool, threads: int):
    import torch

    if threads:
        torch.set_num_threads(threads)
    from comfy.cli_args import args

    args.cpu = cpu
    import comfy.model_management  # noqa: F401,E402  (after args: upstream refuses to start on a CPU otherwise)

    sys.path.insert(0, str(ROOT / "scripts"))
    from pack_import import import_pack

    import_pack()
    sys.path.insert(0, str(ROOT / "tests" / "support"))


def sd15_sized_model(device, dtype):
    import torch

    import comfy.model_patcher
    from sd_architectures import build

    base = build("sd15", device, dtype)
    params = sum(p.numel() for p in base.diffusion_model.parameters())
    print(f"SD1.5-sized UNet: {params / 1e6:.0f} M parameters, weights {dtype}, random init")
    return comfy.model_patcher.ModelPatcher(base, load_device=torch.device(device), offload_device=torch.device("cpu"))


def conditioning(seed, device="cpu"):
    import torch

    return [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(seed)), {}]]


def eps_of(base, x, sigma, context):
    denoised = base.apply_model(x, sigma, c_crossattn=context.to(x.device))
    return (x - denoised.float()) / sigma.view(-1, 1, 1, 1)


def plain_esd(model, concept, uncond, a, device, amp):
    """ESD-x as the original code does it; returns (seconds, trained student BaseModel)."""
    import torch
    import torch.nn.functional as F

    import comfy.model_management
    from comfyui_concept_erasure.trainer.host_autograd import trainable_model
    from comfyui_concept_erasure.trainer.prediction import sampling_schedule

    comfy.model_management.load_models_gpu([model])
    teacher = model.model
    student = copy.deepcopy(teacher).float()  # ESD keeps a frozen original and a trainable copy
    gen = torch.Generator().manual_seed(a.seed)
    _, sigmas, _ = sampling_schedule(teacher.model_sampling, a.sampling_steps)
    c, u = concept[0][0].to(device), uncond[0][0].to(device)
    def autocast():
        return torch.autocast(device_type=torch.device(device).type, dtype=amp) if amp is not None else contextlib.nullcontext()
    with trainable_model(student):
        params = []
        for name, p in student.diffusion_model.named_parameters():
            if "attn2" in name:
                p.requires_grad_(True)
                params.append(p)
        optimizer = torch.optim.Adam(params, lr=a.learning_rate)
        sync(device)
        start = time.perf_counter()
        for _ in range(a.iterations):
            stop = int(torch.randint(a.sampling_steps, (1,), generator=gen))
            x = torch.randn((1, 4, a.latent, a.latent), generator=gen).to(device) * sigmas[0]
            with torch.no_grad(), autocast():
                for i in range(stop):  # sample until the chosen step with the model being trained
                    sigma = torch.full((2,), float(sigmas[i]), device=device)
                    den = student.apply_model(torch.cat([x, x]), sigma, c_crossattn=torch.cat([c, u])).float()
                    pos, neg = den.chunk(2)
                    den = neg + a.sampling_cfg * (pos - neg)
                    x = x + (x - den) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
                sigma = torch.full((1,), float(sigmas[stop]), device=device)
                e0 = eps_of(teacher, x, sigma, u)
                ep = eps_of(teacher, x, sigma, c)
            with autocast():
                en = eps_of(student, x, sigma, c)
            loss = F.mse_loss(en, e0 - a.negative_guidance * (ep - e0))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sync(device)
        seconds = time.perf_counter() - start
    student.requires_grad_(False)
    return seconds, student


def run_trainer(model, concept, uncond, a, refresh, method="esd_x", rank=0):
    """The node's train function; esd_x with full deltas (rank 0) trains what the plain ESD-x loop trains."""
    import torch

    from comfyui_concept_erasure.nodes.train_node import TrainConceptErasure

    from pack_import import widget_defaults

    inputs = widget_defaults(TrainConceptErasure)
    inputs.update(model=model, concept=concept, unconditional=uncond, method=method, iterations=a.iterations,
                  learning_rate=a.learning_rate, sampling_steps=a.sampling_steps, sampling_cfg=a.sampling_cfg,
                  negative_guidance=a.negative_guidance, trajectory_refresh=refresh, resolution=a.latent * 8,
                  seed=a.seed, dtype=a.dtype, key_weight=a.key_weight, rank=rank)
    sync(model.load_device)
    start = time.perf_counter()
    with torch.inference_mode():
        erased, erasure, _ = TrainConceptErasure().train(**inputs)
    sync(model.load_device)
    return time.perf_counter() - start, erased


def held_out_points(model, concept, a, count=4):
    """x_t from trajectories of the original model for the concept, at every 5th step (not used in training)."""
    import torch

    import comfy.model_management
    from comfyui_concept_erasure.trainer.prediction import sampling_schedule

    comfy.model_management.load_models_gpu([model])
    base, device = model.model, model.load_device
    _, sigmas, _ = sampling_schedule(base.model_sampling, a.sampling_steps)
    gen = torch.Generator().manual_seed(a.seed + 1000)
    x = torch.randn((count, 4, a.latent, a.latent), generator=gen).to(device) * sigmas[0]
    c = concept[0][0].to(device).expand(count, -1, -1)
    points = []
    with torch.no_grad():
        for i in range(a.sampling_steps):
            sigma = torch.full((count,), float(sigmas[i]), device=device)
            if i % 5 == 0:
                points.append((x.clone(), sigma))
            den = base.apply_model(x, sigma, c_crossattn=c).float()
            x = x + (x - den) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    return points


def relative_error(model, erased_eps, concept, uncond, points, eta):
    """|eps_erased(c) - target| / |eps_original(c) - target| over the points; 1.0 means nothing was learned."""
    import torch

    import comfy.model_management

    num = den = 0.0
    with torch.no_grad():
        for x, sigma in points:
            comfy.model_management.load_models_gpu([model])
            e0 = eps_of(model.model, x, sigma, uncond[0][0].expand(x.shape[0], -1, -1))
            ep = eps_of(model.model, x, sigma, concept[0][0].expand(x.shape[0], -1, -1))
            target = e0 - eta * (ep - e0)
            erased = erased_eps(x, sigma, concept[0][0].expand(x.shape[0], -1, -1))
            num += float((erased - target).pow(2).sum())
            den += float((ep - target).pow(2).sum())
    return (num / den) ** 0.5


def patcher_eps(patcher):
    import comfy.model_management

    def fn(x, sigma, context):
        comfy.model_management.load_models_gpu([patcher])
        options = {"transformer_options": dict(patcher.model_options["transformer_options"])}
        den = patcher.model.apply_model(x, sigma, c_crossattn=context.to(x.device), **options)
        return (x - den.float()) / sigma.view(-1, 1, 1, 1)
    return fn


def sync(device):
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main():
    sys.stdout.reconfigure(line_buffering=True)  # each result shows as soon as it is measured, even when piped
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="SD1.5-sized UNet at 64x64 latents on CUDA")
    p.add_argument("--device", default=None, help="override the device of --gpu (e.g. cpu, to check the script)")
    p.add_argument("--iterations", type=int, default=None, help="iterations per run (default 100)")
    p.add_argument("--plain-iterations", type=int, default=None,
                   help="iterations of the plain ESD loop (default: same as --iterations)")
    p.add_argument("--sampling-steps", type=int, default=50)
    p.add_argument("--sampling-cfg", type=float, default=3.0)
    p.add_argument("--negative-guidance", type=float, default=1.0)
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--refresh", type=int, default=None, help="trajectory_refresh of the trainer (node default)")
    p.add_argument("--refresh-sweep", default="", help="comma-separated trajectory_refresh values to compare")
    p.add_argument("--key-weight", type=float, default=0.1)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--skip-plain", action="store_true", help="only the trainer (e.g. for the refresh sweep)")
    a = p.parse_args()
    device = a.device or ("cuda" if a.gpu else "cpu")
    bootstrap(cpu=device == "cpu", threads=a.threads)

    import torch

    from comfyui_concept_erasure.trainer.precision import compute_dtype, weight_dtype
    from comfyui_concept_erasure.trainer.settings import TrainSettings

    a.iterations = a.iterations or 100
    a.latent = 64 if a.gpu else 16
    refresh = a.refresh or TrainSettings().trajectory_refresh
    per = 1000 if a.gpu else 100
    if a.gpu:
        model = sd15_sized_model(device, torch.float16 if device == "cuda" else torch.float32)
    else:
        from tiny_models import build_model
        model = build_model("sd15")
        print(f"tiny SD1.5-shaped UNet, {sum(p.numel() for p in model.model.parameters()) / 1e6:.1f} M parameters, "
              f"{a.latent}x{a.latent} latents, {torch.get_num_threads()} CPU thread(s)")
    concept, uncond = conditioning(1), conditioning(2)
    points = held_out_points(model, concept, a)
    dtype = compute_dtype(a.dtype, device, weight_dtype(model.model.diffusion_model))
    amp = None if dtype == torch.float32 else dtype  # the plain loop: fp32 trainable copy, autocast to the same dtype
    print(f"{a.iterations} iterations, sampling_steps {a.sampling_steps}, cfg {a.sampling_cfg}, lr {a.learning_rate}, "
          f"compute dtype {dtype}")

    def peak_reset():
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak():
        return f", peak VRAM {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if device == "cuda" else ""

    plain_rate = None
    if not a.skip_plain:
        plain = copy.copy(a)
        plain.iterations = a.plain_iterations or a.iterations
        peak_reset()
        seconds, student = plain_esd(model, concept, uncond, plain, device, amp)
        plain_rate = seconds / plain.iterations * per
        student_eps = lambda x, s, c: eps_of(student, x, s, c)  # noqa: E731
        err = relative_error(model, student_eps, concept, uncond, points, a.negative_guidance)
        print(f"(a) plain ESD-x loop : {plain_rate:8.2f} s / {per} iterations{peak()}; "
              f"relative error to ESD target {err:.3f}")
        del student

    sweep = [int(v) for v in a.refresh_sweep.split(",") if v] or [refresh]
    for k in sweep:
        peak_reset()
        seconds, erased = run_trainer(model, concept, uncond, a, k)
        rate = seconds / a.iterations * per
        err = relative_error(model, patcher_eps(erased), concept, uncond, points, a.negative_guidance)
        ratio = f"; speed-up {plain_rate / rate:.1f}x" if plain_rate else ""
        print(f"(b) trainer esd_x, trajectory_refresh {k:3d}: {rate:8.2f} s / {per} iterations{peak()}; "
              f"relative error to ESD target {err:.3f}{ratio}")
    if not a.refresh_sweep:
        peak_reset()
        seconds, _ = run_trainer(model, concept, uncond, a, refresh, method="lp", rank=TrainSettings().rank)
        rate = seconds / a.iterations * per
        ratio = f"; speed-up over (a) {plain_rate / rate:.1f}x" if plain_rate else ""
        print(f"(c) trainer lp (erase + key terms, rank {TrainSettings().rank}), trajectory_refresh {refresh}: "
              f"{rate:8.2f} s / {per} iterations"
              f"{peak()}{ratio}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
