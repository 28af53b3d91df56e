"""Published weights as an erasure: LoRA files in every key style, partial UNet state dicts, refusals."""
import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

import comfy.model_management

from comfyui_concept_erasure.erasure import ErasureError, LowRankDelta, apply_erasure, write_erasure_file
from comfyui_concept_erasure.erasure.lora_export import lora_tensors, write_lora_file
from comfyui_concept_erasure.erasure.unet_names import model_unet_names
from comfyui_concept_erasure.erasure.weights_import import import_weights
from lora_helpers import ATTN2, attn2_erasure, every_layer_erasure, noise_prediction
from tiny_models import FAMILIES, build_model


def full(delta):
    return (delta.full() if isinstance(delta, LowRankDelta) else delta).float()


def same_deltas(a, b, tolerance=1e-5):
    """Same keys, and each delta equal within `tolerance` relative (Frobenius) error."""
    assert sorted(a.deltas) == sorted(b.deltas)
    for key in a.deltas:
        wanted = full(b.deltas[key])
        error = float(torch.linalg.norm(full(a.deltas[key]) - wanted) / torch.linalg.norm(wanted))
        assert error <= tolerance, (key, error)


def snapshot(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fmt", ["exact", "lora"])
def test_round_trip_export_import_apply_equals_apply(tmp_path, family, fmt):
    model = build_model(family)
    erasure = every_layer_erasure(family, model, full="low_rank")  # exactly representable in both formats
    path = str(tmp_path / "erasure_lora.safetensors")
    write_lora_file(lora_tensors(erasure, fmt, rank=2, model=model), path)

    imported = import_weights(path, model)
    same_deltas(imported, erasure)
    assert {type(d) for d in imported.deltas.values()} == ({LowRankDelta, torch.Tensor} if fmt == "exact"
                                                           else {LowRankDelta})
    assert imported.method == "esd_u" and imported.concepts == ["a cat"]  # the export's own metadata
    assert imported.settings["iterations"] == 3
    assert imported.settings["source"]["file"] == "erasure_lora.safetensors"
    assert imported.settings["source"]["kind"] == "lora" and imported.settings["source"]["key_style"] == "kohya"
    assert imported.base_model == type(model.model.model_config).__name__ and imported.pack_version
    expected = noise_prediction(apply_erasure(model, erasure), family)
    difference = (noise_prediction(apply_erasure(model, imported), family) - expected).abs().max().item()
    assert difference <= 1e-5, difference
    assert not model.patches


def lora_layers(erasure, names):
    """(diffusers module path, sgm path, up, down, alpha) of every low-rank delta."""
    for key, d in sorted(erasure.deltas.items()):
        assert isinstance(d, LowRankDelta)
        yield names.diffusers[key][:-len(".weight")], key[len("diffusion_model."):-len(".weight")], d.up, d.down, d.alpha


def style_kohya_sgm(erasure, names):
    out = {}
    for _, sgm, up, down, alpha in lora_layers(erasure, names):
        base = "lora_unet_" + sgm.replace(".", "_")
        out.update({f"{base}.lora_up.weight": up, f"{base}.lora_down.weight": down,
                    f"{base}.alpha": torch.tensor(alpha)})
    return out, None


def style_comfyui(erasure, names):
    out = {}
    for _, sgm, up, down, alpha in lora_layers(erasure, names):
        out.update({f"diffusion_model.{sgm}.lora_up.weight": up, f"diffusion_model.{sgm}.lora_down.weight": down,
                    f"diffusion_model.{sgm}.alpha": torch.tensor(alpha)})
    return out, None


def style_peft(erasure, names):
    """diffusers' save_lora_weights: unet.<module>.lora_A/B, alpha in the adapter metadata."""
    out = {}
    for path, _, up, down, _ in lora_layers(erasure, names):
        out.update({f"unet.{path}.lora_A.weight": down, f"unet.{path}.lora_B.weight": up})
    return out, {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 3.0})}


def style_attention_processors(erasure, names):
    """diffusers' old attention-processor LoRA (to_k_lora.down / .up), scale 1."""
    out = {}
    for path, _, up, down, _ in lora_layers(erasure, names):
        module, _, proj = path.rpartition(".")
        if proj == "0":  # to_out.0 -> processor.to_out_lora
            module, _, proj = module.rpartition(".")
        out.update({f"{module}.processor.{proj}_lora.down.weight": down, f"{module}.processor.{proj}_lora.up.weight": up})
    return out, None


@pytest.mark.parametrize("style,alpha", [(style_kohya_sgm, 4.0), (style_comfyui, 4.0), (style_peft, 3.0),
                                         (style_attention_processors, 4.0)])
def test_every_lora_key_style_gives_the_same_deltas(tmp_path, style, alpha):
    model = build_model("sdxl")
    names = model_unet_names(model)
    erasure = attn2_erasure("sdxl", model)
    erasure = erasure.replace(deltas={k: LowRankDelta(d.up, d.down, alpha) if isinstance(d, LowRankDelta) else
                                      LowRankDelta(d[:, :4].clone(), torch.eye(4, d.shape[1]), alpha)
                                      for k, d in erasure.deltas.items()})
    tensors, meta = style(erasure, names)
    path = str(tmp_path / "style.safetensors")
    save_file(tensors, path, metadata=meta)
    imported = import_weights(path, model)
    same_deltas(imported, erasure)
    assert imported.method == "imported" and imported.settings["source"]["layers"] == len(erasure.deltas)


def test_text_encoder_layers_and_biases_are_left_out_and_recorded(tmp_path, caplog):
    model = build_model("sd15")
    erasure = attn2_erasure("sd15", model)
    export = lora_tensors(erasure, "lora", rank=4, model=model)
    tensors = dict(export.tensors)
    te = "lora_te_text_model_encoder_layers_0_self_attn_k_proj"
    tensors.update({f"{te}.lora_down.weight": torch.randn(4, 768), f"{te}.lora_up.weight": torch.randn(768, 4),
                    f"{te}.alpha": torch.tensor(4.0),
                    "lora_unet_mid_block_attentions_0_proj_out.diff_b": torch.randn(64)})
    path = str(tmp_path / "with_te.safetensors")
    save_file(tensors, path)
    imported = import_weights(path, model, concepts=["Van Gogh"])
    assert len(imported.deltas) == len(erasure.deltas) and imported.concepts == ["Van Gogh"]
    left_out = imported.settings["source"]["left_out"]
    assert left_out["text encoder"]["count"] == 3 and left_out["biases and norms"]["count"] == 1
    assert "left out 3 text encoder tensor(s), 1 biases and norms tensor(s)" in caplog.text


def partial_unet(model, change_keys, scale=0.1, prefix="", dtype=torch.float32, seed=0):
    """A diffusers-keyed partial UNet state dict (every attn2 weight and bias), as ESD / UCE release them, with a
    known change on `change_keys`. Returns (tensors, {model key: change})."""
    g = torch.Generator().manual_seed(seed)
    names = model_unet_names(model)
    comfy.model_management.load_models_gpu([model])
    state = model.model.state_dict()
    tensors, changes = {}, {}
    for key, diffusers_name in names.diffusers.items():
        if ".attn2." in diffusers_name and key in state:
            weight = state[key].detach().clone().float()
            if key in change_keys:
                changes[key] = torch.randn(weight.shape, generator=g) * scale
                weight = weight + changes[key]
            tensors[prefix + diffusers_name] = weight.to(dtype)
    return tensors, changes


@pytest.mark.parametrize("prefix", ["", "unet."])
def test_a_partial_unet_file_gives_exactly_the_change(tmp_path, prefix):
    model = build_model("sd15")
    keys = [k for k in model_unet_names(model).diffusers if k.endswith(ATTN2[1:3])][:3]  # to_k, to_v of blocks
    tensors, changes = partial_unet(model, keys, prefix=prefix)
    assert len(tensors) > 4 * len(keys)  # unchanged weights and biases are in the file too
    path = str(tmp_path / "esd-x.safetensors")
    save_file(tensors, path)
    before = snapshot(path)
    imported = import_weights(path, model, concepts=["Van Gogh"])
    assert sorted(imported.deltas) == sorted(changes)
    for key, change in changes.items():
        assert torch.allclose(imported.deltas[key], change, atol=1e-6)  # fp32 rounding of (w + c) - w
    assert imported.method == "imported" and imported.concepts == ["Van Gogh"]
    assert imported.settings["source"]["kind"] == "unet_weights"
    assert snapshot(path) == before and not model.patches


def test_a_fp16_release_against_a_fp32_model_counts_only_real_changes(tmp_path):
    model = build_model("sd15")
    keys = [k for k in model_unet_names(model).diffusers if k.endswith(".attn2.to_k.weight")][:1]
    tensors, changes = partial_unet(model, keys, dtype=torch.float16)
    path = str(tmp_path / "uce.safetensors")
    save_file(tensors, path)
    imported = import_weights(path, model)
    assert sorted(imported.deltas) == keys  # fp16 rounding of the other weights is not a change
    assert torch.allclose(imported.deltas[keys[0]], changes[keys[0]], atol=2e-3)


def test_changed_biases_in_a_release_are_left_out_and_recorded(tmp_path):
    model = build_model("sd15")
    keys = [k for k in model_unet_names(model).diffusers if k.endswith(".attn2.to_v.weight")][:1]
    tensors, _ = partial_unet(model, keys)
    bias = next(k for k in tensors if k.endswith("attn2.to_out.0.bias"))
    tensors[bias] = tensors[bias] + 0.5
    path = str(tmp_path / "esd.safetensors")
    save_file(tensors, path)
    imported = import_weights(path, model)
    assert sorted(imported.deltas) == keys
    assert imported.settings["source"]["left_out"]["biases and norms"]["examples"] == [bias]


def test_a_file_for_another_family_is_refused_naming_both(tmp_path):
    sdxl, sd15 = build_model("sdxl"), build_model("sd15")
    keys = [k for k in model_unet_names(sdxl).diffusers if k.endswith(".attn2.to_k.weight")][:2]
    tensors, _ = partial_unet(sdxl, keys)
    path = str(tmp_path / "sdxl-esd.safetensors")
    save_file(tensors, path)
    with pytest.raises(ErasureError, match=r"sdxl-esd.safetensors was made for SDXL models \(cross-attention "
                                           r"context 2048.*the model is SD15, a SD1\.x model \(context 768\)"):
        import_weights(path, sd15)
    lora = str(tmp_path / "sdxl-lora.safetensors")
    write_lora_file(lora_tensors(attn2_erasure("sdxl", sdxl), "exact", model=sdxl), lora)
    with pytest.raises(ErasureError, match=r"was made for SDXL models.*concept_erasure.base_model 'SDXL'.*"
                                           r"the model is SD15"):
        import_weights(lora, sd15)


def test_a_layer_the_model_does_not_have_is_refused(tmp_path):
    model = build_model("sd15")
    save_file({"lora_unet_down_blocks_3_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 8),
               "lora_unet_down_blocks_3_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 2)},
              str(tmp_path / "big.safetensors"))
    with pytest.raises(ErasureError, match=r"a UNet layer 'lora_unet_down_blocks_3_attentions_0_proj_in' that the "
                                           r"model \(SD15\) does not have"):
        import_weights(str(tmp_path / "big.safetensors"), model)


def test_pickles_are_refused_with_a_safe_way_to_convert_them(tmp_path):
    model = build_model("sd15")
    pt = tmp_path / "esd-u.pt"
    pt.write_bytes(pickle.dumps({"w": [1.0]}, protocol=4))
    with pytest.raises(ErasureError, match=r"esd-u.pt is a pickled PyTorch file.*weights_only=True.*save_file"):
        import_weights(str(pt), model)
    renamed = tmp_path / "renamed.safetensors"
    renamed.write_bytes(pt.read_bytes())
    with pytest.raises(ErasureError, match="pickle renamed to .safetensors"):
        import_weights(str(renamed), model)
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(ErasureError, match="broken.safetensors: not a readable safetensors file"):
        import_weights(str(tmp_path / "broken.safetensors"), model)


@pytest.mark.parametrize("suffix,kind", [("hada_w1_a", "LoHa"), ("lokr_w1", "LoKr"), ("dora_scale", "DoRA"),
                                         ("lora_mid.weight", "Tucker")])
def test_other_adapter_types_are_refused_by_name(tmp_path, suffix, kind):
    model = build_model("sd15")
    base = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file({f"{base}.{suffix}": torch.zeros(2, 2), f"{base}.alpha": torch.tensor(1.0)},
              str(tmp_path / "lycoris.safetensors"))
    with pytest.raises(ErasureError, match=kind):
        import_weights(str(tmp_path / "lycoris.safetensors"), model)


def test_a_weights_file_needs_the_model_without_patches(tmp_path):
    model = build_model("sd15")
    keys = [k for k in model_unet_names(model).diffusers if k.endswith(".attn2.to_k.weight")][:1]
    tensors, _ = partial_unet(model, keys)
    save_file(tensors, str(tmp_path / "esd.safetensors"))
    patched = apply_erasure(model, attn2_erasure("sd15", model))
    with pytest.raises(ErasureError, match="already has .* weight patches"):
        import_weights(str(tmp_path / "esd.safetensors"), patched)


def test_an_erasure_file_is_loaded_as_it_is(tmp_path):
    model = build_model("sd15")
    erasure = attn2_erasure("sd15", model)
    path = str(tmp_path / "own.safetensors")
    write_erasure_file(erasure, path)
    loaded = import_weights(path, model)
    same_deltas(loaded, erasure)
    assert loaded.has_prompt and loaded.method == "lp"
    with pytest.raises(ErasureError, match="made for SD1.x models"):
        import_weights(path, build_model("sdxl"))


def test_a_lora_layer_that_does_not_fit_the_model_names_the_file_and_both_shapes(tmp_path):
    model = build_model("sd15")
    base = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_q"
    save_file({f"{base}.lora_down.weight": torch.zeros(2, 48), f"{base}.lora_up.weight": torch.zeros(64, 2)},
              str(tmp_path / "odd.safetensors"))
    with pytest.raises(ErasureError, match=r"odd.safetensors: LoRA layer .*attn2_to_q' \(down \[2, 48\], up \[64, 2\]\) "
                                           r"does not fit the model \(SD15\)'s .* of shape \[64, 64\]"):
        import_weights(str(tmp_path / "odd.safetensors"), model)
