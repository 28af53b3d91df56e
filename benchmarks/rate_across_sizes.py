"""The learning rate on an SD1.5-sized UNet: does the trainer's default move the concept as fast as ESD's recipe?

ESD's 1e-5 is its rate for full attn2 deltas on SD1.5's 860 M-parameter UNet; the node's default is the same 1e-5
for rank-32 factors. min_score_rise (off by default) raises the rate while the concept score barely moves
(trainer/learning_rate.py). Here, on the SD1.5 UNet with random
weights (torch's default init) and random CLIP-sized contexts (77 x 768, RMS 1), each run is Train Concept
Erasure's own function, and the trainer's held-out concept score (0 = unchanged, 1 = ESD's target; the
Concept Erasure Report's 'toward ESD target') is measured every --every iterations:

  esd_x, full deltas, 1e-5, fixed   ESD's recipe, the reference
  lp, node defaults                  rank-32 factors at 1e-5
  lp, min_score_rise 0.2             the same, the rate raised while the score rises less than 0.2 per 100 its
  lp, ..., alpha = fan_in            a what-if, not the trainer's: the factors' product scaled by fan_in / rank
                                     instead of 1 (kohya alpha = fan_in), so that an Adam step on them changes a
                                     layer's output about as much as a step on a full delta at the same rate

  .venv/bin/python benchmarks/rate_across_sizes.py                  # CPU: 16x16 latents, 40 iterations
  .venv/bin/python benchmarks/rate_across_sizes.py --gpu --iterations 200 --resolution 512
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_host as host  # noqa: E402

RUNS = [
    ("esd_x, full deltas, 1e-5 (ESD)", dict(method="esd_x", rank=0, learning_rate=1e-5, min_score_rise=0.0), False),
    ("lp, node defaults (rank 32, 1e-5)", dict(method="lp"), False),
    ("lp, min_score_rise 0.2", dict(method="lp", min_score_rise=0.2), False),
    ("lp, node defaults, alpha = fan_in", dict(method="lp"), True),
]


@contextlib.contextmanager
def alpha_fan_in():
    """The what-if row: every LoRA factor pair trained with alpha = its layer's fan_in."""
    from comfyui_concept_erasure.trainer import iteration
    from comfyui_concept_erasure.trainer.deltas import DeltaSet

    class FanInDeltas(DeltaSet):
        def _output(self, key, module, x):
            fan_in = module.weight[0].numel()
            return super()._output(key, module, x) * (fan_in / self.alpha)

        def export(self):
            exported = super().export()
            for key, delta in exported.items():
                delta.alpha = float(self.layers[key].weight[0].numel())
            return exported

    iteration.DeltaSet = FanInDeltas
    try:
        yield
    finally:
        iteration.DeltaSet = DeltaSet


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=40)
    p.add_argument("--every", type=int, default=5, help="score_every")
    p.add_argument("--resolution", type=int, default=128, help="training image size (128: 16x16 latents)")
    p.add_argument("--sampling-steps", type=int, default=20)
    p.add_argument("--gpu", action="store_true", help="fp16 weights on CUDA")
    p.add_argument("--json", type=Path)
    p.add_argument("--threads", type=int, default=host.threads_from_env(2))
    a = p.parse_args(argv)
    host.setup(a.threads)
    import torch

    import comfy.model_patcher
    from comfyui_concept_erasure.nodes.train_node import TrainConceptErasure

    sys.path.insert(0, str(host.REPO / "scripts"))
    from sd_architectures import build

    device = "cuda" if a.gpu else "cpu"
    base = build("sd15", device, torch.float16 if a.gpu else torch.float32)
    model = comfy.model_patcher.ModelPatcher(base, load_device=torch.device(device), offload_device=torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    uncond, concept = [[torch.randn(1, 77, 768, generator=g), {}]], [[torch.randn(1, 77, 768, generator=g), {}]]
    params = sum(t.numel() for t in base.diffusion_model.parameters()) / 1e6
    print(f"SD1.5-sized UNet, {params:.0f} M parameters, random weights, {a.resolution} px, {device}, "
          f"{torch.get_num_threads()} threads; {a.iterations} iterations, score every {a.every}", flush=True)
    rows = []
    for label, settings, fan_in in RUNS:
        inputs = dict(host.widget_defaults(TrainConceptErasure), iterations=a.iterations, score_every=a.every,
                      resolution=a.resolution, sampling_steps=a.sampling_steps, concept_label="concept", **settings)
        started = time.time()
        with torch.inference_mode(), (alpha_fan_in() if fan_in else contextlib.nullcontext()):
            _, erasure, _ = TrainConceptErasure().train(model, concept, uncond, **inputs)
        st = erasure.settings
        rows.append(dict(label=label, scores=st["concept_scores"], rate=st["learning_rate_used"],
                         raises=st["learning_rate_raises"], seconds=round(time.time() - started)))
        print(f"{label}: rate {st['learning_rate_used']:.1e}, scores {st['concept_scores']}", flush=True)
        if a.json:
            a.json.write_text(json.dumps(rows, indent=1))
    every = [i for i, _ in rows[0]["scores"] if i % a.every == 0]
    print("\n| run | rate used | " + " | ".join(f"score @{i}" for i in every) + " | vs ESD @" + str(every[-1]) + " |")
    print("|---|---|" + "---|" * (len(every) + 1))
    reference = dict(rows[0]["scores"])[every[-1]]
    for row in rows:
        scores = dict(row["scores"])
        print(f"| {row['label']} | {row['rate']:.1e} | " + " | ".join(f"{scores[i]:.3f}" for i in every)
              + f" | {scores[every[-1]] / reference:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
