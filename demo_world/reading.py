"""What the world's classifier sees in images ComfyUI made: the demo's before/after verdicts.

Needs only torch and safetensors (no comfy), so scripts/demo.py can read the saved grid after the server stops.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from .classifier import Classifier
from .renderer import SIZE
from .spec import DEMO, WorldSpec
from .vocabulary import DEFAULT, Vocabulary

WORLD_FILE = Path(__file__).resolve().parent / "world.safetensors"


def part(tensors: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    """One component's state dict (fp32) out of the world file's tensors ('unet.', 'text.', 'classifier.')."""
    return {k[len(prefix) + 1:]: v.float() for k, v in tensors.items() if k.startswith(prefix + ".")}


def classifier_from(tensors: Dict[str, torch.Tensor], vocabulary: Vocabulary = DEFAULT) -> Classifier:
    classifier = Classifier(vocabulary)
    classifier.load_state_dict(part(tensors, "classifier"))
    return classifier.eval()


def spec_of(metadata: Dict[str, str]) -> WorldSpec:
    """The spec a world file records; the demo world's file predates specs and records none."""
    return WorldSpec.from_json(metadata["spec"]) if "spec" in metadata else DEMO


def load_classifier(path: Path = WORLD_FILE) -> Classifier:
    """The world file's classifier, with the classes of the world's own vocabulary."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    return classifier_from(load_file(str(path)), spec_of(metadata).vocabulary)


def to_world_size(images: torch.Tensor) -> torch.Tensor:
    """[B, H, W, 3] images whose sides are multiples of 16 (a 128 px decode) -> [B, 16, 16, 3] (block means)."""
    if images.shape[1] % SIZE or images.shape[2] % SIZE:
        raise ValueError(f"images of {images.shape[2]}x{images.shape[1]} px do not tile the world's {SIZE}x{SIZE}")
    pooled = F.avg_pool2d(images.float().permute(0, 3, 1, 2), (images.shape[1] // SIZE, images.shape[2] // SIZE))
    return pooled.permute(0, 2, 3, 1)


def read_images(classifier: Classifier, images: torch.Tensor) -> Tuple[List[str], List[str]]:
    """(objects, colours) the classifier sees, one per image; 'none' where it sees no object."""
    return classifier.read(to_world_size(images))


def report_grid_cells(grid: torch.Tensor, rows: int, cell: int) -> List[torch.Tensor]:
    """Concept Erasure Report's grid [H, W, 3] (rows x original | erased, white gaps, the labels right and below)
    -> per row a [2, cell, cell, 3] batch (original, erased)."""
    gap = max(1, cell // 64)
    expected = (rows * cell + (rows - 1) * gap, 2 * cell + gap)  # the cells, from the top left; labels beyond
    if grid.shape[0] < expected[0] or grid.shape[1] < expected[1]:
        raise ValueError(f"a {rows}-row report grid of {cell} px cells is at least {expected[1]}x{expected[0]} px, "
                         f"this one is {grid.shape[1]}x{grid.shape[0]}")
    out = []
    for r in range(rows):
        y = r * (cell + gap)
        out.append(torch.stack([grid[y:y + cell, c * (cell + gap):c * (cell + gap) + cell] for c in range(2)]))
    return out


def read_report_grid(classifier: Classifier, grid: torch.Tensor, labels: Sequence[str], cell: int) -> List[dict]:
    """Per row: {'prompt', 'before', 'after'} objects the classifier sees in the original's and the erased
    model's image."""
    verdicts = []
    for label, pair in zip(labels, report_grid_cells(grid, len(labels), cell)):
        objects, _ = read_images(classifier, pair)
        verdicts.append({"prompt": label, "before": objects[0], "after": objects[1]})
    return verdicts
