"""Where erasure files live: ComfyUI's models/concept_erasure folder (plus any paths users add for it); erasures
exported as LoRA go to models/loras, where ComfyUI's LoRA loaders list them."""
from __future__ import annotations

import os
import re
import uuid
from typing import Callable, List, Optional

from .concept_erasure import ConceptErasure, ErasureError
from .file_format import load_erasure, write_erasure_file

FOLDER = "concept_erasure"
LORAS = "loras"
EXTENSION = ".safetensors"


def folder_paths():
    """ComfyUI's folder_paths module: top-level upstream (and inside the fork's server), comfy.cmd in the fork."""
    try:
        import folder_paths as fp
    except ImportError:
        from comfy.cmd import folder_paths as fp
    return fp


def default_folder() -> str:
    return os.path.join(folder_paths().models_dir, FOLDER)


def register_folder() -> None:
    """Add models/concept_erasure to ComfyUI's model folders, keeping paths from extra_model_paths.yaml.

    The folder lists .safetensors files only (both hosts register new folders with "every extension").
    """
    fp = folder_paths()
    table = fp.folder_names_and_paths
    if FOLDER not in table or default_folder() not in table[FOLDER][0]:
        fp.add_model_folder_path(FOLDER, default_folder())
    entry = table[FOLDER]
    if set(entry[1]) != {EXTENSION}:
        if hasattr(entry, "supported_extensions"):  # the fork's FolderPathsTuple (its setitem merges extensions)
            entry.supported_extensions = {EXTENSION}
        else:  # upstream: a plain (paths, extensions) tuple
            table[FOLDER] = (entry[0], {EXTENSION})
        _invalidate_listing()


def _invalidate_listing(folder: str = FOLDER) -> None:
    fp = folder_paths()
    if hasattr(fp, "invalidate_cache"):  # the fork
        fp.invalidate_cache(folder)
    cache = getattr(fp, "filename_list_cache", None)  # upstream
    if isinstance(cache, dict):
        cache.pop(folder, None)


def erasure_folder_paths() -> List[str]:
    register_folder()
    return list(folder_paths().folder_names_and_paths[FOLDER][0])


def list_erasures() -> List[str]:
    register_folder()
    return sorted(n for n in folder_paths().get_filename_list(FOLDER) if n.lower().endswith(EXTENSION))


def _check_relative(name: str, what: str, folder: str = FOLDER) -> List[str]:
    cleaned = name.strip().replace("\\", "/")
    parts = [p for p in cleaned.split("/") if p not in ("", ".")]
    if (not parts or cleaned.startswith("/") or re.match(r"^[A-Za-z]:", cleaned) or ".." in parts):
        raise ErasureError(f"{what} {name!r} must be a relative name inside models/{folder} "
                           "(no '..', no absolute path)")
    return parts


def resolve_erasure(name: str) -> str:
    """Full path of an erasure listed in the dropdown; refuses names that escape the folder."""
    _check_relative(name, "erasure name")
    if not name.lower().endswith(EXTENSION):
        raise ErasureError(f"erasure name {name!r}: only {EXTENSION} files are loaded")
    register_folder()
    path = folder_paths().get_full_path(FOLDER, name)
    if path is None:
        raise ErasureError(f"erasure {name!r} not found in {', '.join(erasure_folder_paths())}")
    return path


def load_named_erasure(name: str) -> ConceptErasure:
    return load_erasure(resolve_erasure(name))


def _next_counter(directory: str, stem: str) -> int:
    pattern = re.compile(re.escape(stem) + r"_(\d{5,})_" + re.escape(EXTENSION) + "$")
    numbers = [int(m.group(1)) for f in os.listdir(directory) if (m := pattern.match(f))]
    return max(numbers, default=0) + 1


def _link_without_overwrite(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except FileExistsError:
        raise
    except OSError:  # no hard links on this filesystem: reserve the name, then move the finished file onto it
        os.close(os.open(dst, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        try:
            os.replace(src, dst)
        except BaseException:
            os.remove(dst)  # the empty placeholder
            raise


def save_erasure(erasure: ConceptErasure, filename_prefix: str, precision: Optional[str] = "fp16") -> str:
    """Save as models/concept_erasure/<prefix>_NNNNN_.safetensors; never overwrites, never leaves partial files.

    A leading 'concept_erasure/' in the prefix is accepted (it is where files go anyway). The weight deltas are
    stored in `precision` (fp16 by default: half the size of float32; None keeps their dtype). Returns the path.
    """
    parts = _check_relative(filename_prefix, "filename_prefix")
    if parts[0] == FOLDER and len(parts) > 1:
        parts = parts[1:]
    return _save_new_file(default_folder(), parts, lambda path: write_erasure_file(erasure, path, precision), FOLDER)


def lora_folder() -> str:
    """The first models/loras folder ComfyUI knows (models/loras unless extra_model_paths.yaml made another the
    default): where ComfyUI's LoRA loaders look."""
    paths = folder_paths().get_folder_paths(LORAS)
    if not paths:
        raise ErasureError("ComfyUI has no folder registered for loras")
    return paths[0]


def save_lora(write: Callable[[str], None], filename_prefix: str) -> str:
    """Save as models/loras/<prefix>_NNNNN_.safetensors (subfolders kept: 'concept_erasure/erased' goes to
    models/loras/concept_erasure/); `write(path)` writes the file. Never overwrites. Returns the path."""
    parts = _check_relative(filename_prefix, "filename_prefix", LORAS)
    return _save_new_file(lora_folder(), parts, write, LORAS)


def _save_new_file(root: str, parts: List[str], write: Callable[[str], None], listing: str) -> str:
    """Write root/<parts>_NNNNN_.safetensors through a temporary file linked to the first free number."""
    directory = os.path.join(root, *parts[:-1])
    stem = parts[-1]
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{stem}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        counter = _next_counter(directory, stem)
        while True:
            final = os.path.join(directory, f"{stem}_{counter:05}_{EXTENSION}")
            try:
                _link_without_overwrite(tmp, final)
                _invalidate_listing(listing)
                return final
            except FileExistsError:
                counter += 1
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# Weight files the importer reads: "<folder>/<name>" for the LoRA folder and the erasure folder.
IMPORT_FOLDERS = (LORAS, FOLDER)


def list_weight_files() -> List[str]:
    """Files for 'Concept Erasure from Weights': everything ComfyUI lists in models/loras (pickles too, so that
    choosing one explains how to convert it) and the .safetensors files of models/concept_erasure."""
    register_folder()
    fp = folder_paths()
    return [f"{folder}/{name}" for folder in IMPORT_FOLDERS for name in sorted(fp.get_filename_list(folder))]


def resolve_weight_file(name: str) -> str:
    """Full path of a 'loras/...' or 'concept_erasure/...' entry; refuses names that escape those folders."""
    folder, _, rest = name.replace("\\", "/").partition("/")
    if folder not in IMPORT_FOLDERS or not rest:
        raise ErasureError(f"weights name {name!r} must start with {' or '.join(f'{f}/' for f in IMPORT_FOLDERS)}")
    _check_relative(rest, "weights name", folder)
    register_folder()
    path = folder_paths().get_full_path(folder, rest)
    if path is None:
        raise ErasureError(f"{name!r} not found in {', '.join(folder_paths().get_folder_paths(folder))}")
    return path
