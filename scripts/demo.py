"""The demo behind ./demo.sh: train an erasure and compare before/after on a real ComfyUI server, on the CPU.

Runs workflows/train_concept_erasure.json, then workflows/compare_before_after.json, through the real server
(started in .demo/, stopped at the end) with settings small enough for a CPU. Without --checkpoint it uses a
generated checkpoint with random weights: everything runs for real, but the pictures are noise. Put a real
SD1.5 checkpoint in .demo/models/checkpoints/ and pass its name with --checkpoint to see a real erasure
(then give it time, or a GPU: training is iterations x a few UNet passes).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from comfy_server import ComfyServer, ServerError, output_images, prepare_base
from workflow_convert import ui_to_api

ROOT = Path(__file__).resolve().parents[1]
TINY = "tiny_sd15_random.safetensors"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=str(ROOT / ".demo"), help="ComfyUI base folder (default .demo/)")
    parser.add_argument("--checkpoint", default=None,
                        help="an SD1.5 checkpoint in BASE/models/checkpoints (default: a generated random one)")
    parser.add_argument("--iterations", type=int, default=20, help="training iterations (default 20)")
    parser.add_argument("--size", type=int, default=128, help="image size in pixels (default 128)")
    parser.add_argument("--steps", type=int, default=10, help="sampling steps of the comparison (default 10)")
    return parser.parse_args(argv)


def load_workflow(name):
    return json.loads((ROOT / "workflows" / f"{name}.json").read_text())


def step(message):
    print(f"[demo] {message}", flush=True)


def main(argv=None) -> int:
    options = parse_args(argv)
    base = prepare_base(Path(options.base).resolve())
    checkpoint = options.checkpoint or TINY
    checkpoint_path = base / "models" / "checkpoints" / checkpoint
    if not checkpoint_path.exists():
        if options.checkpoint:
            step(f"{checkpoint_path} does not exist")
            return 2
        step(f"generating a small SD1.5-format checkpoint with random weights: {checkpoint_path}")
        started = time.monotonic()
        subprocess.run([sys.executable, str(ROOT / "scripts" / "tiny_checkpoint.py"), str(checkpoint_path)],
                       check=True, stdout=subprocess.DEVNULL)
        step(f"checkpoint ready in {time.monotonic() - started:.0f} s")

    common = {"CheckpointLoaderSimple": {"ckpt_name": checkpoint}}
    training = dict(common, TrainConceptErasure={
        "iterations": options.iterations, "sampling_steps": 10, "resolution": max(64, options.size // 2 // 8 * 8)})
    server = ComfyServer(base, threads=os.cpu_count() or 1)
    step(f"starting ComfyUI on {server.url} (log: {server.log_path})")
    try:
        server.start(ready_node="TrainConceptErasure")
        info = server.object_info()

        step(f"running workflows/train_concept_erasure.json ({options.iterations} iterations)")
        started = time.monotonic()
        entry = server.run(ui_to_api(load_workflow("train_concept_erasure"), info, training), timeout=3600)
        erasure = [n for out in entry["outputs"].values() for n in out.get("erasure_files", [])][0]
        erasure_path = base / "models" / "concept_erasure" / erasure
        curves = _keep_previews(entry, base, f"concept_erasure/loss_curves_{Path(erasure).stem}")
        step(f"trained in {time.monotonic() - started:.0f} s")

        step("running workflows/compare_before_after.json (original | erased, same prompts and seed)")
        compare = dict(common, LoadConceptErasure={"erasure_name": erasure}, ConceptErasureReport={
            "width": options.size, "height": options.size, "steps": options.steps})
        entry = server.run(ui_to_api(load_workflow("compare_before_after"), info, compare), timeout=3600)
        images = output_images(entry, base / "output")
    except ServerError as error:
        step(f"failed: {error}")
        return 1
    finally:
        server.stop()
        step("ComfyUI stopped")

    print()
    print(f"  erasure file:      {erasure_path}")
    for path in curves:
        print(f"  loss curves:       {path}")
    for path in images:
        print(f"  before | after:    {path}")
    if not options.checkpoint:
        print("\n  The checkpoint has random weights, so the pictures are noise; see --help for a real model.")
    print(f"  Start ComfyUI on this folder yourself: .venv/bin/comfyui --cpu --cwd {base}")
    return 0


def _keep_previews(entry, base, prefix):
    """Copy the loss-curve preview (a temp file the server deletes on exit) into the output folder."""
    kept = []
    for out in entry["outputs"].values():
        for image in out.get("images", []):
            if image.get("type") != "temp":
                continue
            source = base / "temp" / image.get("subfolder", "") / image["filename"]
            target = base / "output" / f"{prefix}{'_' + str(len(kept)) if kept else ''}.png"
            if source.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)
                kept.append(target)
    return kept


if __name__ == "__main__":
    sys.exit(main())
