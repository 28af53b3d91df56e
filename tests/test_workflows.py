"""Each shared workflow, converted from UI format to an API prompt, runs on the real server."""
import json
from pathlib import Path

import pytest
from safetensors import safe_open

from comfy_server import output_images
from workflow_cases import FAST_SETTINGS, NAMES, check_images, load, node_types, run_workflow
from workflow_convert import WorkflowError, required_widgets, ui_to_api, widget_layout


DATA = Path(__file__).resolve().parent / "support" / "data"


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return comfy_server.object_info()


@pytest.mark.parametrize("name", NAMES)
def test_workflow_files_are_ui_format_with_a_description(name):
    workflow = load(name)
    assert {"last_node_id", "last_link_id", "nodes", "links", "groups", "version"} <= set(workflow)
    for link in workflow["links"]:
        assert len(link) == 6
    notes = [n for n in workflow["nodes"] if n["type"] == "Note"]
    assert notes and len(notes[0]["widgets_values"][0]) > 100, f"{name} has no note for newcomers"
    assert workflow["extra"]["info"]["title"] and workflow["groups"][0]["title"]
    ckpt = [n for n in workflow["nodes"] if n["type"] == "CheckpointLoaderSimple"]
    world = [n for n in workflow["nodes"] if n["type"] == "LoadDemoWorld"]
    assert len(ckpt) + len(world) == 1, f"{name} should load one model"
    assert not ckpt or ckpt[0]["widgets_values"] == ["v1-5-pruned-emaonly-fp16.safetensors"]


def test_train_workflow_saves_an_erasure_with_metadata_and_a_loss_curve(trained_erasure, comfy_base, object_info):
    name, entry = trained_erasure
    workflow = load("train_concept_erasure")
    assert len(workflow["nodes"]) <= 5  # Load Checkpoint, Erase Concept, Save, the curves' preview and the note
    eraser = next(n for n in workflow["nodes"] if n["type"] == "EraseConcept")
    names = [name for name, _ in widget_layout(object_info["EraseConcept"])]
    concept, keep = (eraser["widgets_values"][names.index(k)] for k in ("concept", "keep"))
    with safe_open(str(comfy_base / "models" / "concept_erasure" / name), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert concept == "Van Gogh" and json.loads(meta["concepts"]) == [concept]
    settings = json.loads(meta["settings"])
    assert meta["method"] and settings["iterations"] == 2
    # the settings node the test connected reached the trainer; what it does not hold kept the defaults
    assert {k: settings[k] for k in FAST_SETTINGS} == FAST_SETTINGS and settings["rank"] == 32
    # the concept typed in keep is held (retain auto builds no set beside a named one)
    assert keep == "Claude Monet" and settings["preserve_prompts"] == 1 and "retain_set" not in settings
    assert settings["preserve_moved"]["labels"] == ["preserve 1"]
    assert meta["context_dim"] == "768"
    assert keys, "the erasure file holds no tensors"
    previews = [img for out in entry["outputs"].values() for img in out.get("images", [])]
    assert previews, "no loss-curve preview was produced"


def test_a_training_workflow_saved_before_erase_concept_runs_as_it_did(comfy_server, comfy_base):
    """Train Concept Erasure (Advanced) keeps its id, inputs and widget order: the training workflow as it was
    shared before Erase Concept (three CLIP Text Encodes, preserve and clip wired, retain add) still runs."""
    workflow = json.loads((DATA / "train_concept_erasure_before_erase_concept.json").read_text())
    assert "TrainConceptErasure" in node_types(workflow) and "EraseConcept" not in node_types(workflow)
    folder = comfy_base / "models" / "concept_erasure"
    before = set(folder.iterdir())
    entry = run_workflow(comfy_server, "train_concept_erasure", workflow=dict(workflow))
    (new,) = set(folder.iterdir()) - before
    with safe_open(str(new), "pt") as f:
        settings = json.loads(f.metadata()["settings"])
    assert settings["iterations"] == 2 and settings["retain"] == "add"
    found = settings["retain_set"]  # clip wired: the nearest concepts of the pack's vocabulary, beside preserve
    assert found["source"] == "the pack's vocabulary" and found["considered"] > 250 and len(found["kept"]) == 8
    assert settings["preserve_prompts"] == 1 + len(found["kept"])
    assert [img for out in entry["outputs"].values() for img in out.get("images", [])]


@pytest.mark.parametrize("name", ["apply_concept_erasure", "compare_before_after", "recover_with_key"])
def test_workflow_runs_with_the_trained_erasure(name, comfy_server, comfy_base, object_info, trained_erasure):
    entry = run_workflow(comfy_server, name, trained_erasure[0])
    check_images(output_images(entry, comfy_base / "output"), name)


def test_attack_workflow_samples_three_columns_and_reports_the_attack(comfy_server, comfy_base, trained_erasure):
    entry = run_workflow(comfy_server, "attack_erasure", trained_erasure[0])
    check_images(output_images(entry, comfy_base / "output"), "attack_erasure")
    summaries = [text for out in entry["outputs"].values() for text in out.get("text", [])]
    assert len(summaries) == 1 and summaries[0].startswith("Attack on the erased concept: 8 adversarial tokens, 2 "
                                                           "iterations")


def test_export_workflow_saves_a_lora_and_samples_through_the_core_lora_loader(comfy_server, comfy_base,
                                                                             trained_erasure, exported_lora):
    loras = comfy_base / "models" / "loras" / "concept_erasure"
    before = set(loras.iterdir())
    entry = run_workflow(comfy_server, "export_as_lora", trained_erasure[0], exported_lora)
    saved = [name for out in entry["outputs"].values() for name in out.get("lora_files", [])]
    assert len(saved) == 1 and saved[0].startswith("concept_erasure/van_gogh_")
    assert {p.name for p in set(loras.iterdir()) - before} == {saved[0].split("/")[-1]}
    listed = comfy_server.object_info("LoraLoaderModelOnly")["LoraLoaderModelOnly"]["input"]["required"]
    assert saved[0] in listed["lora_name"][0]
    check_images(output_images(entry, comfy_base / "output"), "export_as_lora")


def test_demo_workflow_trains_on_the_demo_world_and_reports(comfy_server, comfy_base):
    erasures = comfy_base / "models" / "concept_erasure"
    before = set(erasures.rglob("*.safetensors"))
    entry = run_workflow(comfy_server, "demo_world_erasure")
    saved = [name for out in entry["outputs"].values() for name in out.get("erasure_files", [])]
    assert len(saved) == 1 and saved[0].startswith("demo_square_")
    assert set(erasures.rglob("*.safetensors")) - before == {erasures / saved[0]}
    with safe_open(str(erasures / saved[0]), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["concepts"]) == ["a square"]
    settings = json.loads(meta["settings"])  # the workflow keeps the node's rate: the trainer raises it for the world
    assert {k: settings[k] for k in ("learning_rate", "factor_alpha", "min_score_rise", "output_strength")} == {
        "learning_rate": 1e-5, "factor_alpha": "auto", "min_score_rise": 0.5, "output_strength": 1.0}
    summaries = [text for out in entry["outputs"].values() for text in out.get("text", [])]
    assert len(summaries) == 1 and summaries[0].startswith("Concept Erasure Report: 5 prompt(s)")
    check_images(output_images(entry, comfy_base / "output"), "demo_world_erasure")


def test_converter_refuses_a_missing_node_type(object_info):
    workflow = load("apply_concept_erasure")
    workflow["nodes"][1]["type"] = "NoSuchNode"
    with pytest.raises(WorkflowError, match="NoSuchNode"):
        ui_to_api(workflow, object_info)


def test_a_node_saved_before_its_optional_widgets_existed_gets_their_defaults(object_info):
    """As the frontend loads an old workflow: Train Concept Erasure as saved before adversarial_* (issue 15)."""
    workflow = json.loads((DATA / "train_concept_erasure_before_erase_concept.json").read_text())
    trainer = next(n for n in workflow["nodes"] if n["type"] == "TrainConceptErasure")
    trainer["widgets_values"] = trainer["widgets_values"][:required_widgets(object_info["TrainConceptErasure"])]
    inputs = next(p["inputs"] for p in ui_to_api(workflow, object_info).values()
                  if p["class_type"] == "TrainConceptErasure")
    assert inputs["concept_label"] == "Van Gogh"
    assert {k: v for k, v in inputs.items() if k.startswith("adversarial_")} == {
        "adversarial_steps": 0, "adversarial_every": 5, "adversarial_tokens": 8, "adversarial_learning_rate": 0.01}


def test_converter_refuses_widget_values_that_do_not_fit_the_node(object_info):
    workflow = load("apply_concept_erasure")
    sampler = next(n for n in workflow["nodes"] if n["type"] == "KSampler")
    sampler["widgets_values"] = sampler["widgets_values"][:-1]
    with pytest.raises(WorkflowError, match="KSampler"):
        ui_to_api(workflow, object_info)


@pytest.mark.parametrize("name", ["compare_before_after", "recover_with_key"])
def test_converter_keeps_seed_and_drops_its_control_value(name, object_info):
    prompt = ui_to_api(load(name), object_info)
    seeded = [p["inputs"] for p in prompt.values() if "seed" in p["inputs"]]
    assert seeded and all(s["seed"] == 42 and "control_after_generate" not in s for s in seeded)
    assert node_types(load(name)) - {"Note"} == {p["class_type"] for p in prompt.values()}
