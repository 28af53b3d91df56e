"""Session fixtures for the end-to-end tests: one ComfyUI base folder, one generated checkpoint, one server.

The checkpoint (UNet + CLIP-L + SD VAE, random fp16 weights, ~0.5 GB) is generated once per session into a
temporary base folder and deleted with it; the server is the real host this Python imports (the PyPI fork, or
upstream ComfyUI: scripts/test_upstream.sh), started with the pack linked into BASE/custom_nodes and stopped at the
end of the session even when tests fail. COMFY_FRONT_END_ROOT serves another web frontend (upstream only:
scripts/check_newest_frontend.sh).
"""
import json
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

from comfy_server import ComfyServer, prepare_base  # noqa: E402
from tiny_checkpoint import make_tiny_sd15_checkpoint  # noqa: E402

CHECKPOINT = "tiny_sd15_random.safetensors"
MADE_ERASURE = "made_by_hand.safetensors"
WEIGHTS_ERASURE = "made_by_hand_lp.safetensors"


def checkpoint_attn2_shapes(path):
    """ModelPatcher keys and shapes of a checkpoint's cross-attention weights, read from its header."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return {k[len("model."):]: tuple(v["shape"]) for k, v in header.items()
            if k.startswith("model.diffusion_model.") and ".attn2.to_" in k and k.endswith(".weight")}


@pytest.fixture(scope="session")
def comfy_base():
    base = prepare_base(Path(tempfile.mkdtemp(prefix="comfy-server-base-")))
    make_tiny_sd15_checkpoint(str(base / "models" / "checkpoints" / CHECKPOINT))
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def comfy_server(comfy_base):
    server = ComfyServer(comfy_base, front_end_root=os.environ.get("COMFY_FRONT_END_ROOT") or None)
    server.start(ready_node="LoadConceptErasure")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def made_erasure(comfy_base):
    """Name of an erasure (prompt tokens + attn2 deltas shaped for the checkpoint) in models/concept_erasure."""
    import torch

    from comfyui_concept_erasure.erasure import ConceptErasure, load_erasure, write_erasure_file

    shapes = checkpoint_attn2_shapes(comfy_base / "models" / "checkpoints" / CHECKPOINT)
    assert len(shapes) == 4 * 4  # q, k, v, out in 4 transformer blocks: input 1, middle, output 0 and 1
    g = torch.Generator().manual_seed(0)
    erasure = ConceptErasure(
        context_dim=768, prompt_k=torch.randn(4, 768, generator=g), prompt_v=torch.randn(4, 768, generator=g),
        placement="midout", prompt_at_inference=False, concepts=["cat"], method="lp",
        deltas={k: torch.randn(s, generator=g) * 0.5 for k, s in shapes.items()}, base_model="SD15")
    path = comfy_base / "models" / "concept_erasure" / MADE_ERASURE
    write_erasure_file(erasure, str(path))
    load_erasure(str(path))  # valid before the server sees it
    return MADE_ERASURE


@pytest.fixture(scope="session")
def trained_erasure(comfy_server, comfy_base):
    """The erasure train_concept_erasure.json saves (a few iterations): (file name, history entry)."""
    from workflow_cases import run_workflow

    folder = comfy_base / "models" / "concept_erasure"
    before = {p.name for p in folder.iterdir()}
    entry = run_workflow(comfy_server, "train_concept_erasure")
    saved = [name for out in entry["outputs"].values() for name in out.get("erasure_files", [])]
    assert len(saved) == 1, f"Save Concept Erasure reported {saved}"
    new = {p.name for p in folder.iterdir()} - before
    assert new == {saved[0]}, f"new files in models/concept_erasure: {new}"
    return saved[0], entry


@pytest.fixture(scope="session")
def weights_erasure(comfy_base):
    """Name of an lp erasure (key prompt not used at inference; full and low-rank attn2 deltas shaped for the
    checkpoint) in models/concept_erasure: one that can be a LoRA."""
    import torch

    from comfyui_concept_erasure.erasure import ConceptErasure, LowRankDelta, write_erasure_file

    shapes = checkpoint_attn2_shapes(comfy_base / "models" / "checkpoints" / CHECKPOINT)
    g = torch.Generator().manual_seed(1)
    deltas = {}
    for i, (key, shape) in enumerate(sorted(shapes.items())):
        if i % 2:
            deltas[key] = LowRankDelta(torch.randn(shape[0], 4, generator=g) * 0.3,
                                       torch.randn(4, shape[1], generator=g) * 0.3, 4.0)
        else:
            deltas[key] = torch.randn(shape, generator=g) * 0.3
    erasure = ConceptErasure(context_dim=768, prompt_k=torch.randn(4, 768, generator=g),
                             prompt_v=torch.randn(4, 768, generator=g), prompt_at_inference=False,
                             concepts=["cat"], method="lp", deltas=deltas, base_model="SD15")
    write_erasure_file(erasure, str(comfy_base / "models" / "concept_erasure" / WEIGHTS_ERASURE))
    return WEIGHTS_ERASURE


def export_on_server(server, erasure_name, fmt="exact", prefix="concept_erasure/made"):
    """Run Load Concept Erasure -> Save Concept Erasure as LoRA on the server; returns (LoRA name, ui output)."""
    entry = server.run({
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "load": {"class_type": "LoadConceptErasure", "inputs": {"erasure_name": erasure_name}},
        "export": {"class_type": "SaveConceptErasureAsLoRA", "inputs": {
            "erasure": ["load", 0], "filename_prefix": prefix, "format": fmt, "rank": 8, "model": ["ckpt", 0]}},
    }, timeout=300)
    ui = entry["outputs"]["export"]
    assert len(ui["lora_files"]) == 1, ui
    return ui["lora_files"][0], ui


@pytest.fixture(scope="session")
def exported_lora(comfy_server, weights_erasure):
    """An exact LoRA export of weights_erasure in models/loras, made on the server: the file the core LoRA loader
    of workflows/export_as_lora.json reads in the tests."""
    return export_on_server(comfy_server, weights_erasure)[0]
