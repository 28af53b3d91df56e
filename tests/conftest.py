"""Test set-up: the real ComfyUI host on the CPU, and the pack imported the way ComfyUI imports it."""
import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
COMFY_BASE = tempfile.mkdtemp(prefix="comfy-base-")

torch.set_num_threads(int(os.environ.get("TEST_THREADS", "1")))

from comfy.cli_args import args  # noqa: E402

args.cpu = True
args.cwd = COMFY_BASE  # the fork puts models/ under --cwd; keep the checkout clean
args.base_directory = COMFY_BASE  # upstream's name for it (scripts/test_upstream.sh)

import comfy.model_management  # noqa: E402,F401


sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests" / "support"))  # the tests' helpers: tiny models, the server, workflow cases
from pack_import import import_pack  # noqa: E402

import_pack()


@pytest.fixture
def models_dir(tmp_path, monkeypatch):
    """A fresh ComfyUI models/ folder for one test; concept_erasure is registered anew inside it."""
    from comfyui_concept_erasure.erasure.folders import FOLDER, folder_paths

    fp = folder_paths()
    models = tmp_path / "models"
    models.mkdir()
    monkeypatch.setattr(fp, "models_dir", str(models))
    table = getattr(fp.folder_names_and_paths, "contents", fp.folder_names_and_paths)
    monkeypatch.delitem(table, FOLDER, raising=False)
    cache = getattr(fp, "filename_list_cache", None)
    if isinstance(cache, dict):
        monkeypatch.setattr(fp, "filename_list_cache", {})
    return models


@pytest.fixture
def loras_dir(models_dir, monkeypatch):
    """models/loras of the fresh models/ folder, registered as ComfyUI's only loras folder for one test."""
    from comfyui_concept_erasure.erasure.folders import LORAS, folder_paths

    fp = folder_paths()
    loras = models_dir / LORAS
    table = getattr(fp.folder_names_and_paths, "contents", fp.folder_names_and_paths)
    entry = table[LORAS]
    if hasattr(entry, "paths"):  # the fork's FolderPathsTuple
        new = type(entry)(LORAS, [str(loras)], set(entry.supported_extensions))
    else:
        new = ([str(loras)], set(entry[1]))
    monkeypatch.setitem(table, LORAS, new)
    if isinstance(getattr(fp, "_filename_list_cache", None), dict):
        monkeypatch.setattr(fp, "_filename_list_cache", {})
    return loras


# Session fixtures of the end-to-end tests: the generated checkpoint and the real server.
from server_fixtures import (comfy_base, comfy_server, exported_lora, made_erasure, trained_erasure,  # noqa: E402,F401
                             weights_erasure)


@pytest.fixture(scope="session", autouse=True)
def _checkout_off_sys_path():
    """pytest puts a checkout whose folder name is not an identifier (e.g. ci-check) on sys.path when it sets up the
    checkout's __init__.py as a package; the pack's nodes/ would then shadow upstream ComfyUI's top-level `nodes`
    module. The pack is imported by path (pack_import.py), as ComfyUI does, so the checkout is not needed there."""
    sys.path[:] = [p for p in sys.path if p and Path(p).resolve() != ROOT]



# Tests that start the real ComfyUI server or a browser, train a benchmark world or run the whole demo; the rest are
# the unit tests: `.venv/bin/pytest -m "not integration"` runs them alone.
INTEGRATION = {"test_browser", "test_demo", "test_server", "test_workflows", "test_lora_server", "test_benchmark_worlds",
               "test_quality_world", "test_workflow_files"}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in INTEGRATION or "comfy_server" in item.fixturenames:
            item.add_marker(pytest.mark.integration)
