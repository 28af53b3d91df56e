"""What a user sees of the workflow files before running them: room for upstream's source badges, the checkpoint
the missing-models dialog can offer, a thumbnail for the template browser; and the registry metadata."""
import tomllib
from itertools import combinations
from pathlib import Path

import pytest
from PIL import Image

from build_workflows import BADGE_ROOM, CHECKPOINT, TITLE_HEIGHT
from workflow_cases import NAMES, WORKFLOWS, load

ROOT = Path(__file__).resolve().parents[1]


def box(node):
    """The node's area in graph units, title bar included."""
    (x, y), (w, h) = node["pos"], node["size"]
    return x, y - TITLE_HEIGHT, x + w, y + h


@pytest.mark.parametrize("name", NAMES)
def test_every_title_has_room_for_the_source_badge_above_it(name):
    too_close = []
    for a, b in combinations(load(name)["nodes"], 2):
        (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = box(a), box(b)
        if ax0 >= bx1 or bx0 >= ax1:
            continue  # side by side: the badge sits inside the node's own width
        upper, lower = ((a, ay1), (b, by0)) if ay0 <= by0 else ((b, by1), (a, ay0))
        if lower[1] - upper[1] < BADGE_ROOM:
            too_close.append((upper[0]["type"], lower[0]["type"], lower[1] - upper[1]))
    assert not too_close, f"{name}: nodes closer than {BADGE_ROOM} above a title: {too_close}"


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_loaders_name_the_model_to_download(name):
    for node in load(name)["nodes"]:
        if node["type"] != "CheckpointLoaderSimple":
            continue
        (model,) = node["properties"]["models"]
        assert model["name"] == node["widgets_values"][0] == CHECKPOINT
        assert model["directory"] == "checkpoints"
        assert model["url"].startswith("https://huggingface.co/") and CHECKPOINT in model["url"]


def test_every_workflow_has_a_thumbnail_of_its_own():
    workflows = {p.stem for p in WORKFLOWS.glob("*.json")}
    thumbnails = {p.stem for p in WORKFLOWS.glob("*.jpg")}
    assert workflows == set(NAMES), "a workflow file the tests do not run"
    assert thumbnails == workflows, f"missing: {workflows - thumbnails}; left over: {thumbnails - workflows}"
    for name in thumbnails:
        with Image.open(WORKFLOWS / f"{name}.jpg") as image:
            assert image.format == "JPEG" and image.width >= 256 and image.height >= 144, (name, image.size)


def test_pyproject_has_what_the_comfy_registry_asks_for():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    urls, comfy = project["project"]["urls"], project["tool"]["comfy"]
    assert urls["Repository"].startswith("https://github.com/")
    assert (ROOT / project["project"]["license"]["file"]).is_file()
    assert "Operating System :: OS Independent" in project["project"]["classifiers"]
    assert comfy["PublisherId"] and comfy["DisplayName"] and comfy["requires-comfyui"].startswith(">=")
    icon = comfy["Icon"]
    assert icon.startswith(urls["Repository"].replace("https://github.com/", "https://raw.githubusercontent.com/"))
    with Image.open(ROOT / icon.split("/main/", 1)[1]) as image:  # the file the URL serves from the main branch
        assert image.format == "PNG" and image.width == image.height and 100 <= image.width <= 400
    ignored = [line.strip() for line in (ROOT / ".comfyignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    assert {"tests/", "benchmarks/", "docs/screenshots/"} <= set(ignored)
    assert not any(p.startswith(("workflows", "demo_world", "nodes", "trainer", "erasure")) for p in ignored)
