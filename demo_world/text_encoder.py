"""A small text encoder whose output is the CONDITIONING: [batch, 8 tokens, 768] like SD1.x's CLIP output.

Token + position embeddings (one per word of the world's vocabulary), pre-norm transformer layers (one in the demo
world) WIDTH wide unless the world's spec says otherwise, a final norm and a projection to 768 (the cross-attention
context size of the SD1.x family, so the world's UNet is an 'SD1.x' model to the pack).
It is trained jointly with the UNet; synonyms share no parameters, they only share training images.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .vocabulary import CONTEXT_LENGTH, DEFAULT, Vocabulary

CONTEXT_DIM = 768
WIDTH = 64


class TextEncoder(nn.Module):
    def __init__(self, width: int = WIDTH, context_dim: int = CONTEXT_DIM, layers: int = 1,
                 vocabulary: Vocabulary = DEFAULT):
        super().__init__()
        self.vocabulary = vocabulary
        self.token = nn.Embedding(len(vocabulary.words), width)
        self.position = nn.Parameter(torch.zeros(CONTEXT_LENGTH, width))

        def layer():
            return nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=2 * width, dropout=0.0,
                                              batch_first=True, norm_first=True)

        self.layer = layer()
        self.more_layers = nn.ModuleList(layer() for _ in range(layers - 1))  # the demo world's file has none
        self.norm = nn.LayerNorm(width)
        self.project = nn.Linear(width, context_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.layer(self.token(tokens) + self.position)
        for extra in self.more_layers:
            h = extra(h)
        return self.project(self.norm(h))

    def encode(self, captions: Sequence[str]) -> torch.Tensor:
        """[len(captions), CONTEXT_LENGTH, CONTEXT_DIM]; "" is the unconditional (empty) prompt."""
        return self(self.vocabulary.tokenize(captions))

    def conditioning(self, caption: str) -> list:
        """A ComfyUI CONDITIONING for one caption, as CLIPTextEncode would return it."""
        with torch.no_grad():
            return [[self.encode([caption]).detach(), {}]]
