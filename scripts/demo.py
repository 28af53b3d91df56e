"""The demo behind ./demo.sh: erase "a square" from the pack's demo world on a real ComfyUI server, on the CPU.

Runs workflows/demo_world_erasure.json through the real server (started in .demo/, stopped at the end): Load Demo
World (a tiny model that draws coloured shapes, shipped with the pack) -> Train Concept Erasure on "a square" with
the trainer's defaults (resolution 128 for the tiny model) -> Concept Erasure Report, the
original and the erased model side by side. Then the world's own classifier reads every image of that grid and
the demo prints what it sees, with the report's scores.

With --checkpoint NAME (an SD1.5 checkpoint in BASE/models/checkpoints) it runs train_concept_erasure.json and
compare_before_after.json on that model instead (give it time, or a GPU).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

from comfy_server import ComfyServer, ServerError, output_images, prepare_base
from workflow_convert import ui_to_api, with_settings_node

ROOT = Path(__file__).resolve().parents[1]
DEMO_WORKFLOW = "demo_world_erasure"
ERASED = "square"  # the object the demo workflow erases ("a square")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=str(ROOT / ".demo"), help="ComfyUI base folder (default .demo/)")
    parser.add_argument("--checkpoint", default=None,
                        help="an SD1.5 checkpoint in BASE/models/checkpoints: train on it instead of the demo world")
    parser.add_argument("--iterations", type=int, default=None,
                        help="training iterations (default: the workflow's, 1000 on the demo world; 20 with "
                             "--checkpoint, enough to see it run on a CPU)")
    parser.add_argument("--docs", type=Path, default=None,
                        help="also copy the grid and the loss curves here as before_after.png and loss_curves.png "
                             "(the README's pictures: --docs docs/demo)")
    parser.add_argument("--size", type=int, default=128, help="--checkpoint only: image size in pixels (default 128)")
    parser.add_argument("--steps", type=int, default=10, help="--checkpoint only: sampling steps (default 10)")
    return parser.parse_args(argv)


def load_workflow(name):
    return json.loads((ROOT / "workflows" / f"{name}.json").read_text())


def step(message):
    print(f"[demo] {message}", flush=True)


def main(argv=None) -> int:
    options = parse_args(argv)
    started = time.monotonic()
    base = prepare_base(Path(options.base).resolve())
    if options.checkpoint and not (base / "models" / "checkpoints" / options.checkpoint).is_file():
        step(f"{base / 'models' / 'checkpoints' / options.checkpoint} does not exist: put an SD1.5 checkpoint there")
        return 2
    server = ComfyServer(base, threads=os.cpu_count() or 1)
    step(f"starting ComfyUI on {server.url} (log: {server.log_path})")
    try:
        server.start(ready_node="TrainConceptErasure")
        if options.checkpoint:
            shown = run_checkpoint(server, base, options)
        else:
            shown = run_demo_world(server, base, options)
    except ServerError as error:
        step(f"failed: {error}")
        return 1
    finally:
        server.stop()
        step("ComfyUI stopped")

    print()
    for label, path in shown["files"]:
        print(f"  {label + ':':<19}{path}")
    for line in shown.get("lines", []):
        print(line)
    if options.docs:
        options.docs.mkdir(parents=True, exist_ok=True)
        for label, name in (("before | after", "before_after.png"), ("loss curves", "loss_curves.png")):
            source = next((p for lab, p in shown["files"] if lab == label), None)
            if source:
                shutil.copyfile(source, options.docs / name)
        step(f"copied the grid and the loss curves to {options.docs}")
    print(f"\n  Demo took {time.monotonic() - started:.0f} s. Open the same graph in ComfyUI: "
          f".venv/bin/comfyui --cpu --cwd {base}, then load workflows/"
          f"{'train_concept_erasure' if options.checkpoint else DEMO_WORKFLOW}.json")
    return 0


def run_demo_world(server, base, options) -> dict:
    changes = {"EraseConcept": {"iterations": options.iterations}} if options.iterations else {}
    prompt = ui_to_api(load_workflow(DEMO_WORKFLOW), server.object_info(), changes)
    inputs = {node["class_type"]: node["inputs"] for node in prompt.values()}
    step(f"running workflows/{DEMO_WORKFLOW}.json: train an erasure of 'a {ERASED}' "
         f"({inputs['EraseConcept']['iterations']} iterations), then the original and the erased model "
         "side by side")
    entry = server.run(prompt, timeout=3600)
    grid = output_images(entry, base / "output")[0]
    summary = next(out["text"][0] for out in entry["outputs"].values() if out.get("text"))

    report = inputs["ConceptErasureReport"]
    verdicts = read_grid(grid, report["labels"].splitlines(), report["width"])
    lines = ["", "  What the demo world's classifier sees in the grid (same seed; original | erased):"]
    width = max(len(v["prompt"]) for v in verdicts)
    for v in verdicts:
        lines.append(f"    {v['prompt']:<{width}}  {v['before']:>8} | {v['after']:<8}  {verdict(v)}")
    lines += ["", "  " + summary.split("\n\n")[0].replace("\n", "\n  ")]
    return {"files": trained_files(entry, base)[1] + [("before | after", grid)], "lines": lines}


def verdict(row: dict) -> str:
    """Rows labelled '(erased...)' should lose the square; the others should keep what the original drew."""
    if "(erased" in row["prompt"]:
        if row["before"] != ERASED:
            return "(the original drew no square here)"
        return "STILL THERE" if row["after"] == ERASED else "gone"
    return "kept" if row["after"] == row["before"] else "CHANGED"


def read_grid(grid_path, labels, cell):
    """The world's classifier on each cell of the report grid (no comfy import: the server has stopped)."""
    import numpy as np
    import torch
    from PIL import Image

    if "demo_world" not in sys.modules:
        spec = importlib.util.spec_from_file_location("demo_world", ROOT / "demo_world" / "__init__.py",
                                                      submodule_search_locations=[str(ROOT / "demo_world")])
        module = importlib.util.module_from_spec(spec)
        sys.modules["demo_world"] = module
        spec.loader.exec_module(module)
    reading = importlib.import_module("demo_world.reading")
    with Image.open(grid_path) as image:
        pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)
    return reading.read_report_grid(reading.load_classifier(), pixels, labels, cell)


def run_checkpoint(server, base, options) -> dict:
    info = server.object_info()
    common = {"CheckpointLoaderSimple": {"ckpt_name": options.checkpoint}}
    iterations = options.iterations or 20
    workflow = load_workflow("train_concept_erasure")
    fast = {"sampling_steps": 10, "resolution": max(64, options.size // 2 // 8 * 8)}  # an Erasure Training Settings
    prompt = with_settings_node(ui_to_api(workflow, info, dict(common, EraseConcept={"iterations": iterations})),
                                info, workflow["last_node_id"], fast)
    step(f"running workflows/train_concept_erasure.json on {options.checkpoint} ({iterations} iterations; "
         f"sampling_steps and resolution on an Erasure Training Settings node)")
    entry = server.run(prompt, timeout=3600)
    erasure, files = trained_files(entry, base)

    step("running workflows/compare_before_after.json (original | erased, same prompts and seed)")
    compare = dict(common, LoadConceptErasure={"erasure_name": erasure}, ConceptErasureReport={
        "width": options.size, "height": options.size, "steps": options.steps})
    entry = server.run(ui_to_api(load_workflow("compare_before_after"), info, compare), timeout=3600)
    files += [("before | after", path) for path in output_images(entry, base / "output")]
    return {"files": files}


def trained_files(entry, base):
    """A finished training prompt's erasure name, and (label, path) of its erasure file, then its loss curves."""
    erasure = [n for out in entry["outputs"].values() for n in out.get("erasure_files", [])][0]
    curves = _keep_previews(entry, base, f"concept_erasure/loss_curves_{Path(erasure).stem}")
    return erasure, [("erasure file", base / "models" / "concept_erasure" / erasure)] + [
        ("loss curves", path) for path in curves]


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
