#!/usr/bin/env bash
# One-command demo: installs ComfyUI and the pack into .venv, starts the real ComfyUI server in .demo/, runs
# workflows/demo_world_erasure.json (erase "a square" from the pack's demo world, then the before/after grid),
# prints what the world's classifier sees in the grid and where the files are, and stops the server.
# CPU only, about 2 minutes once .venv exists. Options go to scripts/demo.py (./demo.sh --help).
set -euo pipefail
cd "$(dirname "$0")"
INSTALL_BROWSER=0 scripts/install_host.sh
exec .venv/bin/python scripts/demo.py "$@"
