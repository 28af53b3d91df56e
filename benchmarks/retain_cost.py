"""What the retain set and its watch cost: a default training with `retain` auto against the same run with it off.

    .venv/bin/python benchmarks/retain_cost.py                    # demo world, seed 0, each run twice, interleaved
    .venv/bin/python benchmarks/retain_cost.py --world large --repeats 1

Two figures per run: the UNet rows it forwarded (a count that does not depend on the machine: every image of every
batch the UNet saw, gradient or not) and its wall clock, as a ratio against the run without the retain set measured
in the same process (node defaults, the world's resolution, one thread).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_host as host  # noqa: E402


def one_run(world, retain: str, seed: int):
    import torch

    from erasure_quality import train

    rows = [0]
    unet = world.model.model.diffusion_model
    handle = unet.register_forward_pre_hook(lambda module, args: rows.__setitem__(0, rows[0] + args[0].shape[0]))
    try:
        started = time.time()
        _, erasure, _, _ = train(world, dict(seed=seed, retain=retain), [world_concept(world)], recipe={})
        seconds = time.time() - started
    finally:
        handle.remove()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return rows[0], seconds, erasure


def world_concept(world) -> str:
    from erasure_worlds import WORLD_CONCEPTS

    return WORLD_CONCEPTS[world.spec.name]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", default="demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=host.threads_from_env())
    opts = parser.parse_args(argv)
    host.setup(opts.threads)
    from comfyui_concept_erasure.demo_world.world import load_world

    world = load_world(host.world_file(opts.world))
    found = {"off": [], "auto": []}
    for _ in range(opts.repeats):
        for retain in ("off", "auto"):
            rows, seconds, erasure = one_run(world, retain, opts.seed)
            found[retain].append((rows, seconds))
            kept = (erasure.settings.get("retain_set") or {}).get("kept", [])
            print(f"retain {retain}: {rows} UNet rows forwarded, {seconds:.1f} s, kept {[t for t, _ in kept]}",
                  flush=True)
    base_rows, auto_rows = found["off"][0][0], found["auto"][0][0]
    base_s = min(s for _, s in found["off"])
    auto_s = min(s for _, s in found["auto"])
    print(f"\n{opts.world}, seed {opts.seed}: UNet rows {auto_rows} / {base_rows} = {auto_rows / base_rows:.2f}x; "
          f"wall clock (best of {opts.repeats}) {auto_s:.1f} / {base_s:.1f} s = {auto_s / base_s:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
