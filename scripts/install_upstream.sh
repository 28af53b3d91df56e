#!/usr/bin/env bash
# Sets up the second test host: upstream ComfyUI v0.3.64 (Comfy-Org/ComfyUI, commit a125cd84) with the web frontend
# that release pins (comfyui-frontend-package 1.27.10), outside the repo. Prints the host folder on its last line.
#   UPSTREAM_HOME     where it goes (default ~/.cache/comfyui-concept-erasure): comfyui-0.3.64/ and venv-0.3.64/
#   UPSTREAM_TARBALL  the source archive (default: comfyui-0.3.64-*.tar.gz in ../shared/hosts beside this checkout,
#                     or beside the checkout this one was cloned from)
#   NEWEST_FRONTEND=1 also puts the newest comfyui-frontend-package on PyPI into UPSTREAM_HOME/frontend-newest
# Idempotent: a second run only checks.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
HOME_DIR=${UPSTREAM_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/comfyui-concept-erasure}
SRC=$HOME_DIR/comfyui-0.3.64
VENV=$HOME_DIR/venv-0.3.64
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
mkdir -p "$HOME_DIR"

find_tarball() {
  [ -n "${UPSTREAM_TARBALL:-}" ] && { echo "$UPSTREAM_TARBALL"; return; }
  local origin
  origin=$(git -C "$REPO" config --get remote.origin.url 2>/dev/null || true)
  for dir in "$REPO/../shared/hosts" "${origin%/}/../shared/hosts"; do
    for f in "$dir"/comfyui-0.3.64-*.tar.gz; do
      [ -f "$f" ] && { echo "$f"; return; }
    done
  done
}

if [ ! -f "$SRC/main.py" ]; then
  tarball=$(find_tarball)
  if [ -z "$tarball" ]; then
    echo "install_upstream.sh: no upstream ComfyUI source archive (comfyui-0.3.64-*.tar.gz) in ../shared/hosts;" \
         "set UPSTREAM_TARBALL" >&2
    exit 1
  fi
  rm -rf "$SRC.partial" && mkdir -p "$SRC.partial"
  tar -xzf "$tarball" -C "$SRC.partial" --strip-components=1
  mv "$SRC.partial" "$SRC"
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
if ! "$VENV/bin/python" -c "import torch, torchvision" 2>/dev/null; then
  pip install torch==2.14.1 torchvision==0.29.1  # the fork's, so both hosts compute with the same torch
fi
if ! "$VENV/bin/python" -c "import comfyui_frontend_package, av, transformers, requests, playwright, pytest_timeout" \
    2>/dev/null; then
  # torchaudio is left out: no release matches torch 2.14.1, and only upstream's audio nodes import it (they are
  # skipped with a warning). requests: upstream imports it and transformers 5 no longer brings it.
  grep -v -x -E 'torchaudio|torch|torchvision' "$SRC/requirements.txt" > "$HOME_DIR/requirements-0.3.64.txt"
  pip install -r "$HOME_DIR/requirements-0.3.64.txt" requests "pytest>=8" "pytest-timeout>=2.3" "playwright>=1.40"
fi
if [ "${NEWEST_FRONTEND:-0}" = 1 ]; then
  newest=$HOME_DIR/frontend-newest
  pip install --upgrade --no-deps --target "$newest.partial" comfyui-frontend-package
  rm -rf "$newest" && mv "$newest.partial" "$newest"
fi
echo "$SRC"
