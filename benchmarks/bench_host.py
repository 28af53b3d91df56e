"""Start the ComfyUI host for a script (not for tests: tests/conftest.py does this) and import the pack."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from pack_import import import_pack, widget_defaults  # noqa: E402,F401  (widget_defaults: for the benchmarks)


def setup(threads: int = 1):
    """CPU unless a GPU is present, `threads` torch threads, PyTorch attention (comfy's
    --use-pytorch-cross-attention; the fastest kernel at these sizes), a throwaway models folder.
    Returns the pack module, imported as ComfyUI imports custom nodes."""
    import torch

    torch.set_num_threads(threads)
    from comfy.cli_args import args

    if not torch.cuda.is_available():
        args.cpu = True
    args.use_pytorch_cross_attention = True
    if getattr(args, "cwd", None) is None:
        args.cwd = tempfile.mkdtemp(prefix="comfy-base-")  # the fork puts models/ under --cwd
    import comfy.model_management  # noqa: F401  (after args: upstream refuses to start on a CPU otherwise)

    return import_pack()


def world_file(name: str) -> Path:
    """A synthetic world's file by its name in demo_world/spec.py: the demo's, or one of the benchmark's."""
    if name == "demo":
        return REPO / "demo_world" / "world.safetensors"
    return REPO / "benchmarks" / "worlds" / f"{name}.safetensors"


def threads_from_env(default: int = 1) -> int:
    return int(os.environ.get("BENCH_THREADS", default))


def threads_from_argv(argv, default: int = 1) -> int:
    """--threads N from a script's command line (read before argparse: threads are set at import)."""
    if "--threads" in argv[:-1]:
        return int(argv[argv.index("--threads") + 1])
    return threads_from_env(default)
