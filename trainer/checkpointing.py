"""Gradient checkpointing of the UNet's transformers (SpatialTransformer: norm, projections, attention and
feed-forward of each level) while training: their inner activations are recomputed in backward instead of kept.

A recomputed forward must be the forward that ran: the deltas' on/off state and the transformer_options the UNet
passed (it rewrites "block" and "block_index" in the same dict as it goes) are captured at call time.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.utils.checkpoint

from .deltas import DeltaSet

CHECKPOINTED = ("SpatialTransformer",)


def _checkpointed(original, deltas: DeltaSet):
    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():
            return original(*args, **kwargs)
        args = tuple(dict(a) if isinstance(a, dict) else a for a in args)
        kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
        enabled = deltas.enabled

        def run(*a, **k):
            with deltas.switched(enabled):
                return original(*a, **k)

        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)

    return forward


@contextlib.contextmanager
def checkpointed_transformers(unet: torch.nn.Module, deltas: DeltaSet, enabled: bool = True) -> Iterator[int]:
    """Checkpoint every transformer of the UNet while inside; yields how many were wrapped (0 when not enabled)."""
    wrapped = []
    try:
        if enabled:
            for module in unet.modules():
                if type(module).__name__ in CHECKPOINTED:
                    module.forward = _checkpointed(module.forward, deltas)
                    wrapped.append(module)
        yield len(wrapped)
    finally:
        for module in wrapped:
            del module.forward
