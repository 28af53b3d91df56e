"""The README's first command: scripts/demo.py (what ./demo.sh runs after installing) trains and compares."""
import re
import subprocess
import sys
from pathlib import Path

from comfy_server import prepare_base
from server_fixtures import CHECKPOINT

ROOT = Path(__file__).resolve().parents[1]


def test_demo_trains_compares_prints_paths_and_stops_the_server(comfy_base, tmp_path):
    base = prepare_base(tmp_path / "demo")
    # The session's generated checkpoint, under the name the demo would generate it with.
    (base / "models" / "checkpoints" / "tiny_sd15_random.safetensors").symlink_to(
        comfy_base / "models" / "checkpoints" / CHECKPOINT)
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py"), "--base", str(base),
                           "--iterations", "2", "--size", "64", "--steps", "2"],
                          capture_output=True, text=True, timeout=600)
    log = (base / "server.log").read_text(errors="replace") if (base / "server.log").exists() else ""
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + log[-3000:]
    assert "generating" not in done.stdout  # it used the checkpoint that was there

    paths = dict(re.findall(r"^\s+(erasure file|loss curves|before \| after):\s+(\S+)$", done.stdout, re.M))
    assert set(paths) == {"erasure file", "loss curves", "before | after"}, done.stdout
    for path in paths.values():
        assert Path(path).is_file() and Path(path).resolve().is_relative_to(base.resolve()), path
    assert "ComfyUI stopped" in done.stdout
    assert "Starting server" in log and log.count("Prompt executed") == 2
