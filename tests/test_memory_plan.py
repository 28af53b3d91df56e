"""The training memory plan against the CPU allocator, the refusals, gradient checkpointing and the compute dtype,
on tiny real models (the SD1.5 / SD2 / SDXL figures are in benchmarks/train_memory.py)."""
import dataclasses

import pytest
import torch

import comfy.model_management
from comfyui_concept_erasure.erasure.concept_erasure import ErasureError
from comfyui_concept_erasure.trainer import TrainingMemoryError, TrainSettings, train_erasure
from comfyui_concept_erasure.trainer.checkpointing import checkpointed_transformers
from comfyui_concept_erasure.trainer.conditioning import encode_entries
from comfyui_concept_erasure.trainer.denoiser import Denoiser
from comfyui_concept_erasure.trainer.host_autograd import trainable_model
from comfyui_concept_erasure.trainer.iteration import build_trainables, loss_terms
from comfyui_concept_erasure.trainer.precision import compute_dtype
from memory_probe import cpu_allocator_peak
from tiny_models import CONTEXT_DIM, build_model

RUN = dict(iterations=3, sampling_steps=4, learning_rate=1e-3)


def conditioning(family, seed):
    g = torch.Generator().manual_seed(seed)
    options = {"pooled_output": torch.randn(1, 1280, generator=g)} if family == "sdxl" else {}
    return [[torch.randn(1, 77, CONTEXT_DIM[family], generator=g), options]]


def train(model, family="sd15", preserve=None, **settings):
    with torch.inference_mode():  # as in a node
        return train_erasure(model, conditioning(family, 1), conditioning(family, 2), preserve,
                             TrainSettings(**{**RUN, **settings}))


def state(model):
    sd = model.model.state_dict()
    return {k: (v.dtype, v.clone()) for k, v in sd.items()}


def same_state(model, before):
    after = model.model.state_dict()
    return after.keys() == before.keys() and all(
        after[k].dtype == dtype and torch.equal(after[k], v) for k, (dtype, v) in before.items())


@pytest.mark.parametrize("family,method,rank,checkpointing", [
    ("sd15", "lp", 0, "off"), ("sd15", "lp", 8, "on"), ("sd2v", "lp_attached", 0, "on"), ("sdxl", "esd_u", 8, "off")])
def test_plan_matches_what_the_cpu_allocator_hands_out(family, method, rank, checkpointing):
    """The plan counts one iteration on a shape-only model; a real run's allocations peak at the same bytes."""
    model = build_model(family)
    peak, result = cpu_allocator_peak(lambda: train(model, family, method=method, rank=rank, resolution=128,
                                                gradient_checkpointing=checkpointing))
    plan = result.memory
    assert plan.counted == plan.weights + plan.weight_copies + plan.trainable + plan.iteration
    assert plan.checkpointing == (checkpointing == "on") and plan.headroom == 0  # no headroom on the CPU
    # The weights existed before the run; everything else was allocated by it. At these tiny sizes what the count
    # cannot see (the CPU convolutions' own workspaces, small buffers) is a few percent of the total.
    ratio = peak / plan.beyond_weights
    print(f"{family} {method} rank {rank} checkpointing {checkpointing}: measured / counted {ratio:.3f}")
    assert 0.9 < ratio < 1.1, (peak, plan.describe())


def test_plan_counts_the_preserve_prompts_the_training_workflow_connects():
    """With preserve the student runs a third batch row; the plan counts it and still matches the allocator."""
    model = build_model("sd15")
    peak, result = cpu_allocator_peak(lambda: train(model, resolution=128, preserve=conditioning("sd15", 3)))
    plan = result.memory
    ratio = peak / plan.beyond_weights
    print(f"sd15 lp with preserve: measured / counted {ratio:.3f}")
    assert 0.9 < ratio < 1.1, (peak, plan.describe())
    assert plan.iteration > train(model, resolution=128).memory.iteration


def test_checkpointing_and_low_rank_need_less_and_the_plan_says_so():
    model = build_model("sd15")
    plans = {(rank, ckpt): train(model, rank=rank, resolution=128, gradient_checkpointing=ckpt).memory
             for rank in (0, 8) for ckpt in ("off", "on")}
    assert plans[0, "on"].iteration < plans[0, "off"].iteration
    assert plans[8, "on"].iteration < plans[8, "off"].iteration
    assert plans[8, "off"].trainable_params < plans[0, "off"].trainable_params
    for plan in plans.values():
        assert plan.trainable == plan.trainable_params * 12  # fp32 value + two Adam moments


def _limit_free(monkeypatch, free):
    """The trainer sees `free` bytes free on the device. ComfyUI's CPU attention also sizes its chunks by the free
    memory (the two-value form of the call): it keeps seeing the machine's, so that it runs as it did when the
    plans being compared were counted."""
    real = comfy.model_management.get_free_memory

    def get_free_memory(dev=None, torch_free_too=False):
        return real(dev, True) if torch_free_too else free
    monkeypatch.setattr(comfy.model_management, "get_free_memory", get_free_memory)


def test_a_run_that_does_not_fit_is_refused_with_what_would_fit_and_changes_nothing(monkeypatch, models_dir):
    model = build_model("sd15")
    full = train(model, resolution=128, gradient_checkpointing="off").memory
    lean = train(model, resolution=128, gradient_checkpointing="on").memory
    assert lean.beyond_weights < full.beyond_weights
    before, options = state(model), repr(model.model_options)
    _limit_free(monkeypatch, (lean.beyond_weights + full.beyond_weights) // 2)
    with pytest.raises(TrainingMemoryError) as refused:
        train(model, resolution=128, gradient_checkpointing="off")
    message = str(refused.value)
    assert f"{full.total / 2**30:.2f} GiB on cpu" in message and "gradient checkpointing off" in message
    assert "are free on cpu" in message
    assert "What would fit: gradient_checkpointing on (needs" in message and message.endswith("Nothing was changed.")
    assert same_state(model, before) and repr(model.model_options) == options and not model.patches
    assert not any(models_dir.rglob("*.safetensors"))

    # auto takes checkpointing exactly when the plan without it does not fit
    assert train(model, resolution=128, gradient_checkpointing="auto").memory.checkpointing is True
    monkeypatch.undo()
    assert train(model, resolution=128, gradient_checkpointing="auto").memory.checkpointing is False


def test_a_run_larger_than_the_whole_device_is_refused_before_anything_is_loaded(monkeypatch):
    model = build_model("sd15")
    loads = []
    real_load = comfy.model_management.load_models_gpu
    monkeypatch.setattr(comfy.model_management, "load_models_gpu",
                        lambda *a, **k: loads.append(a) or real_load(*a, **k))
    monkeypatch.setattr(comfy.model_management, "get_total_memory", lambda *a, **k: 1024 ** 2)
    with pytest.raises(TrainingMemoryError, match=r"in all \(the device's total memory\)"):
        train(model, resolution=128, gradient_checkpointing="auto")
    assert loads == []


def test_a_partial_lowvram_load_is_refused(monkeypatch):
    """This machine has no GPU, so ComfyUI's lowvram outcome (some weights left off the load device) is made by
    hand after the real load; the trainer must notice and refuse rather than train on it."""
    model = build_model("sd15")
    unet = model.model.diffusion_model
    real_load = comfy.model_management.load_models_gpu

    def load_leaving_a_weight_behind(*args, **kwargs):
        real_load(*args, **kwargs)
        unet.out[2]._parameters["weight"] = torch.nn.Parameter(unet.out[2].weight.to("meta"), requires_grad=False)

    original = unet.out[2]._parameters["weight"]
    monkeypatch.setattr(comfy.model_management, "load_models_gpu", load_leaving_a_weight_behind)
    try:
        with pytest.raises(TrainingMemoryError, match=r"only in part onto cpu \(\d+ of (\d+) weights; lowvram"):
            train(model, resolution=128)
    finally:
        unet.out[2]._parameters["weight"] = original


def _gradients(model, checkpointing):
    s = TrainSettings(method="lp", placement="all", prompt_tokens=3, key_weight=1.0)
    base = model.model
    latent = (4, 16, 16)
    with torch.inference_mode(False):
        concept = encode_entries(base, conditioning("sd15", 1), latent, "cpu", "positive", 0)
        uncond = encode_entries(base, conditioning("sd15", 2), latent, "cpu", "negative", 0)[0]
        parts = build_trainables(base.diffusion_model, dataclasses.replace(s, rank=4), 768, 1.0, "cpu",
                                 torch.Generator().manual_seed(0))
        for p in parts.deltas.up.values():  # LoRA up starts at zero: give the deltas an effect to differentiate
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(1))
        g = torch.Generator().manual_seed(2)
        x_t, sigma = torch.randn(2, *latent, generator=g) * 3, torch.tensor([3.0, 0.7])
        with trainable_model(base), parts.deltas.attached(), \
                checkpointed_transformers(base.diffusion_model, parts.deltas, checkpointing) as wrapped:
            denoiser = Denoiser(base, {}, "cpu", parts.deltas, parts.prompt, "eps")
            terms = loss_terms(denoiser, s, x_t, sigma, uncond, concept * 2, [], lambda loss: loss.backward())
    return wrapped, {k: float(v) for k, v in terms.items()}, [p.grad.clone() for p in parts.parameters()]


def test_gradient_checkpointing_gives_the_same_gradients():
    model = build_model("sd15")
    comfy.model_management.load_models_gpu([model])
    wrapped_off, losses_off, plain = _gradients(model, False)
    wrapped_on, losses_on, checkpointed = _gradients(model, True)
    transformers = sum(type(m).__name__ == "SpatialTransformer" for m in model.model.modules())
    assert wrapped_off == 0 and wrapped_on == transformers > 0
    assert losses_on == losses_off and set(losses_on) == {"erase", "key"}
    assert len(plain) == len(checkpointed) and all(g.abs().sum() > 0 for g in plain)
    for a, b in zip(plain, checkpointed):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-9)
    assert all(not hasattr(m, "forward") or "forward" not in vars(m) for m in model.model.modules())


@pytest.mark.parametrize("setting,dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16),
                                           ("fp16", torch.float16)])
def test_each_dtype_computes_in_the_dtype_it_names_and_gives_the_weights_back(setting, dtype):
    model = build_model("sd15")
    unet = model.model.diffusion_model
    seen = set()

    def record(module, args, output):
        seen.add((type(module).__name__, args[0].dtype, module.weight.dtype, output.dtype))

    watched = [unet.middle_block[1].transformer_blocks[0].attn2.to_k, unet.input_blocks[0][0]]  # a linear, a conv
    handles = [m.register_forward_hook(record) for m in watched]
    before, weight = state(model), watched[0].weight
    try:
        result = train(model, resolution=128, dtype=setting)
    finally:
        for h in handles:
            h.remove()
    assert seen == {("Linear", dtype, dtype, dtype), ("Conv2d", dtype, dtype, dtype)}
    assert result.memory.dtype == setting and result.erasure.settings["compute_dtype"] == setting
    assert (result.memory.weight_copies > 0) == (dtype != torch.float32)  # the model was loaded in fp32
    assert all(math_ok for math_ok in (result.losses["erase"][-1] > 0, len(result.losses["erase"]) == 3))
    # the run's dtype copies are gone: the model has its own tensors back, in its own dtype
    assert watched[0].weight is weight and unet.dtype == torch.float32 and same_state(model, before)
    assert all(t.dtype == torch.float32 for d in result.erasure.deltas.values() for t in (d.up, d.down))


def test_auto_computes_in_the_dtype_the_model_was_loaded_in_without_a_copy():
    model = build_model("sd15")
    model.model.diffusion_model.to(torch.float16)
    model.model.diffusion_model.dtype = torch.float16
    result = train(model, resolution=128, dtype="auto")
    assert result.memory.dtype == "fp16" and result.memory.weight_copies == 0


def test_dtype_rules():
    native = lambda device: True  # noqa: E731
    emulated = lambda device: False  # noqa: E731
    assert compute_dtype("auto", "cpu", torch.float32, native) == torch.float32
    assert compute_dtype("auto", "cuda", torch.float16, native) == torch.float16  # as loaded, no copy
    assert compute_dtype("auto", "cuda", torch.bfloat16, emulated) == torch.bfloat16
    assert compute_dtype("auto", "cuda", torch.float32, native) == torch.bfloat16
    assert compute_dtype("auto", "cuda", torch.float32, emulated) == torch.float16
    assert compute_dtype("fp32", "cuda", torch.float16, native) == torch.float32
    assert compute_dtype("bf16", "cpu", torch.float32, emulated) == torch.bfloat16
    with pytest.raises(ErasureError, match="cuda does not run bf16 natively.*use dtype auto or fp16"):
        compute_dtype("bf16", "cuda", torch.float16, emulated)


def test_a_model_the_count_cannot_follow_still_trains_on_an_estimate(monkeypatch, caplog):
    """E.g. an attention kernel (xformers, sage) with no shape-only version: the plan falls back to an estimate,
    says so, and training goes on."""
    import comfyui_concept_erasure.trainer.memory_plan as memory_plan

    def no_shape_only_run(*args, **kwargs):
        raise NotImplementedError("aten::some_kernel has no fake implementation")

    monkeypatch.setattr(memory_plan, "shape_only_model", no_shape_only_run)
    model = build_model("sd15")
    result = train(model, resolution=128)
    plan = result.memory
    assert plan.estimated and "estimated, not counted" in plan.describe()
    assert plan.checkpointing  # auto, with nothing counted to decide on: the cheaper side
    assert plan.trainable == 12 * plan.trainable_params > 0 and plan.iteration > 0
    assert "could not count the training memory (NotImplementedError" in caplog.text
    assert len(result.losses["erase"]) == RUN["iterations"]


def test_the_stand_in_attention_computes_what_the_hosts_attention_computes():
    """When the host's attention kernel cannot run on shape-only tensors (xformers, sage, kernels that size
    themselves by the data), the count runs PyTorch's fused attention in its place: the same function."""
    from comfyui_concept_erasure.trainer.memory_count import with_sdpa_attention

    model = build_model("sdxl")
    base = model.model
    g = torch.Generator().manual_seed(4)
    x, context = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 2048, generator=g)
    y = torch.randn(2, 2816, generator=g)
    sigma = torch.tensor([2.0, 0.5])
    with torch.no_grad():
        host = base.apply_model(x, sigma, c_crossattn=context, y=y, transformer_options={})
        stand_in = base.apply_model(x, sigma, c_crossattn=context, y=y, transformer_options=with_sdpa_attention({}))
    assert torch.allclose(host, stand_in, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(host, base.apply_model(x, sigma, c_crossattn=context * 0, y=y), atol=1e-3)


def test_an_attention_kernel_the_count_cannot_run_is_stood_in_for(monkeypatch, caplog):
    """A kernel like xformers' has no shape-only version: the count runs PyTorch's fused attention instead and
    still counts (no estimate), and the training itself runs the host's kernel."""
    import logging

    import comfy.ldm.modules.attention as attention
    from torch._subclasses.fake_tensor import FakeTensor

    host_kernel = attention.optimized_attention
    calls = []

    def kernel_without_shape_only_version(q, *args, **kwargs):
        if isinstance(q, FakeTensor):
            raise NotImplementedError("no fake implementation for this kernel")
        calls.append(q.shape)
        return host_kernel(q, *args, **kwargs)

    monkeypatch.setattr(attention, "optimized_attention", kernel_without_shape_only_version)
    caplog.set_level(logging.INFO)
    model = build_model("sd15")
    result = train(model, resolution=128)
    assert not result.memory.estimated
    assert "counted with PyTorch attention standing in for the host's (NotImplementedError" in caplog.text
    assert calls and len(result.losses["erase"]) == RUN["iterations"]
