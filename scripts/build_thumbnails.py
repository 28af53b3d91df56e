"""Thumbnails for the template browser of upstream's frontend, which shows workflows/<name>.jpg next to each
workflow: the screenshot of that workflow after it ran in the web UI (docs/screenshots/<name>_ran.png), the graph
with the output it made, cropped to the canvas. Refresh the screenshots on upstream's frontend first:

    SCREENSHOT_DIR=docs/screenshots bash scripts/test_upstream.sh tests/test_browser.py
    .venv/bin/python scripts/build_thumbnails.py
"""
from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "docs" / "screenshots"
WORKFLOWS = ROOT / "workflows"
CANVAS = (64, 80, 1920, 1080)  # the new frontend at 1920x1080, less its side bar and menu bars (NEW_UI_MARGINS)
WIDTH = 640


def build(names=None) -> list:
    written = []
    for workflow in sorted(WORKFLOWS.glob("*.json")):
        name = workflow.stem
        if names and name not in names:
            continue
        shot = SCREENSHOTS / f"{name}_ran.png"
        if not shot.is_file():
            raise FileNotFoundError(f"{shot} is missing: run the browser tests with SCREENSHOT_DIR=docs/screenshots")
        with Image.open(shot) as image:
            canvas = image.convert("RGB").crop(CANVAS)
        thumb = canvas.resize((WIDTH, round(canvas.height * WIDTH / canvas.width)), Image.LANCZOS)
        path = WORKFLOWS / f"{name}.jpg"
        thumb.save(path, "JPEG", quality=82, optimize=True)
        written.append(path)
    return written


if __name__ == "__main__":
    for p in build(sys.argv[1:]):
        print(p)
