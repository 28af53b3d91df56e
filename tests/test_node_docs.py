"""Every node explains itself: a one-sentence tooltip (at most 160 characters) on every input and output, and a help
page, web/docs/<NodeId>.md, that ComfyUI's frontend shows, with a current table of the node's inputs."""
import importlib.util
import re
from pathlib import Path

import pytest

import comfyui_concept_erasure as pack

ROOT = Path(__file__).resolve().parents[1]
MAX_TOOLTIP = 160


def _generator():
    spec = importlib.util.spec_from_file_location("help_pages", ROOT / "scripts" / "help_pages.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("node_id", sorted(pack.NODE_CLASS_MAPPINGS))
def test_every_tooltip_is_one_short_sentence(node_id):
    node = pack.NODE_CLASS_MAPPINGS[node_id]
    tips = {name: spec[1].get("tooltip", "") for group in node.INPUT_TYPES().values() for name, spec in group.items()}
    tips.update({f"output {i}": tip for i, tip in enumerate(getattr(node, "OUTPUT_TOOLTIPS", ()))})
    assert len(getattr(node, "OUTPUT_TOOLTIPS", ())) == len(node.RETURN_TYPES)
    for name, tip in tips.items():
        assert tip, f"{node_id}.{name} has no tooltip"
        assert len(tip) <= MAX_TOOLTIP, f"{node_id}.{name}: {len(tip)} characters: {tip}"
        assert not re.search(r"\d%", tip), f"{node_id}.{name} quotes a benchmark figure; it belongs on the help page"


def test_every_node_has_a_current_help_page_under_its_display_name():
    gen = _generator()
    assert pack.WEB_DIRECTORY == "./web"
    assert gen.check_or_write(pack, write=False) == [], "run .venv/bin/python scripts/help_pages.py"
    for node_id, name in pack.NODE_DISPLAY_NAME_MAPPINGS.items():
        text = (ROOT / "web" / "docs" / f"{node_id}.md").read_text(encoding="utf-8")
        assert text.startswith(f"# {name}\n"), node_id
        for inputs in pack.NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES().values():
            for input_name in inputs:
                assert f"`{input_name}`" in text, f"{node_id}.md does not describe {input_name}"


def test_a_stale_help_page_is_found(tmp_path, monkeypatch):
    gen = _generator()
    for page in (ROOT / "web" / "docs").glob("*.md"):
        (tmp_path / page.name).write_text(page.read_text(encoding="utf-8"), encoding="utf-8")
    stale = tmp_path / "EraseConcept.md"
    stale.write_text(stale.read_text(encoding="utf-8").replace("`keep`", "`kept`"), encoding="utf-8")
    (tmp_path / "LoadDemoWorld.md").unlink()
    monkeypatch.setattr(gen, "DOCS", tmp_path)
    monkeypatch.setattr(gen, "ROOT", tmp_path.parent)
    problems = gen.check_or_write(pack, write=False)
    assert sorted(problems) == sorted([f"{tmp_path.name}/EraseConcept.md is out of date",
                                       f"{tmp_path.name}/LoadDemoWorld.md is missing"])
