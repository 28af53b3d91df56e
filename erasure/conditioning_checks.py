"""What a CONDITIONING must look like before anything uses it: one prompt per entry, the model's text width. The
trainer, the attack and the report all check their inputs here."""
from __future__ import annotations

from typing import List

import torch

from .concept_erasure import ErasureError, family_name


def check_entries(conditioning, name: str, error=ErasureError) -> None:
    """Each entry of a CONDITIONING must be [tensor [1, tokens, width], dict]: one prompt per entry."""
    for entry in conditioning:
        if (not isinstance(entry, (list, tuple)) or len(entry) < 2 or not torch.is_tensor(entry[0])
                or entry[0].ndim != 3 or not isinstance(entry[1], dict)):
            raise error(f"{name} is not a CONDITIONING: each entry must be [tensor [1, tokens, width], dict]")
        if entry[0].shape[0] != 1:
            raise error(f"{name} holds a batch of {entry[0].shape[0]} encodings in one entry; use one prompt "
                        "per entry (combine several with Conditioning (Combine))")


def conditioning_entries(conditioning, name: str, single: bool = False) -> List[list]:
    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        what = "an empty list" if isinstance(conditioning, (list, tuple)) else type(conditioning).__name__
        raise ErasureError(f"{name} must be a CONDITIONING (from CLIP Text Encode), got {what}")
    check_entries(conditioning, name)
    if single and len(conditioning) != 1:
        raise ErasureError(f"{name} must be a single conditioning (the empty prompt), got {len(conditioning)} entries")
    return list(conditioning)


def check_width(conditioning, name: str, context_dim: int) -> None:
    """Refuse text encodings from another model family, naming both sizes."""
    for entry in conditioning:
        width = int(entry[0].shape[-1])
        if width != context_dim:
            raise ErasureError(
                f"{name} conditioning has width {width} ({family_name(width)} text encoder) but the model's "
                f"cross-attention takes {context_dim} ({family_name(context_dim)}); encode the prompt with the CLIP "
                "of the model you train")
