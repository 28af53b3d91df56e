"""Erasures that touch many kinds of UNet layers, and the host's own LoRA loader, for the LoRA export/import tests."""
import torch

from comfyui_concept_erasure.erasure import ConceptErasure, LowRankDelta
from comfyui_concept_erasure.erasure.unet_names import model_unet_names
from host_nodes import host_nodes
from tiny_models import CONTEXT_DIM, extra_conds, predict

ATTN2 = ("attn2.to_q.weight", "attn2.to_k.weight", "attn2.to_v.weight", "attn2.to_out.0.weight")


def patchable_keys(model):
    names = model_unet_names(model)
    return {k: names.shapes[k] for k, p in sorted(names.patchable.items()) if p}


def every_layer_erasure(family, model, seed=0, dtype=torch.float32, full="low_rank", rank=2, alpha=1.5):
    """Deltas on two of every three linear/conv weights of the UNet (attn2, attn1, ff, proj, resnet convs, time
    embedding, up/down-samplers, conv_in/out): low-rank ones (rank, alpha) and full ones alternating.

    full="low_rank": full deltas that are products of two rank-`rank` matrices (exactly representable as LoRA
    factors); full="random": full-rank random deltas.
    """
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    for i, (key, shape) in enumerate(patchable_keys(model).items()):
        inner = int(torch.tensor(shape[1:]).prod())
        if i % 3 == 0:
            deltas[key] = LowRankDelta((torch.randn(shape[0], rank, generator=g) * 0.05).to(dtype),
                                       (torch.randn(rank, *shape[1:], generator=g) * 0.05).to(dtype), alpha)
        elif i % 3 == 1:
            if full == "low_rank":
                delta = torch.randn(shape[0], rank, generator=g) @ torch.randn(rank, inner, generator=g) * 0.01
            else:
                delta = torch.randn(shape[0], inner, generator=g) * 0.01
            deltas[key] = delta.reshape(shape).to(dtype)
    return ConceptErasure(context_dim=CONTEXT_DIM[family], deltas=deltas, concepts=["a cat"], method="esd_u",
                          settings={"iterations": 3}, base_model=type(model.model.model_config).__name__)


def attn2_erasure(family, model, seed=0, prompt_at_inference=False, method="lp"):
    """An lp-style erasure: prompt tokens plus full and low-rank deltas on every attn2 projection."""
    g = torch.Generator().manual_seed(seed)
    dim = CONTEXT_DIM[family]
    deltas = {}
    for i, (key, shape) in enumerate(k for k in patchable_keys(model).items() if k[0].endswith(ATTN2)):
        if i % 2:
            deltas[key] = LowRankDelta(torch.randn(shape[0], 4, generator=g) * 0.05,
                                       torch.randn(4, shape[1], generator=g) * 0.05, 4.0)
        else:
            deltas[key] = torch.randn(shape, generator=g) * 0.02
    return ConceptErasure(context_dim=dim, prompt_k=torch.randn(3, dim, generator=g),
                          prompt_v=torch.randn(3, dim, generator=g), deltas=deltas,
                          prompt_at_inference=prompt_at_inference, concepts=["Van Gogh"], method=method)


def host_lora_loader():
    """ComfyUI's own LoraLoaderModelOnly node class (top-level `nodes` upstream, comfy.nodes in the fork)."""
    return host_nodes().LoraLoaderModelOnly


def load_with_host(model, lora_name, strength=1.0):
    with torch.inference_mode():
        return host_lora_loader()().load_lora_model_only(model, lora_name, strength)[0]


def prediction_inputs(family, seed=1, batch=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 16, 16, generator=g)
    context = torch.randn(batch, 5, CONTEXT_DIM[family], generator=g)
    return x, context, extra_conds(family, batch)


def noise_prediction(model, family, seed=1):
    """The model's raw UNet output (eps, or v for SD2-v) at sigma 1, with its patches in effect."""
    x, context, extra = prediction_inputs(family, seed)
    denoised = predict(model, x, 1.0, context, **extra)
    return x - denoised  # at sigma 1 for EPS models: eps; a fixed linear map of the output for v models
