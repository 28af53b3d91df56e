"""The README's front door and the node reference (docs/nodes.md), generated from the nodes so it cannot drift."""
import importlib.util
from pathlib import Path

import tomllib

import comfyui_concept_erasure as pack
from comfyui_concept_erasure.erasure import PACK_VERSION

ROOT = Path(__file__).resolve().parents[1]


def _generator():
    spec = importlib.util.spec_from_file_location("node_reference", ROOT / "scripts" / "node_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_node_reference_is_current():
    gen = _generator()
    text = (ROOT / "docs" / "nodes.md").read_text()
    assert gen.updated_reference(text, gen.render(pack)) == text, \
        "docs/nodes.md is out of date: run .venv/bin/python scripts/node_reference.py"
    for node_id in pack.NODE_CLASS_MAPPINGS:
        assert f"(`{node_id}`)" in text


def test_readme_starts_with_the_two_commands():
    head = (ROOT / "README.md").read_text().splitlines()[:12]
    assert any("./demo.sh" in line for line in head)
    assert any("scripts/install_host.sh && .venv/bin/pytest" in line for line in head)


def test_pyproject_version_matches_the_pack():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["version"] == PACK_VERSION
    assert "torch" not in " ".join(meta["project"]["dependencies"])
    assert "torch" not in (ROOT / "requirements.txt").read_text()
