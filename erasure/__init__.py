"""Core of the pack: the erasure object, how it patches a ComfyUI model, and its file format.

Nothing in this package knows about nodes; nodes/ and trainer/ build on it.
"""
from .concept_erasure import (
    PLACEMENTS,
    ConceptErasure,
    ErasureError,
    LowRankDelta,
    PromptPatch,
    apply_erasure,
    check_compatible,
    model_context_dim,
)
from .file_format import load_erasure, write_erasure_file
from .folders import erasure_folder_paths, list_erasures, register_folder, resolve_erasure, save_erasure
from .version import PACK_VERSION

__all__ = [
    "PLACEMENTS", "ConceptErasure", "ErasureError", "LowRankDelta", "PromptPatch", "apply_erasure",
    "check_compatible", "model_context_dim", "load_erasure", "write_erasure_file", "save_erasure",
    "erasure_folder_paths", "list_erasures", "register_folder", "resolve_erasure", "PACK_VERSION",
]
