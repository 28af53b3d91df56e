#!/usr/bin/env bash
# Runs the pack's core tests against upstream ComfyUI (Comfy-Org/ComfyUI) instead of the PyPI fork in .venv.
# Not part of CI. Creates, when missing, a checkout of upstream and a separate venv, both outside the repo:
#   UPSTREAM_COMFY (default /work/upstream-comfy)  a clone of COMFY_MIRROR (default: the local bare mirror)
#   UPSTREAM_VENV  (default /work/upstream-venv)   Python 3.11, torch 2.14.1, upstream's requirements for
#                                                  comfy.model_base / model_patcher / samplers / sd, pytest
# Extra arguments go to pytest, e.g. scripts/test_upstream.sh -x -k folders
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
UPSTREAM=${UPSTREAM_COMFY:-/work/upstream-comfy}
VENV=${UPSTREAM_VENV:-/work/upstream-venv}
MIRROR=${COMFY_MIRROR:-/work/.mirror/Comfy-Org+ComfyUI/repo}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

if [ ! -f "$UPSTREAM/folder_paths.py" ]; then
  git clone -q --no-checkout "$MIRROR" "$UPSTREAM"
  # The mirror lacks some large blobs (e.g. a tokenizer.json none of these tests need): leave them out.
  missing=$(git -C "$UPSTREAM" ls-tree -r HEAD \
    | awk '$2 == "blob" {print $3, $4}' \
    | git -C "$UPSTREAM" cat-file --batch-check='%(objectname) %(objecttype) %(rest)' 2>/dev/null \
    | awk '$2 == "missing" {print $1}' || true)
  if [ -n "$missing" ]; then
    patterns=('/*')
    for sha in $missing; do
      path=$(git -C "$UPSTREAM" ls-tree -r HEAD | awk -v s="$sha" '$3 == s {sub(/^[^\t]*\t/, ""); print; exit}')
      patterns+=("!/$path")
    done
    git -C "$UPSTREAM" sparse-checkout set --no-cone "${patterns[@]}"
  fi
  git -C "$UPSTREAM" checkout -q 2>/dev/null || true  # git still complains about the blobs left out
  [ -f "$UPSTREAM/folder_paths.py" ] || { echo "checkout of upstream ComfyUI into $UPSTREAM failed" >&2; exit 1; }
  echo "upstream ComfyUI $(git -C "$UPSTREAM" log -1 --format='%h %s') at $UPSTREAM"
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
if ! "$VENV/bin/python" -c "import torch, torchvision" 2>/dev/null; then
  pip install torch==2.14.1 torchvision==0.29.1
fi
if ! "$VENV/bin/python" -c "import numpy, einops, transformers, tokenizers, safetensors, yaml, PIL, scipy, tqdm, psutil, torchsde, pytest, pytest_timeout" 2>/dev/null; then
  # What upstream's requirements.txt lists and `import comfy.sd, comfy.samplers` needs; never comfyui==0.0.1 here.
  pip install numpy einops 'transformers>=4.37.2,<5' 'tokenizers>=0.13.3' 'safetensors>=0.4.2' pyyaml Pillow scipy \
    tqdm psutil torchsde "pytest>=8" "pytest-timeout>=2.3"
fi

cd "$REPO"
# Upstream's folder_paths, nodes, comfy come from the checkout; the pack is still imported by tests/conftest.py.
PYTHONPATH="$UPSTREAM" "$VENV/bin/pytest" -q \
  tests/test_concept_erasure.py tests/test_file_format.py tests/test_folders.py tests/test_erasure_nodes.py \
  tests/test_trainer.py tests/test_trainer_parts.py tests/test_trainer_node.py tests/test_trainer_inputs.py \
  tests/test_file_fuzz.py "$@"
