#!/usr/bin/env bash
# The Comfy Registry's own checks, offline: `comfy node validate` (comfy-cli reads pyproject.toml and runs its
# security lint) and `comfy node pack` (the archive a publish uploads: git-tracked files minus .comfyignore), whose
# contents are then checked. comfy-cli goes into its own venv beside the upstream host (COMFY_CLI_VENV).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV=${COMFY_CLI_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/comfyui-concept-erasure/venv-comfy-cli}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x "$VENV/bin/comfy" ] || { "$PY" -m venv "$VENV" && "$VENV/bin/python" -m pip -q install comfy-cli; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git -C "$REPO" archive HEAD | tar -x -C "$work"  # the committed tree, as a clone would have it
git -C "$work" init -q && git -C "$work" add -A  # `comfy node pack` zips git-tracked files
cd "$work"
"$VENV/bin/comfy" --skip-prompt node validate
"$VENV/bin/comfy" --skip-prompt node pack
"$VENV/bin/python" - <<'PY'
import zipfile
names = zipfile.ZipFile("node.zip").namelist()
left_out = [n for n in names if n.startswith(("tests/", "benchmarks/", "scripts/", ".ci/", "docs/screenshots/"))]
needed = ["__init__.py", "pyproject.toml", "LICENSE", "nodes/__init__.py", "demo_world/world.safetensors",
          "workflows/demo_world_erasure.json", "workflows/demo_world_erasure.jpg", "docs/icon.png"]
missing = [n for n in needed if n not in names]
assert not left_out and not missing, f"node.zip holds {left_out} and lacks {missing}"
print(f"node.zip: {len(names)} files, no tests, benchmarks, scripts or screenshots")
PY
