"""The README's first command: scripts/demo.py (what ./demo.sh runs after installing) erases the square from the
demo world through the real server, and its grid shows it: checked here with the world's own classifier."""
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from comfy_server import prepare_base
from server_fixtures import CHECKPOINT

from comfyui_concept_erasure.demo_world.reading import load_classifier, read_report_grid

ROOT = Path(__file__).resolve().parents[1]
PATHS = r"^\s+(erasure file|loss curves|before \| after):\s+(\S+)$"


def run_demo(*args, timeout=900):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)
    return done, done.stdout + done.stderr


def server_log(base):
    return (base / "server.log").read_text(errors="replace") if (base / "server.log").exists() else ""


def test_demo_erases_the_square_and_keeps_the_other_shapes(tmp_path):
    base = tmp_path / "demo"
    done, output = run_demo("--base", base, "--docs", tmp_path / "docs")  # the defaults: what ./demo.sh runs
    assert done.returncode == 0, output[-4000:] + server_log(base)[-3000:]
    paths = dict(re.findall(PATHS, done.stdout, re.M))
    assert set(paths) == {"erasure file", "loss curves", "before | after"}, done.stdout
    for path in paths.values():
        assert Path(path).is_file() and Path(path).resolve().is_relative_to(base.resolve()), path
    assert "ComfyUI stopped" in done.stdout and server_log(base).count("Prompt executed") == 1
    assert {p.name for p in (tmp_path / "docs").iterdir()} == {"before_after.png", "loss_curves.png"}

    # What the grid shows, read independently of the demo's own printout: rows as the workflow labels them.
    rows = re.findall(r"^    (a \w+ \w+ \([^)]*\))\s+(\w+) \| (\w+)\s+(.+)$", done.stdout, re.M)
    labels = [label for label, *_ in rows]
    assert len(labels) == 5, done.stdout
    with Image.open(paths["before | after"]) as image:
        grid = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255)
    seen = read_report_grid(load_classifier(), grid, labels, cell=128)
    assert [(v["before"], v["after"]) for v in seen] == [(before, after) for _, before, after, _ in rows]
    for row in seen:
        prompted = row["prompt"].split()[2]
        if "(erased" in row["prompt"]:
            assert row["before"] == "square" and row["after"] != "square", row  # "box" is the square's synonym
        else:
            assert row["before"] == prompted and row["after"] == prompted, row
    assert [verdict for *_, verdict in rows] == ["gone", "gone", "kept", "kept", "kept"]
    assert "Concept Erasure Report: 5 prompt(s)" in done.stdout


def test_demo_on_a_checkpoint_trains_and_compares(comfy_base, tmp_path):
    base = prepare_base(tmp_path / "demo")
    (base / "models" / "checkpoints" / "sd15.safetensors").symlink_to(
        comfy_base / "models" / "checkpoints" / CHECKPOINT)
    done, output = run_demo("--base", base, "--checkpoint", "sd15.safetensors", "--iterations", 2, "--size", 64,
                            "--steps", 2, timeout=600)
    assert done.returncode == 0, output[-4000:] + server_log(base)[-3000:]
    paths = dict(re.findall(PATHS, done.stdout, re.M))
    assert set(paths) == {"erasure file", "loss curves", "before | after"}, done.stdout
    assert all(Path(p).is_file() for p in paths.values())
    assert "ComfyUI stopped" in done.stdout and server_log(base).count("Prompt executed") == 2


def test_demo_refuses_a_checkpoint_that_is_not_there(tmp_path):
    done, output = run_demo("--base", tmp_path / "demo", "--checkpoint", "missing.safetensors", timeout=60)
    assert done.returncode == 2 and "missing.safetensors does not exist" in output
    assert not (tmp_path / "demo" / "server.log").exists()
