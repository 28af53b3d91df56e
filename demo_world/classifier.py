"""Reads the object (or 'none') and the colour from an image; trained on the renderer's ground truth.

Images larger than 16x16 (a 32x32 world's) are read at 16x16 (block means), so every world's classifier has the
same shape but for its heads, one class per object of the world's vocabulary (and 'none') and one per colour; each
world trains its own on its own renders.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .vocabulary import DEFAULT, Vocabulary

OBJECT_CLASSES = DEFAULT.objects + ("none",)  # the demo world's
READ_SIZE = 16


class Classifier(nn.Module):
    def __init__(self, vocabulary: Vocabulary = DEFAULT):
        super().__init__()
        self.object_classes, self.colours = vocabulary.objects + ("none",), vocabulary.colours
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1, stride=2), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.ReLU(),
            nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU())
        self.object_head = nn.Linear(128, len(self.object_classes))
        self.colour_head = nn.Linear(128, len(self.colours))

    def forward(self, images: torch.Tensor):
        """images [B, H, W, 3] in [0, 1] -> (object logits, colour logits)."""
        x = images.permute(0, 3, 1, 2)
        if x.shape[-1] != READ_SIZE or x.shape[-2] != READ_SIZE:
            x = F.adaptive_avg_pool2d(x, READ_SIZE)
        h = self.features(x * 2 - 1)
        return self.object_head(h), self.colour_head(h)

    @torch.no_grad()
    def read(self, images: torch.Tensor):
        """Predicted object names (the world's objects or 'none') and colour names, one per image."""
        obj, colour = self(images.float())
        return ([self.object_classes[i] for i in obj.argmax(1).tolist()],
                [self.colours[i] for i in colour.argmax(1).tolist()])
