"""The shared workflow files, and how the tests run them cheaply.

The files keep real defaults (512 px, 25 steps, a real SD1.5 checkpoint name, a full training run); the tests
change only these values, the way a user would in the UI: the generated checkpoint, 64 px images, 2 sampling
steps, and a training run of a few iterations.
"""
import json
from pathlib import Path

from PIL import Image

from server_fixtures import CHECKPOINT
from workflow_convert import ui_to_api, with_settings_node

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
NAMES = ("train_concept_erasure", "apply_concept_erasure", "compare_before_after", "recover_with_key", "export_as_lora",
         "demo_world_erasure", "attack_erasure")
SIZE = 64

FAST = {
    "CheckpointLoaderSimple": {"ckpt_name": CHECKPOINT},
    "EmptyLatentImage": {"width": SIZE, "height": SIZE},
    "KSampler": {"steps": 2},
}
FAST_TRAINING = {"iterations": 2, "sampling_steps": 2, "resolution": 64}
# Erase Concept has no widget for these: the tests connect an Erasure Training Settings node, as a user would.
FAST_SETTINGS = {key: FAST_TRAINING[key] for key in ("sampling_steps", "resolution")}
SETTINGS_NODE = "ErasureTrainingSettings"


def load(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text())


def node_types(workflow: dict) -> set:
    return {n["type"] for n in workflow["nodes"]}


def overrides(name: str, erasure_name: str = None, lora_name: str = None, workflow: dict = None) -> dict:
    """{node type: {widget: value}} for running `name` in a test; lora_name is the file the core LoRA loader reads
    (one exported before: the loader's list is checked when the prompt is queued)."""
    changes = {k: dict(v) for k, v in FAST.items()}
    types = node_types(workflow or load(name))
    if "TrainConceptErasure" in types:
        changes["TrainConceptErasure"] = dict(FAST_TRAINING)
    if "EraseConcept" in types:
        changes["EraseConcept"] = {"iterations": FAST_TRAINING["iterations"]}
    if SETTINGS_NODE in types:  # a workflow that has its own (the demo world's)
        changes[SETTINGS_NODE] = dict(FAST_SETTINGS)
    if "LoadConceptErasure" in types:
        changes["LoadConceptErasure"] = {"erasure_name": erasure_name}
    if "LoraLoaderModelOnly" in types:
        changes["LoraLoaderModelOnly"] = {"lora_name": lora_name}
    if "AttackConceptErasure" in types:
        changes["AttackConceptErasure"] = {"iterations": 2, "sampling_steps": 2, "resolution": SIZE}
    if "ConceptErasureReport" in types:
        changes["ConceptErasureReport"] = {"width": SIZE, "height": SIZE, "steps": 2}
    return {k: v for k, v in changes.items() if k in types}


def report_grid(name: str) -> tuple:
    """(width, height) of the report grid a workflow saves: its labels' rows of SIZE px cells (report/)."""
    from comfyui_concept_erasure.report.concept_report import labelled_size

    report = next(n for n in load(name)["nodes"] if n["type"] == "ConceptErasureReport")
    labels = next(v for v in report["widgets_values"] if isinstance(v, str) and "(erased" in v).splitlines()
    height, width = labelled_size(len(labels), SIZE, SIZE, max(1, SIZE // 64), labels)
    return width, height


# What each workflow must save: image sizes (width, height) of its SaveImage outputs. The report's grid is one row
# per prompt (original | erased, a white gap of max(1, width // 64) pixels), with the labels right and below.
EXPECTED_IMAGES = {
    "train_concept_erasure": [],
    "apply_concept_erasure": [(SIZE, SIZE)],
    "compare_before_after": [report_grid("compare_before_after")],
    "recover_with_key": [(SIZE, SIZE), (SIZE, SIZE)],
    "export_as_lora": [(SIZE, SIZE)],
    "demo_world_erasure": [report_grid("demo_world_erasure")],
    "attack_erasure": [(SIZE, SIZE)] * 3,
}


def check_images(paths, name):
    """Each saved image exists, has the expected size and is not a flat colour."""
    sizes = []
    for path in paths:
        assert Path(path).is_file(), f"{name}: the server reported {path}, which does not exist"
        with Image.open(path) as image:
            sizes.append(image.size)
            low, high = zip(*image.convert("RGB").getextrema())
            assert max(high) - min(low) > 10, f"{name}: {path} is a flat image"
    assert sorted(sizes) == sorted(EXPECTED_IMAGES[name]), f"{name}: saved image sizes {sizes}"


def with_fast_settings(prompt: dict, object_info: dict, last_node_id: int) -> dict:
    """An Erasure Training Settings node with FAST_SETTINGS connected to each Erase Concept that has none."""
    return with_settings_node(prompt, object_info, last_node_id, FAST_SETTINGS, SETTINGS_NODE)


def run_workflow(server, name, erasure_name=None, lora_name=None, timeout=600, workflow=None):
    """Convert `name` (or the given UI-format `workflow`) with the test overrides, run it, and return its history
    entry (status success)."""
    workflow = workflow or load(name)
    info = server.object_info()
    prompt = with_fast_settings(ui_to_api(workflow, info, overrides(name, erasure_name, lora_name, workflow)), info,
                                workflow["last_node_id"])
    return server.run(prompt, timeout=timeout)
