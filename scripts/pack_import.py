"""Import this checkout as a ComfyUI custom-node package (the way ComfyUI loads custom_nodes/), once; and read a
node's widget defaults as a fresh node in ComfyUI has them."""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACK = "comfyui_concept_erasure"


def import_pack():
    if PACK in sys.modules:
        return sys.modules[PACK]
    spec = importlib.util.spec_from_file_location(PACK, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK] = module
    spec.loader.exec_module(module)
    return module


def widget_defaults(node_class) -> dict:
    """The declared default of every input that has one (required and optional)."""
    inputs = node_class.INPUT_TYPES()
    specs = [item for group in ("required", "optional") for item in inputs.get(group, {}).items()]
    return {name: spec[1]["default"] for name, spec in specs
            if len(spec) > 1 and isinstance(spec[1], dict) and "default" in spec[1]}
