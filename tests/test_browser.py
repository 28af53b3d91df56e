"""The workflows in the server's own web UI: headless Chromium loads each file, queues it from the page, waits.

Screenshots of each graph as loaded (<name>.png) and after its run (<name>_ran.png) go to $SCREENSHOT_DIR, or
the test's temporary folder. The README's pictures are refreshed with
    SCREENSHOT_DIR=docs/screenshots .venv/bin/pytest tests/test_browser.py
"""
import os
import time
from pathlib import Path

import pytest

from comfy_browser import (add_connected_node, cancel_from_page, chromium_page, close_dialogs, dialog_text,
                           graph_to_prompt, load_workflow, missing_models_notice, new_frontend, open_app, queue_from_page,
                           screenshot_graph, set_widgets)
from comfy_server import output_images, status_summary
from workflow_cases import (FAST_SETTINGS, NAMES, SETTINGS_NODE, check_images, load, node_types, overrides,
                            with_fast_settings)
from workflow_convert import ui_to_api

SUMMARY_NODES = {"ConceptErasureReport", "AttackConceptErasure"}
pytestmark = pytest.mark.skipif(os.environ.get("SKIP_BROWSER_TESTS") == "1", reason="SKIP_BROWSER_TESTS=1")


@pytest.fixture(scope="module")
def page(comfy_server):
    with chromium_page() as page:
        open_app(page, comfy_server.url)
        yield page
    assert not page.errors, f"JavaScript errors in the page: {page.errors}"


@pytest.fixture(scope="module")
def screenshot_dir(tmp_path_factory):
    folder = os.environ.get("SCREENSHOT_DIR")
    path = Path(folder) if folder else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


def wait_for_new_prompt(server, known, timeout=600):
    """The history entry of the first prompt not in `known`, once it has finished."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = [pid for pid in server.history() if pid not in known]
        if new:
            return server.wait(new[0], timeout=max(1, deadline - time.monotonic()))
        time.sleep(0.5)
    raise AssertionError("the page did not queue a prompt" + server.log_tail())


def add_fast_settings(page, workflow):
    """Connect an Erasure Training Settings node with the tests' fast values to Erase Concept, as a user would."""
    erasers = [n for n in workflow["nodes"] if n["type"] == "EraseConcept"]
    if erasers and not any(i.get("link") is not None for n in erasers for i in n.get("inputs", [])
                           if i["name"] == "settings"):
        added = add_connected_node(page, SETTINGS_NODE, FAST_SETTINGS, "EraseConcept", "settings")
        assert int(added) == workflow["last_node_id"] + 1  # the newest frontend numbers nodes as strings


def without_meta(prompt):
    """The prompt without the node titles the new frontend adds as `_meta` (the server only displays them)."""
    return {key: {k: v for k, v in node.items() if k != "_meta"} for key, node in prompt.items()}


def dismiss_missing_models(page, workflow):
    """The new frontend lists the checkpoint a workflow names (properties.models, as core templates have it) with a
    download button when the server lacks it, as here; close that dialog as a user would. The fork's UI shows none."""
    models = [m for n in workflow["nodes"] for m in n.get("properties", {}).get("models", [])]
    if not models or not new_frontend(page):
        return
    text = missing_models_notice(page) or ""
    for model in models:  # "checkpoints / NAME" in 1.27's dialog; NAME then "checkpoints" in newer panels
        assert model["name"] in text and model["directory"] in text and "Download" in text, text
    close_dialogs(page)


@pytest.mark.parametrize("name", NAMES)
def test_workflow_loads_and_runs_from_the_page(name, page, comfy_server, comfy_base, trained_erasure, exported_lora,
                                               screenshot_dir):
    workflow = load(name)
    missing = load_workflow(page, workflow)
    assert missing == [], f"{name}: node types missing in the UI: {missing}"
    dismiss_missing_models(page, workflow)
    assert dialog_text(page) is None, f"{name}: the UI showed a dialog on load: {dialog_text(page)}"
    screenshot_graph(page, str(screenshot_dir / f"{name}.png"))  # as a user sees the file after dropping it

    changes = overrides(name, trained_erasure[0], exported_lora)
    for trainer in ("TrainConceptErasure", "EraseConcept"):  # the API tests trained with these; the server would
        if trainer in changes:                                 # reuse their outputs
            changes[trainer]["seed"] = 1
    set_widgets(page, changes)
    add_fast_settings(page, workflow)
    # The converter the other tests use gives exactly what the frontend sends.
    info = comfy_server.object_info()
    assert without_meta(graph_to_prompt(page)) == with_fast_settings(ui_to_api(workflow, info, changes), info,
                                                                     workflow["last_node_id"])

    erasures = comfy_base / "models" / "concept_erasure"
    files_before, known = set(erasures.iterdir()), set(comfy_server.history())
    queue_from_page(page)
    entry = wait_for_new_prompt(comfy_server, known)
    assert entry["status"]["status_str"] == "success", f"{name}: {status_summary(entry)}" + comfy_server.log_tail()
    assert dialog_text(page) is None, f"{name}: the UI showed a dialog: {dialog_text(page)}"
    check_images(output_images(entry, comfy_base / "output"), name)
    summarised = node_types(workflow) & SUMMARY_NODES
    if summarised:  # web/summaries.js draws each node's summary on it
        sent = [text for node_id, out in sorted(entry["outputs"].items()) for text in out.get("text", [])]
        shown = page.wait_for_function("""(types) => {
            const nodes = app.graph._nodes.filter(n => types.includes(n.type)).sort((a, b) => a.id - b.id);
            const shown = nodes.map(n => n.conceptErasureSummary);
            return shown.every(Boolean) && shown; }""", arg=sorted(summarised), timeout=10_000).json_value()
        assert sorted(shown) == sorted(sent) and len(sent) == len(summarised), (shown, sent)
    if name == "train_concept_erasure":
        assert len(set(erasures.iterdir()) - files_before) == 1
    page.wait_for_timeout(500)  # let the page draw the images it was sent
    screenshot_graph(page, str(screenshot_dir / f"{name}_ran.png"))


def test_cancel_from_the_queue_stops_training_and_writes_nothing(page, comfy_server, comfy_base):
    workflow = load("train_concept_erasure")
    assert load_workflow(page, workflow) == []
    dismiss_missing_models(page, workflow)
    changes = overrides("train_concept_erasure")
    changes["EraseConcept"].update(iterations=100000, seed=2)  # far longer than the test waits
    set_widgets(page, changes)
    add_fast_settings(page, workflow)
    trainer_id = next(n["id"] for n in workflow["nodes"] if n["type"] == "EraseConcept")

    erasures = comfy_base / "models" / "concept_erasure"
    files_before, known = set(erasures.iterdir()), set(comfy_server.history())
    queue_from_page(page)
    # Training has started once the page shows the trainer running with progress past its first iteration.
    page.wait_for_function("(id) => app.runningNodeId == id && app.progress && app.progress.value >= 1",
                           arg=trainer_id, timeout=300_000)
    cancel_from_page(page)
    entry = wait_for_new_prompt(comfy_server, known, timeout=120)

    assert entry["status"]["status_str"] == "error"
    interrupted = [m for kind, m in entry["status"]["messages"] if kind == "execution_interrupted"]
    assert interrupted and interrupted[0]["node_type"] == "EraseConcept", entry["status"]["messages"]
    assert set(erasures.iterdir()) == files_before, "a cancelled training run left files behind"
    assert dialog_text(page) is None


def test_the_frontend_finds_erase_concepts_help_page(page):
    """Where the frontend's node help looks for a custom node's page (/extensions/<pack folder>/docs/<NodeId>.md,
    from the node's python_module): Erase Concept's page is there, with its text."""
    if not new_frontend(page):
        pytest.skip("the fork's frontend has no node help pages")
    text = page.evaluate("""async () => {
        const info = await (await fetch(app.api.apiURL('/object_info/EraseConcept'))).json();
        const folder = info.EraseConcept.python_module.split('.')[1];
        const res = await fetch(app.api.fileURL(`/extensions/${folder}/docs/EraseConcept.md`));
        return res.ok ? await res.text() : 'HTTP ' + res.status;
    }""")
    page_text = (Path(__file__).resolve().parents[1] / "web" / "docs" / "EraseConcept.md").read_text(encoding="utf-8")
    assert text == page_text
