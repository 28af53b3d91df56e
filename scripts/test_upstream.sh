#!/usr/bin/env bash
# Runs the pack's tests on the second host: upstream ComfyUI v0.3.64 with the frontend it pins (1.27.10), set up
# by scripts/install_upstream.sh outside the repo. Unit, server, workflow and browser tests; not
# tests/test_lora_diffusers.py, which checks exported files with diffusers and does not touch the host (diffusers
# and peft pin huggingface-hub below what upstream's transformers 5 needs).
# Extra arguments go to pytest, e.g. scripts/test_upstream.sh -x -k browser
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
SRC=$(bash "$REPO/scripts/install_upstream.sh" | tail -n 1)
VENV=$(dirname "$SRC")/venv-0.3.64
cd "$REPO"
# Upstream's comfy, folder_paths and nodes come from its source folder; tests/conftest.py imports the pack.
PYTHONPATH="$SRC" "$VENV/bin/pytest" -q -p no:randomly --ignore tests/test_lora_diffusers.py "$@"
