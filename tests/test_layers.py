"""The pack's folders import downward only: erasure/ and demo_world/ at the bottom, trainer/ and report/ on them,
nodes/ on top. No folder imports one at its own level or above, so there is no loop between folders."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LEVEL = {"erasure": 0, "demo_world": 0, "trainer": 1, "report": 1, "nodes": 2}


def folder_imports(folder: str) -> set:
    """(file, imported pack folder) for every relative import that leaves `folder`."""
    found = set()
    for path in (ROOT / folder).glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 2:  # from ..X import / from .. import X
                targets = [node.module.split(".")[0]] if node.module else [a.name for a in node.names]
                found.update((path.name, t) for t in targets if t in LEVEL)
    return found


def test_every_folder_imports_only_folders_below_it():
    upward = [(folder, file, target) for folder in LEVEL for file, target in folder_imports(folder)
              if LEVEL[target] >= LEVEL[folder]]
    assert upward == [], f"imports from a folder to one at its level or above: {upward}"


def test_the_check_sees_the_imports_it_judges():
    assert ("erasure_loop.py", "erasure") in folder_imports("trainer")
    assert {target for _, target in folder_imports("nodes")} == {"erasure", "trainer", "report", "demo_world"}
