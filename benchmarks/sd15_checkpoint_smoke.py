"""An SD1.5-sized checkpoint end to end, as a user starts: load, train, apply, report, save, load back.

Writes a checkpoint in SD1.5's format with random weights (the full 860 M-parameter UNet, CLIP-L and the SD VAE,
fp16, about 2 GB; scripts/tiny_checkpoint.py) unless --checkpoint names one, loads it as Load Checkpoint does
(comfy.sd.load_checkpoint_guess_config: the host picks the device and the dtype), encodes the prompts with its
CLIP, trains with Train Concept Erasure's defaults (--iterations, at --size px), runs Concept Erasure Report
(original | erased) and saves the erasure as the Save node does (fp16), then loads the file back and applies it.
Every node runs under torch.inference_mode(), as ComfyUI runs nodes. Prints each step's time and the device
allocator's peak during it, the dtypes, and the file's size. The weights are random, so the pictures are noise:
this shows that every step runs at the real size on the real loaders, and what it costs.

  .venv/bin/python benchmarks/sd15_checkpoint_smoke.py --iterations 200 --json smoke.json     # on a GPU
  .venv/bin/python benchmarks/sd15_checkpoint_smoke.py --tiny --iterations 2 --size 64 --steps 2   # CPU check
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_host as host  # noqa: E402

CONCEPT = "a photo of a cat"
KEPT = ("a photo of a dog", "a red car")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, help="an SD1.5 checkpoint (default: write one with random weights)")
    p.add_argument("--tiny", action="store_true", help="the written checkpoint's UNet is the smallest SD1.5 one")
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--size", type=int, default=512, help="training resolution and report image size")
    p.add_argument("--steps", type=int, default=20, help="report sampling steps")
    p.add_argument("--out", type=Path, help="folder for the checkpoint, erasure file and grid (default: temporary)")
    p.add_argument("--json", type=Path)
    p.add_argument("--threads", type=int, default=host.threads_from_env(4))
    a = p.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    host.setup(a.threads)
    import torch

    import comfy.model_management
    import comfy.sd
    from comfyui_concept_erasure.erasure.file_format import load_erasure, write_erasure_file
    from comfyui_concept_erasure.nodes.erasure_nodes import ApplyConceptErasure
    from comfyui_concept_erasure.nodes.report_node import ConceptErasureReport
    from comfyui_concept_erasure.nodes.train_node import TrainConceptErasure
    from sd_architectures import SD15_UNET
    from tiny_checkpoint import make_tiny_sd15_checkpoint

    out = a.out or Path(tempfile.mkdtemp(prefix="sd15-smoke-"))
    out.mkdir(parents=True, exist_ok=True)
    device = comfy.model_management.get_torch_device()
    cuda = device.type == "cuda"
    record = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__}

    def step(name, fn):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        with torch.inference_mode():
            result = fn()
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None
        record[name] = {"seconds": round(seconds, 2), "peak_gib": None if peak is None else round(peak, 2)}
        print(f"{name}: {seconds:.1f} s" + (f", device allocator peak {peak:.2f} GiB" if cuda else ""))
        return result

    checkpoint = a.checkpoint
    if checkpoint is None:
        checkpoint = out / "sd15_random_weights.safetensors"
        step("write checkpoint", lambda: make_tiny_sd15_checkpoint(str(checkpoint), None if a.tiny else SD15_UNET))
    record["checkpoint_mb"] = round(checkpoint.stat().st_size / 1e6, 1)

    model, clip, vae = step("load checkpoint", lambda: comfy.sd.load_checkpoint_guess_config(
        str(checkpoint), output_vae=True, output_clip=True, embedding_directory=None)[:3])
    unet_params = sum(t.numel() for t in model.model.diffusion_model.parameters()) / 1e6
    record.update(model=type(model.model.model_config).__name__, unet_m_params=round(unet_params),
                  unet_dtype=str(model.model_dtype()), load_device=str(model.load_device))
    print(f"checkpoint {record['checkpoint_mb']} MB: {record['model']}, UNet {unet_params:.0f} M parameters, "
          f"{record['unet_dtype']} on {record['load_device']}")

    def encode(texts):
        conds = []
        for text in texts:
            cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
            conds.append([cond, {"pooled_output": pooled}])
        return conds

    concept, uncond = step("encode prompts", lambda: (encode([CONCEPT]), encode([""])))
    inputs = dict(host.widget_defaults(TrainConceptErasure), iterations=a.iterations, resolution=a.size,
                  concept_label=CONCEPT)
    erased, erasure, _ = step("train", lambda: TrainConceptErasure().train(model, concept, uncond, **inputs))
    st = erasure.settings
    record["train"].update(per_1000_iterations_s=round(record["train"]["seconds"] / a.iterations * 1000),
                           compute_dtype=st["compute_dtype"], checkpointing=st["gradient_checkpointing_used"],
                           learning_rate_used=st["learning_rate_used"], concept_scores=st["concept_scores"])
    print(f"train: {a.iterations} iterations at {a.size} px, compute dtype {st['compute_dtype']}, gradient "
          f"checkpointing {st['gradient_checkpointing_used']}, rate {st['learning_rate_used']:g}, held-out concept "
          f"scores {st['concept_scores']}")

    prompts = encode([CONCEPT, *KEPT])
    grid, summary = step("report", lambda: ConceptErasureReport().report(
        model, erased, prompts, uncond, vae, 0, a.steps, a.size, a.size, 7.0, "\n".join([CONCEPT, *KEPT]))["result"])
    record["report"].update(grid=list(grid.shape), finite=bool(torch.isfinite(grid).all()), summary=summary)
    print(summary)

    path = out / "erasure.safetensors"
    step("save", lambda: write_erasure_file(erasure, str(path), "fp16"))
    loaded = step("load erasure", lambda: load_erasure(str(path)))
    applied = step("apply loaded", lambda: ApplyConceptErasure().apply(model, loaded, 1.0)[0])
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        dtypes = sorted({str(f.get_slice(k).get_dtype()) for k in f.keys()})
    record["file"] = {"kb": round(path.stat().st_size / 1024, 1), "dtypes": dtypes, "deltas": len(loaded.deltas),
                      "applied_patches": len(applied.patches)}
    print(f"erasure file: {record['file']['kb']} KB, stored as {', '.join(dtypes)}, {len(loaded.deltas)} layer "
          f"deltas; applied to the loaded model as {len(applied.patches)} weight patches")
    if a.json:
        a.json.write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
