"""The erasure object and its patch, against references computed by hand on real comfy models."""
import math

import pytest
import torch

from comfyui_concept_erasure.erasure import ConceptErasure, ErasureError, LowRankDelta, apply_erasure
from comfyui_concept_erasure.erasure.concept_erasure import cross_attention_layers, model_context_dim
from tiny_models import CONTEXT_DIM, FAMILIES, build_dit, build_model, extra_conds, predict

MID_ATTN = "diffusion_model.middle_block.1.transformer_blocks.0.attn2"


def inputs(family, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 16, 16, generator=g)
    context = torch.randn(batch, 77, CONTEXT_DIM[family], generator=g)
    return x, context


def tokens(m, d, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, d, generator=g), torch.randn(m, d, generator=g)


def attn2_deltas(model, seed=5, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    state = model.model.state_dict()
    keys = [k for k in state if ".attn2.to_" in k and k.endswith(".weight")]
    return {k: torch.randn(state[k].shape, generator=g) * scale for k in keys}


def run_and_capture_attn2(patcher, names, x, context):
    """Run the patched model once, recording each named attn2's input x, its context/value, and its output."""
    records, handles = {}, []
    for name in names:
        def hook(mod, args, kwargs, output, name=name):
            records[name] = dict(x=args[0].detach().clone(), context=kwargs.get("context"),
                                 value=kwargs.get("value"), out=output.detach().clone())
        handles.append(patcher.model.get_submodule(name).register_forward_hook(hook, with_kwargs=True))
    try:
        predict(patcher, x, 1.0, context)
    finally:
        for h in handles:
            h.remove()
    return records


def reference_attention(attn, x, keys_context, values_context):
    """softmax(q k^T / sqrt(d_head)) v over the given contexts, written out by hand."""
    q, k, v = attn.to_q(x), attn.to_k(keys_context), attn.to_v(values_context)
    b, heads = x.shape[0], attn.heads
    d_head = q.shape[-1] // heads
    split = lambda t: t.reshape(b, t.shape[1], heads, d_head).transpose(1, 2)  # noqa: E731
    weights = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(d_head), dim=-1)
    out = (weights @ split(v)).transpose(1, 2).reshape(b, x.shape[1], heads * d_head)
    return attn.to_out(out)


@pytest.mark.parametrize("family", FAMILIES)
def test_context_dim_comes_from_the_model(family):
    assert model_context_dim(build_model(family)) == CONTEXT_DIM[family]


def test_prompt_patch_equals_attention_computed_by_hand():
    model = build_model("sd15")
    d = CONTEXT_DIM["sd15"]
    p_k, p_v = tokens(4, d)
    erasure = ConceptErasure(context_dim=d, prompt_k=p_k, prompt_v=p_v, placement="mid", prompt_at_inference=True)
    patched = apply_erasure(model, erasure)
    x, context = inputs("sd15")
    records = run_and_capture_attn2(patched, [MID_ATTN], x, context)
    rec = records[MID_ATTN]
    attn = patched.model.get_submodule(MID_ATTN)
    expand = lambda t: t.unsqueeze(0).expand(x.shape[0], -1, -1)  # noqa: E731
    with torch.no_grad():
        expected = reference_attention(attn, rec["x"], torch.cat([context, expand(p_k)], 1),
                                       torch.cat([context, expand(p_v)], 1))
        unpatched = reference_attention(attn, rec["x"], context, context)
    assert torch.allclose(rec["out"], expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(rec["out"], unpatched, atol=1e-3)


@pytest.mark.parametrize("placement,patched_blocks", [
    ("mid", {"middle"}), ("midout", {"middle", "output"}), ("all", {"input", "middle", "output"})])
def test_placement_selects_blocks(placement, patched_blocks):
    model = build_model("sd15")
    d, m = CONTEXT_DIM["sd15"], 3
    erasure = ConceptErasure(context_dim=d, prompt_k=tokens(m, d)[0], prompt_v=tokens(m, d)[1],
                             placement=placement, prompt_at_inference=True)
    patched = apply_erasure(model, erasure)
    names = list(cross_attention_layers(model))
    x, context = inputs("sd15")
    records = run_and_capture_attn2(patched, names, x, context)
    for name in names:
        block = name.split(".")[1].split("_")[0]
        expected_len = 77 + m if block in patched_blocks else 77
        assert records[name]["context"].shape[1] == expected_len, name
        assert records[name]["value"].shape[1] == expected_len, name


def test_prompt_patch_composes_with_another_attn2_patch():
    model = build_model("sd15")
    d, m = CONTEXT_DIM["sd15"], 2
    marker = torch.full((1, 5, d), 0.5)

    def other_patch(n, context, value, extra_options):
        return n, torch.cat([context, marker.expand(context.shape[0], -1, -1)], 1), \
            torch.cat([value, -marker.expand(value.shape[0], -1, -1)], 1)

    base = model.clone()
    base.set_model_attn2_patch(other_patch)
    p_k, p_v = tokens(m, d)
    erasure = ConceptErasure(context_dim=d, prompt_k=p_k, prompt_v=p_v, placement="mid", prompt_at_inference=True)
    patched = apply_erasure(base, erasure)
    x, context = inputs("sd15")
    records = run_and_capture_attn2(patched, [MID_ATTN], x, context)
    ctx, val = records[MID_ATTN]["context"], records[MID_ATTN]["value"]
    assert ctx.shape[1] == 77 + 5 + m
    assert torch.equal(ctx[:, 77:82], marker.expand(2, -1, -1)) and torch.equal(val[:, 77:82], -marker.expand(2, -1, -1))
    assert torch.equal(ctx[0, 82:], p_k) and torch.equal(val[1, 82:], p_v)


@pytest.mark.parametrize("family", FAMILIES)
def test_strength_scales_weight_deltas(family):
    model = build_model(family)
    d = CONTEXT_DIM[family]
    deltas = attn2_deltas(model)
    x, context = inputs(family)
    extra = extra_conds(family, x.shape[0])
    original = predict(model, x, 1.0, context, **extra)

    empty = ConceptErasure(context_dim=d)
    assert torch.equal(predict(apply_erasure(model, empty), x, 1.0, context, **extra), original)
    erasure = ConceptErasure(context_dim=d, deltas=deltas)
    assert torch.equal(predict(apply_erasure(model, erasure, strength=0.0), x, 1.0, context, **extra), original)

    erased = predict(apply_erasure(model, erasure, strength=1.0), x, 1.0, context, **extra)
    reference = build_model(family)  # same seed, same weights
    with torch.no_grad():
        state = reference.model.state_dict()
        for key, delta in deltas.items():
            state[key] += delta
    expected = predict(reference, x, 1.0, context, **extra)
    assert torch.allclose(erased, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(erased, original, atol=1e-4)
    assert torch.equal(predict(model, x, 1.0, context, **extra), original), "the input model changed"


def test_low_rank_delta_applies_as_up_down_times_alpha_over_rank():
    model = build_model("sd15")
    key = MID_ATTN + ".to_v.weight"
    out_dim, in_dim = model.model.state_dict()[key].shape
    g = torch.Generator().manual_seed(9)
    up, down = torch.randn(out_dim, 4, generator=g) * 0.1, torch.randn(4, in_dim, generator=g) * 0.1
    low_rank = ConceptErasure(context_dim=768, deltas={key: LowRankDelta(up, down, alpha=2.0)})
    full = ConceptErasure(context_dim=768, deltas={key: up @ down * 0.5})
    x, context = inputs("sd15")
    assert torch.allclose(predict(apply_erasure(model, low_rank), x, 1.0, context),
                          predict(apply_erasure(model, full), x, 1.0, context), atol=1e-6)


def test_apply_never_changes_the_input_model():
    model = build_model("sd15")
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    options_before = repr(model.model_options)
    erasure = ConceptErasure(context_dim=768, prompt_k=tokens(2, 768)[0], prompt_v=tokens(2, 768)[1],
                             deltas=attn2_deltas(model), prompt_at_inference=True)
    patched = apply_erasure(model, erasure, strength=1.5)
    x, context = inputs("sd15")
    predict(patched, x, 1.0, context)
    predict(model, x, 1.0, context)
    assert repr(model.model_options) == options_before and not model.patches
    after = model.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_prompt_attached_only_when_the_flag_says_so():
    model = build_model("sd15")
    p_k, p_v = tokens(2, 768)
    hidden = ConceptErasure(context_dim=768, prompt_k=p_k, prompt_v=p_v, prompt_at_inference=False)
    x, context = inputs("sd15")
    original = predict(model, x, 1.0, context)
    assert torch.equal(predict(apply_erasure(model, hidden), x, 1.0, context), original)
    keyed = predict(apply_erasure(model, hidden, attach_prompt=True), x, 1.0, context)
    assert not torch.allclose(keyed, original, atol=1e-4)


@pytest.mark.parametrize("erasure_family,model_family", [("sd15", "sdxl"), ("sdxl", "sd15"), ("sd2v", "sd15")])
def test_wrong_family_is_refused_naming_both_sides(erasure_family, model_family):
    model = build_model(model_family)
    d = CONTEXT_DIM[erasure_family]
    erasure = ConceptErasure(context_dim=d, prompt_k=tokens(2, d)[0], prompt_v=tokens(2, d)[1],
                             prompt_at_inference=True, base_model="X")
    with pytest.raises(ErasureError) as info:
        apply_erasure(model, erasure)
    assert str(d) in str(info.value) and str(CONTEXT_DIM[model_family]) in str(info.value)
    assert not model.model_options["transformer_options"]


def test_delta_key_or_shape_mismatch_is_refused():
    model = build_model("sd15")
    wrong_key = ConceptErasure(context_dim=768, deltas={"diffusion_model.nope.weight": torch.zeros(2, 2)})
    with pytest.raises(ErasureError, match="does not have"):
        apply_erasure(model, wrong_key)
    key = MID_ATTN + ".to_k.weight"
    wrong_shape = ConceptErasure(context_dim=768, deltas={key: torch.zeros(3, 768)})
    with pytest.raises(ErasureError, match=r"shape \[3, 768\]"):
        apply_erasure(model, wrong_shape)
    assert not model.patches


def test_model_without_unet_cross_attention_is_refused():
    dit = build_dit()
    with pytest.raises(ErasureError, match="not a Stable Diffusion UNet"):
        apply_erasure(dit, ConceptErasure(context_dim=768, prompt_k=torch.zeros(1, 768), prompt_v=torch.zeros(1, 768),
                                          prompt_at_inference=True))
    assert not dit.patches and not dit.model_options["transformer_options"]


def test_bad_erasure_objects_are_refused():
    with pytest.raises(ErasureError, match="placement"):
        ConceptErasure(context_dim=768, placement="everywhere")
    with pytest.raises(ErasureError, match=r"\[tokens, 768\]"):
        ConceptErasure(context_dim=768, prompt_k=torch.zeros(2, 1024), prompt_v=torch.zeros(2, 1024))
    with pytest.raises(ErasureError, match="both"):
        ConceptErasure(context_dim=768, prompt_k=torch.zeros(2, 768))


@pytest.mark.parametrize("key,layer", [
    ("diffusion_model.input_blocks.1.0.in_layers.0.weight", "GroupNorm"),
    (MID_ATTN.replace("attn2", "norm2") + ".weight", "LayerNorm"),
])
def test_only_linear_and_conv_weights_may_be_patched(key, layer):
    model = build_model("sd15")
    sampling = model.get_model_object("model_sampling")
    sigmas = sampling.sigmas.clone()
    erasure = ConceptErasure(context_dim=768, deltas={key: torch.ones(model.model.state_dict()[key].shape)})
    with pytest.raises(ErasureError) as info:
        apply_erasure(model, erasure)
    assert repr(key) in str(info.value) and f"weight of a {layer}" in str(info.value)
    changed = ConceptErasure(context_dim=768)
    changed.deltas["model_sampling.sigmas"] = torch.full((1000,), 5.0)  # changed after it was made
    with pytest.raises(ErasureError, match="'model_sampling.sigmas' is not a UNet weight"):
        apply_erasure(model, changed)
    assert not model.patches and torch.equal(sampling.sigmas, sigmas)


def test_apply_on_a_model_with_a_lora_stacks_both():
    import comfy.lora
    import comfy.sd

    model = build_model("sd15")
    key = MID_ATTN + ".to_k.weight"
    g = torch.Generator().manual_seed(4)
    out_dim, in_dim = model.model.state_dict()[key].shape
    up, down = torch.randn(out_dim, 2, generator=g) * 0.1, torch.randn(2, in_dim, generator=g) * 0.1
    lora_name = next(name for name, k in comfy.lora.model_lora_keys_unet(model.model, {}).items()
                     if k == key and name.startswith("lora_unet_"))
    kohya = {f"{lora_name}.lora_up.weight": up, f"{lora_name}.lora_down.weight": down,
             f"{lora_name}.alpha": torch.tensor(2.0)}
    with_lora, _ = comfy.sd.load_lora_for_models(model, None, kohya, 0.8, 0)
    assert with_lora.patches and not model.patches
    erasure = ConceptErasure(context_dim=768, deltas=attn2_deltas(model))
    x, context = inputs("sd15")

    both = predict(apply_erasure(with_lora, erasure), x, 1.0, context)
    lora_only = predict(with_lora, x, 1.0, context)
    erasure_only = predict(apply_erasure(model, erasure), x, 1.0, context)
    reference = build_model("sd15")  # same weights, both diffs added by hand
    with torch.no_grad():
        state = reference.model.state_dict()
        state[key] += 0.8 * (up @ down) * (2.0 / 2)
        for k, delta in erasure.deltas.items():
            state[k] += delta
    assert torch.allclose(both, predict(reference, x, 1.0, context), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(both, lora_only, atol=1e-4) and not torch.allclose(both, erasure_only, atol=1e-4)
    assert len(with_lora.patches) == 1  # the LoRA'd input is unchanged too
