#!/usr/bin/env bash
# One-command demo: installs ComfyUI and the pack into .venv, generates a small SD1.5-format checkpoint, starts
# the real ComfyUI server in .demo/, runs workflows/train_concept_erasure.json and then
# workflows/compare_before_after.json, prints where the erasure file and the images are, and stops the server.
# CPU only, a few minutes. Options go to scripts/demo.py (./demo.sh --help).
set -euo pipefail
cd "$(dirname "$0")"
INSTALL_BROWSER=0 scripts/install_host.sh
exec .venv/bin/python scripts/demo.py "$@"
