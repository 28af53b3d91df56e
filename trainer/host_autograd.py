"""Making a ComfyUI model trainable for a while, and leaving it as it was.

Two host facts (see HOST.md, traps 1 and 2):
- nodes run under torch.inference_mode(), so weights loaded by a node are inference tensors that autograd
  refuses even when frozen; they are swapped, one at a time, for ordinary tensors with the same values;
- some hosts (the PyPI fork) add transformer residuals in place after LayerNorm saved its input, which breaks
  backward. That is detected by one tiny backward through a real block, and only then shimmed with forward
  pre-hooks that hand the norms a copy of their input. The hooks are removed when training ends.
And one choice of the pack: the frozen weights are used in the training's compute dtype (see precision.py), so a
model ComfyUI loaded in another dtype gets a converted copy for the run, and its own tensors back afterwards.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator, List, Optional, Tuple

import torch

from ..erasure.concept_erasure import ErasureError

log = logging.getLogger(__name__)

_NORMS = ("norm_in", "norm1", "norm2", "norm3")


def replace_inference_tensors(module: torch.nn.Module) -> int:
    """Swap inference-mode parameters and buffers for ordinary clones (same values). Call outside inference mode."""
    swapped = 0
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None and param.is_inference():
                sub._parameters[name] = torch.nn.Parameter(param.clone(), requires_grad=False)
                swapped += 1
        for name, buf in list(sub._buffers.items()):
            if buf is not None and buf.is_inference():
                sub._buffers[name] = buf.clone()
                swapped += 1
    return swapped


def _transformer_blocks(unet: torch.nn.Module) -> List[torch.nn.Module]:
    return [m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"]


def residuals_break_backward(unet: torch.nn.Module, transformer_options: Optional[dict] = None) -> bool:
    """True when a backward through one of the host's transformer blocks fails because of in-place residuals."""
    blocks = _transformer_blocks(unet)
    if not blocks:
        return False
    block = blocks[0]
    weight = next(block.parameters())
    dim = block.norm1.normalized_shape[0]
    context_dim = block.attn2.to_k.in_features if getattr(block, "attn2", None) is not None else dim
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, dim, generator=gen).to(weight.device, weight.dtype).requires_grad_(True)
    context = torch.randn(1, 2, context_dim, generator=gen).to(weight.device, weight.dtype)
    try:
        with torch.enable_grad():
            out = block(x * 1.0, context=context, transformer_options=dict(transformer_options or {}))
            out.float().sum().backward()
    except RuntimeError as e:
        if "inplace" in str(e):
            return True
        raise
    return False


def _copy_input(module, args):
    return (args[0].clone(),) + tuple(args[1:])


def install_residual_shim(unet: torch.nn.Module) -> List[torch.utils.hooks.RemovableHandle]:
    handles = []
    for block in _transformer_blocks(unet):
        for name in _NORMS:
            norm = getattr(block, name, None)
            if isinstance(norm, torch.nn.Module):
                handles.append(norm.register_forward_pre_hook(_copy_input))
    return handles


def convert_weights(unet: torch.nn.Module, dtype: Optional[torch.dtype], restore: list) -> None:
    """Swap the UNet's floating-point parameters and buffers that are not in `dtype` for copies in it (made once).

    Appends what to put back to `restore`: (the module's parameter or buffer table, name, original tensor).
    """
    if dtype is None:
        return
    for module in unet.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in list(table.items()):
                if tensor is None or not tensor.is_floating_point() or tensor.dtype == dtype:
                    continue
                copy = tensor.detach().to(dtype)
                table[name] = torch.nn.Parameter(copy, requires_grad=False) if table is module._parameters else copy
                restore.append((table, name, tensor))


@contextlib.contextmanager
def trainable_model(base_model: torch.nn.Module, compute_dtype: Optional[torch.dtype] = None,
                    transformer_options: Optional[dict] = None) -> Iterator[bool]:
    """Inside inference_mode(False): frozen, autograd-ready weights in `compute_dtype` (None: as loaded), with the
    in-place shim when the host needs it.

    Yields whether the shim was installed. Afterwards the hooks are gone, weights converted for the run are the
    original tensors again, the UNet's dtype attributes and requires_grad are as before. transformer_options go to
    the one block the in-place check runs (the memory count's stand-in attention, say).
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError("trainable_model must be entered inside torch.inference_mode(False)")
    flags = {name: p.requires_grad for name, p in base_model.named_parameters()}
    unet = base_model.diffusion_model
    attributes = {"dtype": getattr(unet, "dtype", None), "manual_cast_dtype": getattr(base_model, "manual_cast_dtype",
                                                                                       None)}
    restore: List[Tuple[dict, str, torch.Tensor]] = []
    handles: List[torch.utils.hooks.RemovableHandle] = []
    try:
        convert_weights(unet, compute_dtype, restore)
        replace_inference_tensors(base_model)
        if compute_dtype is not None:
            # apply_model casts its inputs to manual_cast_dtype, or else to the UNet's dtype attribute
            unet.dtype = compute_dtype
            base_model.manual_cast_dtype = None
        base_model.requires_grad_(False)
        if residuals_break_backward(unet, transformer_options):
            handles = install_residual_shim(unet)
            log.info("concept erasure: this ComfyUI adds transformer residuals in place; shimmed %d norms for "
                     "training", len(handles))
            if residuals_break_backward(unet, transformer_options):
                raise ErasureError("this ComfyUI version modifies tensors in place inside its transformer blocks "
                                   "in a way the trainer cannot work around; backward is impossible")
        yield bool(handles)
    finally:
        for handle in handles:
            handle.remove()
        for table, name, original in restore:
            table[name] = original
        if compute_dtype is not None:
            unet.dtype = attributes["dtype"]
            base_model.manual_cast_dtype = attributes["manual_cast_dtype"]
        for name, p in base_model.named_parameters():
            p.requires_grad_(flags.get(name, False))
