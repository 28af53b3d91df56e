"""The learning rate on an SD1.5-sized UNet: does the trainer's default move the concept as fast as ESD's recipe?

ESD's 1e-5 is its rate for full attn2 deltas on SD1.5's 860 M-parameter UNet; the node's default is the same 1e-5
for rank-32 factors scaled by fan_in / rank (factor_alpha fan_in), with min_score_rise raising the rate where the
concept score barely moves (trainer/learning_rate.py). Here, on the SD1.5 UNet with random weights (torch's
default init) and random CLIP-sized contexts (77 x 768, RMS 1), each run is Train Concept Erasure's own function,
and the trainer's held-out concept score (0 = unchanged, 1 = ESD's target; the Concept Erasure Report's 'toward
ESD target') is measured every --every iterations:

  esd_x, full deltas, 1e-5, fixed    ESD's recipe, the reference
  lp, rank 32, alpha rank            factors scaled by 1 (kohya alpha = rank), the default before
  lp, rank 32, alpha fan_in          factors scaled by fan_in / rank (auto without adversarial_steps), so that a step
                                     on them changes a layer's output about as much as one on a full delta at the same
                                     rate
  ..., min_score_rise 0.2            the rate raised while the score rises less than 0.2 per 100 its
  lp, rank 32, alpha rank, min_score_rise 0.5   what factor_alpha auto trains with adversarial_steps (the
                                     robust-training recipe, without the attack) at the default min_score_rise

  .venv/bin/python benchmarks/rate_across_sizes.py                  # CPU: 16x16 latents, 40 iterations
  .venv/bin/python benchmarks/rate_across_sizes.py --gpu --resolution 512 --iterations 100 --every 10
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_host as host  # noqa: E402

RUNS = [
    ("esd_x, full deltas, 1e-5 (ESD)", dict(method="esd_x", rank=0, learning_rate=1e-5, min_score_rise=0.0,
                                           factor_alpha="rank")),
    ("lp, rank 32, alpha rank, 1e-5", dict(method="lp", factor_alpha="rank", min_score_rise=0.0)),
    ("lp, rank 32, alpha rank, min_score_rise 0.2", dict(method="lp", factor_alpha="rank", min_score_rise=0.2)),
    ("lp, rank 32, alpha fan_in, 1e-5", dict(method="lp", factor_alpha="fan_in", min_score_rise=0.0)),
    ("lp, rank 32, alpha fan_in, min_score_rise 0.2", dict(method="lp", factor_alpha="fan_in", min_score_rise=0.2)),
    ("lp, rank 32, alpha rank, min_score_rise 0.5", dict(method="lp", factor_alpha="rank", min_score_rise=0.5)),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=40)
    p.add_argument("--every", type=int, default=5, help="score_every")
    p.add_argument("--resolution", type=int, default=128, help="training image size (128: 16x16 latents)")
    p.add_argument("--sampling-steps", type=int, default=20)
    p.add_argument("--gpu", action="store_true", help="fp16 weights on CUDA")
    p.add_argument("--json", type=Path)
    p.add_argument("--threads", type=int, default=host.threads_from_env(2))
    p.add_argument("--only", default="", help="comma-separated words: the runs whose label holds one (ESD always)")
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
    runs = [r for i, r in enumerate(RUNS) if i == 0 or not a.only or any(w in r[0] for w in a.only.split(","))]
    for label, settings in runs:
        inputs = dict(host.widget_defaults(TrainConceptErasure), iterations=a.iterations, score_every=a.every,
                      resolution=a.resolution, sampling_steps=a.sampling_steps, concept_label="concept", **settings)
        started = time.time()
        with torch.inference_mode():
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
