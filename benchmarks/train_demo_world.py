"""Train the world (classifier, then text encoder + UNet) and write world.safetensors (fp16, 3.2 MB).

    .venv/bin/python benchmarks/train_demo_world.py     # the committed demo_world/world.safetensors: seed 0, defaults below
    .venv/bin/python benchmarks/train_demo_world.py --world deep --steps 5000    # benchmarks/worlds/deep.safetensors
    .venv/bin/python benchmarks/train_demo_world.py --world large --steps 3000   # benchmarks/worlds/large.safetensors
    .venv/bin/python benchmarks/train_demo_world.py --world heldout --steps 2600 --classifier-cast 0.08
        # benchmarks/worlds/heldout.safetensors

The worlds differ in latent size, UNet shape, text encoder and (heldout) vocabulary and shapes
(demo_world/spec.py); each trains its own classifier on its own renders, in its own words.

Seeded and single-threaded by default, so the same command on the same torch gives the same file.
The UNet learns the standard eps objective (unweighted MSE on the noise) on comfy's SD1.5 discrete schedule
(sigma from t in 0..999, the input scaled by 1/sqrt(sigma^2 + 1) as comfy's model_sampling does); half of each
batch draws t from 600..999 instead of 0..999, and the noise gets a per-channel constant of std 0.1 ("offset
noise"): a 16x16 latent's noise has a large mean (std 1/16, times sigma_max 14.6) that a small UNet otherwise
never learns to predict, so every seed left its own colour cast on the image. Sampling uses plain noise.
10% of captions are dropped to "" so classifier-free guidance works.
"""
from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_host as host  # noqa: E402

host.setup(host.threads_from_argv(sys.argv))  # before the pack (and comfy) is imported

from comfyui_concept_erasure.demo_world.renderer import (images_to_model_latent, random_labels,  # noqa: E402
                                                         render_batch, render_empty)
from comfyui_concept_erasure.demo_world.classifier import Classifier  # noqa: E402
from comfyui_concept_erasure.demo_world.text_encoder import TextEncoder  # noqa: E402
from comfyui_concept_erasure.demo_world.unet import build_unet  # noqa: E402
from comfyui_concept_erasure.demo_world.spec import WORLDS  # noqa: E402
from comfyui_concept_erasure.demo_world.world import load_world, save_world  # noqa: E402

DEFAULTS = dict(seed=0, steps=6000, batch=32, lr=1e-3, ema=0.995, classifier_steps=1200, caption_dropout=0.1,
                high_noise_share=0.5, offset_noise=0.1, classifier_cast=0.0)
HIGH_NOISE_FROM = 600  # timesteps 600..999: where a small eps-model's errors decide the image's overall colour


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """What a sampler's output may look like: a little blur, noise and contrast change."""
    b = images.shape[0]
    blur = F.avg_pool2d(images.permute(0, 3, 1, 2), 3, stride=1, padding=1, count_include_pad=False).permute(0, 2, 3, 1)
    mix = torch.rand(b, 1, 1, 1, generator=generator) * 0.6
    images = images * (1 - mix) + blur * mix
    gain = 1 + (torch.rand(b, 1, 1, 1, generator=generator) - 0.5) * 0.3
    noise = torch.randn(images.shape, generator=generator) * torch.rand(b, 1, 1, 1, generator=generator) * 0.08
    return (images * gain + noise).clamp(0, 1)


def colour_cast(images: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """A per-image offset of each channel: the colour cast a sample's background may carry (heldout's purples read
    as cyan on a green cast until its classifier saw casts in training)."""
    return (images + std * torch.randn((images.shape[0], 1, 1, 3), generator=generator)).clamp(0, 1)


def train_classifier(classifier, rng: random.Random, generator: torch.Generator, steps: int, log,
                     size: int, vocabulary, cast: float = 0.0, seed: int = 0) -> float:
    # The casts draw from their own generator, so the option changes the classifier and nothing the UNet trains on.
    cast_generator = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.Adam(classifier.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    classifier.train()
    for step in range(steps):
        labels = random_labels(rng, 112, vocabulary)
        images = torch.cat([render_batch(rng, labels, size), render_empty(rng, 16, size)])
        obj = torch.tensor([vocabulary.objects.index(o) for o, _ in labels] + [len(vocabulary.objects)] * 16)
        colour = torch.tensor([vocabulary.colours.index(c) for _, c in labels])
        images = augment(images, generator)
        obj_logits, colour_logits = classifier(colour_cast(images, cast, cast_generator) if cast else images)
        loss = F.cross_entropy(obj_logits, obj) + F.cross_entropy(colour_logits[:112], colour)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"classifier step {step}: loss {loss.item():.4f}")
    classifier.eval()
    labels = random_labels(rng, 500, vocabulary)
    objs, colours = classifier.read(render_batch(rng, labels, size))
    return sum(o == lo and c == lc for (lo, lc), o, c in zip(labels, objs, colours)) / len(labels)


class CloneNormInputs:
    """The fork's BasicTransformerBlock adds residuals in place after a norm saved its input; give the norms a
    copy so backward works (upstream no longer needs this; gradients are the same)."""

    def __init__(self, unet):
        self.unet, self.handles = unet, []

    def __enter__(self):
        for module in self.unet.modules():
            if type(module).__name__ == "BasicTransformerBlock":
                for name in ("norm1", "norm2", "norm3"):
                    self.handles.append(getattr(module, name).register_forward_pre_hook(
                        lambda mod, args: (args[0].clone(),) + tuple(args[1:])))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def draw_timesteps(batch: int, high_noise_share: float, generator: torch.Generator) -> torch.Tensor:
    """Uniform over 0..999, except that a share of the batch is drawn from HIGH_NOISE_FROM..999."""
    t = torch.randint(0, 1000, (batch,), generator=generator)
    high = torch.randint(HIGH_NOISE_FROM, 1000, (batch,), generator=generator)
    return torch.where(torch.rand(batch, generator=generator) < high_noise_share, high, t)


def train_diffusion(model, text_encoder, rng, generator, steps, batch, lr, ema_decay, dropout, high_noise_share,
                    offset_noise, log, size, vocabulary):
    unet = model.model.diffusion_model
    sampling = model.get_model_object("model_sampling")
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = 100
    sched = torch.optim.lr_scheduler.LambdaLR(  # warm-up, then cosine down to lr / 10
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * s / steps))))
    ema = [p.detach().clone() for p in params]
    unet.train(), text_encoder.train()
    started = time.time()
    with CloneNormInputs(unet):
        for step in range(steps):
            labels = random_labels(rng, batch, vocabulary)
            x0 = images_to_model_latent(render_batch(rng, labels, size))
            captions = ["" if rng.random() < dropout else vocabulary.random_caption(rng, o, c) for o, c in labels]
            context = text_encoder.encode(captions)
            t = draw_timesteps(batch, high_noise_share, generator)
            sigma = sampling.sigma(t.float())
            eps = torch.randn(x0.shape, generator=generator)
            eps = eps + offset_noise * torch.randn((batch, x0.shape[1], 1, 1), generator=generator)
            x_t = x0 + eps * sigma[:, None, None, None]
            pred = unet(sampling.calculate_input(sigma, x_t), sampling.timestep(sigma).float(), context=context)
            loss = F.mse_loss(pred, eps)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            with torch.no_grad():
                for e, p in zip(ema, params):
                    e.lerp_(p, 1 - ema_decay)
            if step % 100 == 0 or step == steps - 1:
                log(f"diffusion step {step}: loss {loss.item():.4f} ({time.time() - started:.0f} s)")
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    unet.eval(), text_encoder.eval()


def evaluate(world, seed: int, count: int, log) -> dict:
    """Object / colour accuracy of the trained world's samples, for every object and colour."""
    from comfyui_concept_erasure.demo_world.world import read_prompt_samples

    captions = [f"a {c} {o}" for o in world.vocabulary.objects for c in world.vocabulary.colours]
    reads = read_prompt_samples(world, world.model, captions, seed, count)
    obj_ok = col_ok = total = 0
    for caption, (objs, colours) in zip(captions, reads):
        _, colour, obj = caption.split()
        total += len(objs)
        right_object, right_colour = sum(o == obj for o in objs), sum(c == colour for c in colours)
        obj_ok, col_ok = obj_ok + right_object, col_ok + right_colour
        log(f"  {caption:20s} object {right_object}/{len(objs)}  colour {right_colour}/{len(objs)}")
    return {"object_accuracy": obj_ok / total, "colour_accuracy": col_ok / total}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for key, value in DEFAULTS.items():
        parser.add_argument("--" + key.replace("_", "-"), type=type(value), default=value)
    parser.add_argument("--world", choices=sorted(WORLDS), default="demo", help="which world's shape (spec.py)")
    parser.add_argument("--out", type=Path, help="default: the world's file (demo_world/ or benchmarks/worlds/)")
    parser.add_argument("--threads", type=int, default=host.threads_from_env())
    opts = parser.parse_args(argv)
    spec = WORLDS[opts.world]
    opts.out = opts.out or host.world_file(opts.world)

    log = lambda msg: print(msg, flush=True)  # noqa: E731
    torch.manual_seed(opts.seed)
    rng, generator = random.Random(opts.seed), torch.Generator().manual_seed(opts.seed)
    started = time.time()
    classifier = Classifier(spec.vocabulary)
    classifier_accuracy = train_classifier(classifier, rng, generator, opts.classifier_steps, log, spec.size,
                                           spec.vocabulary, opts.classifier_cast, opts.seed)
    log(f"classifier accuracy on fresh renders: {classifier_accuracy:.3f} ({time.time() - started:.0f} s)")
    model = build_unet(opts.seed, spec)
    text_encoder = TextEncoder(spec.text_width, layers=spec.text_layers, vocabulary=spec.vocabulary)
    train_diffusion(model, text_encoder, rng, generator, opts.steps, opts.batch, opts.lr, opts.ema,
                    opts.caption_dropout, opts.high_noise_share,
                    opts.offset_noise, log, spec.size, spec.vocabulary)
    train_seconds = time.time() - started
    settings = {k: getattr(opts, k) for k in DEFAULTS}
    world_arg = "" if opts.world == "demo" else f"--world {opts.world} "
    command = "python benchmarks/train_demo_world.py " + world_arg + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in settings.items() if v != DEFAULTS[k])
    metadata = {"command": command.strip(), "settings": settings, "torch": torch.__version__,
                "train_seconds": round(train_seconds), "classifier_accuracy": classifier_accuracy}
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    save_world(opts.out, model, text_encoder, classifier, metadata, spec)
    world = load_world(opts.out)  # evaluate what was saved (fp16 weights)
    accuracy = evaluate(world, seed=1234, count=16, log=log)
    log(f"sample accuracy: {accuracy}")
    save_world(opts.out, world.model, world.text_encoder, world.classifier, dict(metadata, sample_accuracy=accuracy),
               spec)
    log(f"wrote {opts.out} ({opts.out.stat().st_size / 1e6:.1f} MB) in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
