"""The Load / Apply / Save / Recover nodes, called as ComfyUI calls them, on tiny real models."""
import pytest
import torch

import comfyui_concept_erasure
from comfyui_concept_erasure.erasure import ConceptErasure, ErasureError, LowRankDelta, apply_erasure
from comfyui_concept_erasure.nodes.erasure_nodes import (
    ApplyConceptErasure, LoadConceptErasure, RecoverErasedConcept, SaveConceptErasure)
from comfyui_concept_erasure.nodes.types import CATEGORY
from tiny_models import CONTEXT_DIM, build_model, predict

MID = "diffusion_model.middle_block.1.transformer_blocks.0.attn2"


def make_erasure(model, prompt_at_inference, seed=0):
    g = torch.Generator().manual_seed(seed)
    state = model.model.state_dict()
    k, v = state[MID + ".to_k.weight"], state[MID + ".to_v.weight"]
    d = CONTEXT_DIM["sd15"]
    return ConceptErasure(
        context_dim=d, prompt_k=torch.randn(3, d, generator=g), prompt_v=torch.randn(3, d, generator=g),
        deltas={MID + ".to_k.weight": torch.randn(k.shape, generator=g) * 0.05,
                MID + ".to_v.weight": LowRankDelta(torch.randn(v.shape[0], 2, generator=g) * 0.1,
                                                   torch.randn(2, v.shape[1], generator=g) * 0.1, alpha=1.0)},
        prompt_at_inference=prompt_at_inference, concepts=["a cat"], method="lp", base_model="tiny sd15")


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, CONTEXT_DIM["sd15"], generator=g)


def untouched(model, options_before):
    return not model.patches and repr(model.model_options) == options_before


def save_and_load(erasure, precision="fp32"):
    """Save then Load through the nodes, under inference mode like the host; returns (name, loaded)."""
    with torch.inference_mode():
        ui = SaveConceptErasure().save(erasure, "concept_erasure/test", precision)["ui"]
        (name,) = ui["erasure_files"]
        assert name in LoadConceptErasure.INPUT_TYPES()["required"]["erasure_name"][0]
        (loaded,) = LoadConceptErasure().load(name)
    return name, loaded


@pytest.mark.parametrize("prompt_at_inference", [True, False])
def test_load_then_apply_equals_apply_erasure(models_dir, prompt_at_inference):
    model = build_model("sd15")
    erasure = make_erasure(model, prompt_at_inference)
    _, loaded = save_and_load(erasure)
    x, context = inputs()
    with torch.inference_mode():
        (patched,) = ApplyConceptErasure().apply(model, loaded, 0.7)
    expected = predict(apply_erasure(model, erasure, 0.7), x, 1.0, context)
    assert torch.equal(predict(patched, x, 1.0, context), expected)
    assert not torch.allclose(expected, predict(model, x, 1.0, context), atol=1e-4)
    assert not model.patches


def test_recover_attaches_the_key(models_dir):
    model = build_model("sd15")
    erasure = make_erasure(model, prompt_at_inference=False)
    _, loaded = save_and_load(erasure)
    x, context = inputs()
    with torch.inference_mode():
        (applied,) = ApplyConceptErasure().apply(model, loaded, 1.0)
        (recovered,) = RecoverErasedConcept().recover(model, loaded)
    with_key = predict(recovered, x, 1.0, context)
    assert torch.equal(with_key, predict(apply_erasure(model, erasure, 1.0, attach_prompt=True), x, 1.0, context))
    assert not torch.allclose(with_key, predict(applied, x, 1.0, context), atol=1e-4)
    assert not model.patches


def test_recover_refuses_an_erasure_without_a_prompt():
    model = build_model("sd15")
    options_before = repr(model.model_options)
    no_prompt = make_erasure(model, False).replace(prompt_k=None, prompt_v=None, method="weights_only")
    with pytest.raises(ErasureError, match="method weights_only.*no learned prompt"):
        RecoverErasedConcept().recover(model, no_prompt)
    assert untouched(model, options_before)


def test_recover_refuses_an_erasure_whose_prompt_is_already_attached(models_dir):
    model = build_model("sd15")
    options_before = repr(model.model_options)
    name, attached = save_and_load(make_erasure(model, prompt_at_inference=True).replace(method="lp_attached"))
    on_disk = (models_dir / "concept_erasure" / name).read_bytes()
    with pytest.raises(ErasureError) as info:
        RecoverErasedConcept().recover(model, attached)
    message = str(info.value)
    assert "method lp_attached" in message and "Recover would return the same model" in message
    assert untouched(model, options_before)
    assert (models_dir / "concept_erasure" / name).read_bytes() == on_disk


def test_save_node_numbers_files_and_refuses_escaping_prefixes(models_dir):
    erasure = make_erasure(build_model("sd15"), True)
    names = [SaveConceptErasure().save(erasure, "artists/cat")["ui"]["erasure_files"][0] for _ in range(2)]
    assert names == ["artists/cat_00001_.safetensors", "artists/cat_00002_.safetensors"]
    with pytest.raises(ErasureError, match=r"'\.\./cat'"):
        SaveConceptErasure().save(erasure, "../cat")
    assert sorted(p.name for p in models_dir.rglob("*") if p.is_file()) == [
        "cat_00001_.safetensors", "cat_00002_.safetensors"]


def test_bad_files_are_refused_before_any_model_is_touched(models_dir):
    folder = models_dir / "concept_erasure"
    folder.mkdir()
    (folder / "renamed_checkpoint.safetensors").write_bytes(b"PK\x03\x04" + b"\x00" * 60)
    model = build_model("sd15")
    options_before = repr(model.model_options)
    with pytest.raises(ErasureError, match="renamed_checkpoint.safetensors: .*pickle"):
        LoadConceptErasure().load("renamed_checkpoint.safetensors")
    with pytest.raises(ErasureError, match="'../x.safetensors'"):
        LoadConceptErasure().load("../x.safetensors")

    sdxl_erasure = ConceptErasure(context_dim=2048, prompt_k=torch.zeros(1, 2048), prompt_v=torch.zeros(1, 2048),
                                  prompt_at_inference=True)
    _, loaded = save_and_load(sdxl_erasure)
    with pytest.raises(ErasureError, match="SDXL.*2048.*768"):
        ApplyConceptErasure().apply(model, loaded, 1.0)
    wrong_shape = make_erasure(model, False)
    wrong_shape.deltas[MID + ".to_k.weight"] = torch.zeros(3, 768)
    _, loaded = save_and_load(wrong_shape)
    with pytest.raises(ErasureError, match=r"to_k.weight'.*\[3, 768\]"):
        RecoverErasedConcept().recover(model, loaded)
    assert untouched(model, options_before)


def rounded(erasure, dtype):
    """The erasure with its weight deltas rounded to `dtype` and back, as a file stored in `dtype` holds them."""
    def r(t):
        return t.to(dtype).float()
    return erasure.replace(deltas={k: LowRankDelta(r(d.up), r(d.down), d.alpha) if isinstance(d, LowRankDelta)
                                   else r(d) for k, d in erasure.deltas.items()})


@pytest.mark.parametrize("precision,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_compact_save_stores_deltas_in_its_dtype_and_applies_as_the_rounded_erasure(models_dir, precision, dtype):
    model = build_model("sd15")
    erasure = make_erasure(model, False)
    x, context = inputs()
    name, loaded = save_and_load(erasure, precision)
    _, exact = save_and_load(erasure, "fp32")
    compact_size = (models_dir / "concept_erasure" / name).stat().st_size
    exact_size = (models_dir / "concept_erasure" / name.replace("00001", "00002")).stat().st_size
    assert loaded.deltas[MID + ".to_k.weight"].dtype == dtype and loaded.deltas[MID + ".to_v.weight"].up.dtype == dtype
    assert torch.equal(loaded.prompt_k, erasure.prompt_k)  # the key stays exact
    delta_bytes = sum(t.numel() * 2 for d in erasure.deltas.values()
                      for t in ((d.up, d.down) if isinstance(d, LowRankDelta) else (d,)))
    assert abs(exact_size - compact_size - delta_bytes) <= 64  # half of every delta's float32 bytes (+ header padding)
    with torch.inference_mode():
        (patched,) = ApplyConceptErasure().apply(model, loaded, 1.0)
    out = predict(patched, x, 1.0, context)
    assert torch.equal(out, predict(apply_erasure(model, rounded(erasure, dtype)), x, 1.0, context))
    exact_out = predict(apply_erasure(model, erasure), x, 1.0, context)
    change = (exact_out - predict(model, x, 1.0, context)).abs().max()
    assert (out - exact_out).abs().max() < 0.02 * change


def test_save_refuses_a_delta_that_overflows_fp16_and_leaves_no_file(models_dir):
    model = build_model("sd15")
    erasure = make_erasure(model, False)
    erasure.deltas[MID + ".to_k.weight"] = erasure.deltas[MID + ".to_k.weight"] * 1e6
    with pytest.raises(ErasureError, match="to_k.weight' does not fit torch.float16.*fp32 or bf16"):
        SaveConceptErasure().save(erasure, "concept_erasure/big", "fp16")
    assert not any((models_dir / "concept_erasure").iterdir())


def test_load_dropdown_lists_only_safetensors(models_dir):
    folder = models_dir / "concept_erasure"
    folder.mkdir()
    for name in ("b.safetensors", "a.safetensors", "old.ckpt", "old.pt", "readme.txt"):
        (folder / name).write_bytes(b"x")
    choices, options = LoadConceptErasure.INPUT_TYPES()["required"]["erasure_name"]
    assert choices == ["a.safetensors", "b.safetensors"]
    assert options["tooltip"]


def test_every_node_is_documented(models_dir):
    mappings = comfyui_concept_erasure.NODE_CLASS_MAPPINGS
    names = comfyui_concept_erasure.NODE_DISPLAY_NAME_MAPPINGS
    assert {"LoadConceptErasure", "ApplyConceptErasure", "SaveConceptErasure", "RecoverErasedConcept"} <= set(mappings)
    assert set(names) == set(mappings)
    for node_id, cls in mappings.items():
        assert names[node_id].strip(), node_id
        assert isinstance(cls.DESCRIPTION, str) and len(cls.DESCRIPTION) > 20, node_id
        assert cls.CATEGORY in (CATEGORY, f"{CATEGORY}/demo", f"{CATEGORY}/settings"), node_id
        assert CATEGORY == "concept_erasure"
        assert callable(getattr(cls(), cls.FUNCTION)), node_id
        spec = cls.INPUT_TYPES()
        assert set(spec) <= {"required", "optional", "hidden"}, node_id
        for section in ("required", "optional"):
            for input_name, entry in spec.get(section, {}).items():
                assert len(entry) == 2 and entry[1].get("tooltip", "").strip(), f"{node_id}.{input_name}"
        if cls.RETURN_TYPES:
            assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES), node_id
        else:
            assert cls.OUTPUT_NODE, node_id


@pytest.mark.parametrize("family,limit_mb", [("sd15", 50), ("sdxl", 200)])
def test_a_default_erasure_of_the_real_architecture_saves_small(models_dir, family, limit_mb):
    """The default training (lp, rank-16 factors on every attn2 projection, 10 prompt tokens), saved with the Save
    node's default precision, on the real SD1.5 / SDXL UNet layouts (built on the meta device: no weights)."""
    from sd_architectures import build

    from comfyui_concept_erasure.trainer import TrainSettings
    from comfyui_concept_erasure.trainer.deltas import DeltaSet, target_layers

    s = TrainSettings()
    unet = build(family, "meta", torch.float16).diffusion_model
    deltas = DeltaSet(target_layers(unet, s.method), s.rank, torch.Generator().manual_seed(0), "cpu")
    width = unet.middle_block[1].transformer_blocks[0].attn2.to_k.in_features
    erasure = ConceptErasure(context_dim=width, prompt_k=torch.randn(s.prompt_tokens, width),
                             prompt_v=torch.randn(s.prompt_tokens, width), deltas=deltas.export(), method=s.method)
    with torch.inference_mode():
        (name,) = SaveConceptErasure().save(erasure, "concept_erasure/size")["ui"]["erasure_files"]
    size_mb = (models_dir / "concept_erasure" / name).stat().st_size / 1e6
    print(f"{family}: default erasure file {size_mb:.1f} MB")
    assert size_mb <= limit_mb
    full_mb = sum(m.weight.numel() for m in target_layers(unet, s.method).values()) * 2 / 1e6
    assert size_mb < full_mb / 10  # what full deltas would take in the same precision
