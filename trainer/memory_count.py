"""Counting memory by running code on tensors that have shapes but no data.

`shape_only_model` rebuilds a ComfyUI model's UNet from its own config with fake tensors (torch's FakeTensorMode:
every op computes output shapes and dtypes, nothing is allocated or computed), so the trainer's real iteration
code can run on an SDXL-sized model in seconds on any machine. `LiveBytes` watches every op inside it and keeps
the peak of the bytes of tensor storages alive at the same time: what a caching allocator's
max_memory_allocated reports, less its rounding, for the tensors created inside it.
"""
from __future__ import annotations

import itertools
from typing import Dict

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages that ops inside this mode create and that are alive at once.

    Checking every tracked storage for expiry after every op costs (ops x live storages). Most storages die young
    (an op's temporaries), so the youngest `young` are checked after every op and all of them every `sweep` ops:
    between sweeps an older storage that died is still counted, so the peak can only be overstated, by at most what
    died in the last `sweep` ops (young=sweep=1 is exact).
    """

    def __init__(self, young: int = 32, sweep: int = 64):
        super().__init__()
        self._live: Dict[int, tuple] = {}  # storage address -> (weak reference, bytes), oldest first
        self.young = young
        self.sweep = sweep
        self._ops = 0
        self.current = 0
        self.peak = 0

    def _forget_freed(self, keys) -> None:
        freed = [key for key in keys if self._live[key][0].expired()]
        for key in freed:
            self.current -= self._live.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # An output on an input's storage (a view, an in-place op) allocated nothing; the input may even be a
        # weight that existed before counting began.
        inputs = {StorageWeakRef(t.untyped_storage()).cdata for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        self._ops += 1
        if self._ops % self.sweep == 0:
            self._forget_freed(list(self._live))
        else:
            self._forget_freed(list(itertools.islice(reversed(self._live), self.young)))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                ref = StorageWeakRef(storage)
                if ref.cdata not in self._live and ref.cdata not in inputs:
                    self._live[ref.cdata] = (ref, storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


class EveryBlock(dict):
    """A patches_replace table (transformer_options) that holds `fn` for every block key the UNet asks about."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def __contains__(self, key) -> bool:
        return True

    def __getitem__(self, key):
        return self.fn


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
    """An attn1 / attn2 replacement with PyTorch's fused attention (it keeps no attention matrix, as the
    memory-efficient kernels ComfyUI uses on GPUs do): q, k, v projected [batch, tokens, heads * dim]."""
    heads = extra_options["n_heads"]
    batch, tokens, inner = q.shape
    q, k, v = (t.reshape(batch, -1, heads, inner // heads).transpose(1, 2) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(batch, tokens, inner)


def with_sdpa_attention(transformer_options: dict) -> dict:
    """transformer_options in which every attention of the UNet runs sdpa_attention."""
    replace = dict(transformer_options.get("patches_replace", {}))
    replace["attn1"] = replace["attn2"] = EveryBlock(sdpa_attention)
    return dict(transformer_options, patches_replace=replace)


def fake_mode() -> FakeTensorMode:
    # Real tensors that meet fake ones (the model's sigma table, conditioning from other nodes) become fake too.
    return FakeTensorMode(allow_non_fake_inputs=True)


def counting_device(load_device) -> torch.device:
    """Where fake tensors live: the load device when its runtime is present (its kernels decide what is saved for
    backward, e.g. flash attention), else the CPU, whose attention kernels save the same tensors."""
    device = torch.device(load_device)
    if device.type == "cuda" and torch.cuda.is_available():
        return device
    return torch.device("cpu")


def shape_only_model(base_model, dtype: torch.dtype, device, mode: FakeTensorMode):
    """A second instance of `base_model`'s class, built from its model_config, with every parameter and buffer a
    fake tensor on `device` (UNet weights in `dtype`). Shares nothing with `base_model`."""
    model = type(base_model)(base_model.model_config, model_type=base_model.model_type, device="meta")
    unet_modules = set(model.diffusion_model.modules())
    converter = mode.fake_tensor_converter
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in list(table.items()):
                if tensor is None:
                    continue
                meta = tensor.detach().to("meta")
                if module in unet_modules and meta.is_floating_point():
                    meta = meta.to(dtype)
                fake = converter.from_meta_and_device(mode, meta, device)
                table[name] = torch.nn.Parameter(fake, requires_grad=False) if table is module._parameters else fake
    model.diffusion_model.dtype = dtype
    model.manual_cast_dtype = None
    return model


def tensor_bytes(tensors) -> int:
    """Bytes of distinct storages among `tensors` (views of one storage count once)."""
    seen = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[StorageWeakRef(storage).cdata] = storage.nbytes()
    return sum(seen.values())
