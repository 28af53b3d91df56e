#!/usr/bin/env bash
# Creates .venv in the repo root with the ComfyUI host (the PyPI fork comfyui==0.0.1) and the pack's
# test tools (Playwright + Debian's Chromium for the browser tests, unless INSTALL_BROWSER=0).
# Idempotent: a second run only checks. See ../shared/HOST.md for why each package is here.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  # torch belongs to ComfyUI, not to the pack: the host's install step owns it.
  pip install torch==2.14.1 torchvision==0.29.1
fi
if ! .venv/bin/python -c "import comfy" 2>/dev/null; then
  pip install --no-deps comfyui==0.0.1
fi
pip install \
  psutil numpy ConfigArgParse safetensors pillow tqdm scipy torchsde pyyaml einops 'transformers>=4.40,<5' tokenizers \
  aio-pika aiohttp python-dateutil aiofiles can-ada lazy-object-proxy opencv-python-headless 'pyjwt[crypto]' natsort kornia \
  opentelemetry-api opentelemetry-sdk opentelemetry-distro opentelemetry-exporter-otlp-proto-http \
  opentelemetry-propagator-jaeger opentelemetry-instrumentation opentelemetry-util-http \
  opentelemetry-instrumentation-aio-pika opentelemetry-instrumentation-requests opentelemetry-semantic-conventions \
  -r requirements.txt
# diffusers + peft read exported LoRA files in tests/test_lora_diffusers.py; diffusers 0.40+ needs huggingface-hub 1.x,
# which transformers<5 refuses, so the pins travel together.
pip install "pytest>=8" "pytest-timeout>=2.3" "requests>=2.31" "diffusers>=0.35,<0.40" "peft>=0.15" "huggingface-hub<1.0"
# The browser tests (tests/test_browser.py) drive Debian's Chromium through Playwright; Playwright's own browser
# download cannot be used. INSTALL_BROWSER=0 skips both (demo.sh does: it needs no browser).
if [ "${INSTALL_BROWSER:-1}" = 1 ]; then
  pip install "playwright>=1.40"
  if [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      apt-get update -q >/dev/null
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null
    else
      echo "install_host.sh: /usr/bin/chromium is missing; the browser tests need Debian's chromium package" >&2
    fi
  fi
fi
