"""The erasure file: exact round trips, and every kind of bad file refused with a message naming it."""
import json
import pickle
import struct

import pytest
import torch
from safetensors.torch import save_file

from comfyui_concept_erasure.erasure import ConceptErasure, ErasureError, LowRankDelta, load_erasure, write_erasure_file
from comfyui_concept_erasure.erasure.file_format import FORMAT_KEY, erasure_tensors

KEY_K = "diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight"
KEY_V = "diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_v.weight"
KEY_CONV = "diffusion_model.input_blocks.0.0.weight"


def full_erasure(dtype=torch.float32, d=768):
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    return ConceptErasure(
        context_dim=d, prompt_k=rand(3, d), prompt_v=rand(3, d), placement="midout",
        deltas={KEY_K: rand(64, d),
                KEY_V: LowRankDelta(rand(64, 4), rand(4, d), alpha=0.1),  # 0.1 is not exact in float32
                KEY_CONV: LowRankDelta(rand(32, 2), rand(2, 4, 3, 3), alpha=1.0)},
        prompt_at_inference=True, concepts=["Van Gogh", "caf\u00e9 \u00e0 Arles"], method="lp_attached",
        settings={"lr": 1e-5, "steps": 400, "nested": {"eta": 0.25, "list": [1, 2]}, "flag": None},
        base_model="SD1.5 (v1-5-pruned-emaonly)", pack_version="0.1.0", created="2025-01-02T03:04:05Z")


def assert_same_erasure(a: ConceptErasure, b: ConceptErasure):
    for field in ("context_dim", "placement", "prompt_at_inference", "concepts", "method", "settings",
                  "base_model", "pack_version", "created"):
        assert getattr(a, field) == getattr(b, field), field
    for name in ("prompt_k", "prompt_v"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and torch.equal(x, y), name
    assert a.deltas.keys() == b.deltas.keys()
    for key, x in a.deltas.items():
        y = b.deltas[key]
        assert type(x) is type(y), key
        if isinstance(x, LowRankDelta):
            assert x.alpha == y.alpha, key
            assert x.up.dtype == y.up.dtype and torch.equal(x.up, y.up), key
            assert x.down.dtype == y.down.dtype and torch.equal(x.down, y.down), key
        else:
            assert x.dtype == y.dtype and torch.equal(x, y), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_is_exact(tmp_path, dtype):
    erasure = full_erasure(dtype)
    path = tmp_path / "e.safetensors"
    write_erasure_file(erasure, str(path))
    assert_same_erasure(erasure, load_erasure(str(path)))


def test_round_trip_of_minimal_erasures(tmp_path):
    prompt_only = ConceptErasure(context_dim=1024, prompt_k=torch.randn(1, 1024), prompt_v=torch.randn(1, 1024))
    deltas_only = ConceptErasure(context_dim=2048, deltas={KEY_K: torch.randn(8, 2048, dtype=torch.float64)},
                                 placement="all")
    for i, erasure in enumerate((prompt_only, deltas_only, ConceptErasure(context_dim=768))):
        path = tmp_path / f"{i}.safetensors"
        write_erasure_file(erasure, str(path))
        assert_same_erasure(erasure, load_erasure(str(path)))


def test_metadata_is_in_the_safetensors_header(tmp_path):
    path = tmp_path / "e.safetensors"
    write_erasure_file(full_erasure(), str(path))
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    meta = json.loads(raw[8:8 + n])["__metadata__"]
    assert meta[FORMAT_KEY] == "1"
    assert json.loads(meta["concepts"]) == ["Van Gogh", "caf\u00e9 \u00e0 Arles"]
    assert meta["method"] == "lp_attached" and meta["base_model"].startswith("SD1.5")
    assert meta["context_dim"] == "768" and meta["prompt_tokens"] == "3" and meta["placement"] == "midout"


def test_writing_does_not_touch_the_erasure_tensors(tmp_path):
    erasure = full_erasure()
    shared = torch.randn(2, 768)  # P_k and P_v as views of one storage: safetensors refuses shared tensors
    erasure.prompt_k, erasure.prompt_v = shared[:1], shared[1:]
    write_erasure_file(erasure, str(tmp_path / "e.safetensors"))
    loaded = load_erasure(str(tmp_path / "e.safetensors"))
    assert torch.equal(loaded.prompt_k, shared[:1]) and torch.equal(loaded.prompt_v, shared[1:])


@pytest.mark.parametrize("header_len", [640, 896, 1152, 1408])  # begin with the bytes of a pickle's start
def test_headers_whose_length_looks_like_a_pickle_load(tmp_path, header_len):
    path = tmp_path / "e.safetensors"

    def header_length(n):  # grows by one byte per character of base_model, padded to a multiple of 8
        erasure = ConceptErasure(context_dim=8, prompt_k=torch.ones(1, 8), prompt_v=torch.ones(1, 8),
                                 base_model="x" * n)
        write_erasure_file(erasure, str(path))
        return struct.unpack("<Q", path.read_bytes()[:8])[0]

    n = max(0, header_len - header_length(0) - 8)
    while header_length(n) < header_len:
        n += 1
    assert header_length(n) == header_len
    assert load_erasure(str(path)).base_model == "x" * n


# --- bad files ---------------------------------------------------------------------------------------------


def good_file(tmp_path, name="good.safetensors"):
    path = tmp_path / name
    write_erasure_file(full_erasure(), str(path))
    return path


def raw_file(tmp_path, name, tensors, metadata):
    path = tmp_path / name
    save_file(tensors, str(path), metadata=metadata)
    return path


def meta(**changes):
    base = {FORMAT_KEY: "1", "context_dim": "768", "prompt_tokens": "2", "placement": "mid"}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def refused(path, *fragments):
    with pytest.raises(ErasureError) as info:
        load_erasure(str(path))
    message = str(info.value)
    assert path.name in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_truncated_file_is_refused(tmp_path):
    path = good_file(tmp_path, "cut.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    refused(path, "truncated")
    path.write_bytes(data[:20])  # cut inside the header
    refused(path, "truncated")
    path.write_bytes(data[:5])
    refused(path, "not a safetensors file")


def test_non_safetensors_files_are_refused(tmp_path):
    text = tmp_path / "notes.safetensors"
    text.write_text("these are my notes about the erasure, not a tensor file")
    refused(text, "not a safetensors file")
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    refused(empty, "not a safetensors file")
    bad_json = tmp_path / "badjson.safetensors"
    bad_json.write_bytes(struct.pack("<Q", 4) + b"{no}")
    refused(bad_json, "unreadable header")
    missing = tmp_path / "missing.safetensors"
    refused(missing, "no such erasure file")


def test_pickle_renamed_to_safetensors_is_refused_without_unpickling(tmp_path):
    ran = tmp_path / "code_ran"

    class Payload:  # what a malicious pickle would do: run code when loaded
        def __reduce__(self):
            return (open, (str(ran), "w"))

    state = {"prompt.k": torch.zeros(2, 768)}
    zipped = tmp_path / "zip_checkpoint.safetensors"
    torch.save(state, str(zipped))
    refused(zipped, "pickle")
    legacy = tmp_path / "legacy_checkpoint.safetensors"
    torch.save(state, str(legacy), _use_new_zipfile_serialization=False)
    refused(legacy, "pickle")
    for protocol in (2, 4, 5):
        evil = tmp_path / f"evil{protocol}.safetensors"
        evil.write_bytes(pickle.dumps(Payload(), protocol=protocol))
        refused(evil, "pickle")
    assert not ran.exists()


def test_other_safetensors_files_are_refused(tmp_path):
    lora = raw_file(tmp_path, "some_lora.safetensors", {"lora_unet_x.lora_up.weight": torch.zeros(4, 2)},
                    {"ss_network_dim": "2"})
    refused(lora, "not a concept erasure file")
    no_meta = raw_file(tmp_path, "no_meta.safetensors", {"prompt.k": torch.zeros(2, 768)}, None)
    refused(no_meta, "not a concept erasure file")
    future = raw_file(tmp_path, "future.safetensors", {}, meta(**{FORMAT_KEY: "9"}))
    refused(future, "'9'", "not supported")


@pytest.mark.parametrize("tensors,changes,fragments", [
    ({"prompt.k": torch.zeros(2, 1024), "prompt.v": torch.zeros(2, 1024)}, {}, ["[tokens, 768]", "[2, 1024]"]),
    ({"prompt.k": torch.zeros(2, 768), "prompt.v": torch.zeros(3, 768)}, {}, ["P_k [2, 768]", "P_v [3, 768]"]),
    ({"prompt.k": torch.zeros(3, 768), "prompt.v": torch.zeros(3, 768)}, {}, ["3 tokens", "metadata says 2"]),
    ({"prompt.k": torch.zeros(768), "prompt.v": torch.zeros(768)}, {"prompt_tokens": "0"}, ["[tokens, 768]"]),
    ({"prompt.k": torch.zeros(2, 768)}, {}, ["prompt.v", "missing"]),
    ({}, {}, ["prompt.k", "missing"]),
    ({"lora.w.up": torch.zeros(8, 4), "lora.w.down": torch.zeros(3, 16), "lora.w.alpha": torch.tensor(1.0)},
     {"prompt_tokens": "0"}, ["low-rank delta for w", "[8, 4]", "[3, 16]"]),
    ({"lora.w.up": torch.zeros(8, 4), "lora.w.down": torch.zeros(4, 16)}, {"prompt_tokens": "0"},
     ["'w'", "missing its alpha"]),
    ({"lora.w.up": torch.zeros(8, 4), "lora.w.down": torch.zeros(4, 16), "lora.w.alpha": torch.zeros(2)},
     {"prompt_tokens": "0"}, ["alpha must be a single number"]),
    ({"weights.w": torch.zeros(2)}, {"prompt_tokens": "0"}, ["unexpected tensor 'weights.w'"]),
    ({"lora.up": torch.zeros(2)}, {"prompt_tokens": "0"}, ["unexpected tensor 'lora.up'"]),
    ({}, {"placement": "everywhere", "prompt_tokens": "0"}, ["placement", "'everywhere'"]),
    ({}, {"context_dim": None}, ["metadata", "context_dim"]),
    ({}, {"context_dim": "wide"}, ["metadata", "wide"]),
    ({}, {"concepts": "[oops", "prompt_tokens": "0"}, ["metadata"]),
    ({}, {"concepts": "\"a string\"", "prompt_tokens": "0"}, ["concepts must be a JSON list"]),
    ({}, {"settings": "[1]", "prompt_tokens": "0"}, ["settings must be a JSON object"]),
], ids=["prompt-width", "prompt-k-v-differ", "token-count", "prompt-1d", "no-prompt-v", "no-prompt", "lora-rank",
        "lora-no-alpha", "lora-alpha-shape", "stray-tensor", "lora-no-key", "placement", "no-context-dim",
        "context-dim-text", "concepts-json", "concepts-type", "settings-type"])
def test_inconsistent_contents_are_refused(tmp_path, tensors, changes, fragments):
    refused(raw_file(tmp_path, "inconsistent.safetensors", tensors, meta(**changes)), *fragments)


@pytest.mark.parametrize("tensor,fragment", [
    (torch.zeros(2, 768, dtype=torch.int64), "I64"),
    (torch.zeros(2, 768, dtype=torch.uint8), "U8"),
    (torch.zeros(2, 768, dtype=torch.bool), "BOOL"),
    (torch.zeros(2, 768, dtype=torch.uint16), "U16"),
])
def test_non_float_tensors_are_refused(tmp_path, tensor, fragment):
    path = raw_file(tmp_path, "ints.safetensors", {"prompt.k": tensor, "prompt.v": torch.zeros(2, 768)}, meta())
    refused(path, "'prompt.k'", fragment, "floating point")


def edit_header(path, edit):
    """Rewrite a file's JSON header in place (data unchanged), as a corrupted or hand-made file would be."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + n:])


def test_corrupt_headers_are_refused(tmp_path):
    path = good_file(tmp_path, "corrupt.safetensors")
    edit_header(path, lambda h: h["prompt.k"].update(shape=[4, 768]))
    refused(path, "'prompt.k'", "expected")
    path = good_file(tmp_path, "corrupt2.safetensors")
    edit_header(path, lambda h: h["prompt.k"].pop("dtype"))
    refused(path, "'prompt.k'", "not a valid safetensors file")
    path = good_file(tmp_path, "corrupt3.safetensors")
    edit_header(path, lambda h: h.update(__metadata__="text"))
    refused(path, "__metadata__")
    path = good_file(tmp_path, "corrupt4.safetensors")
    edit_header(path, lambda h: h["__metadata__"].update(context_dim=768))
    refused(path, "__metadata__")


def test_failed_writes_raise_before_creating_the_file(tmp_path):
    erasure = full_erasure()
    erasure.deltas[KEY_K] = torch.empty(64, 768, device="meta")  # no data to write
    path = tmp_path / "e.safetensors"
    with pytest.raises(Exception):
        write_erasure_file(erasure, str(path))
    assert not path.exists()


def test_tensor_names_follow_the_documented_layout():
    assert set(erasure_tensors(full_erasure())) == {
        "prompt.k", "prompt.v", f"delta.{KEY_K}", f"lora.{KEY_V}.up", f"lora.{KEY_V}.down", f"lora.{KEY_V}.alpha",
        f"lora.{KEY_CONV}.up", f"lora.{KEY_CONV}.down", f"lora.{KEY_CONV}.alpha"}


# --- hostile files: nothing that could change more than the UNet loads; nothing is silently accepted ---------

MID_Q = "diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_q.weight"  # [64, 64] in the tiny sd15


@pytest.fixture(scope="module")
def tiny_sd15():
    from tiny_models import build_model
    return build_model("sd15")


def model_snapshot(model):
    sampling = model.get_model_object("model_sampling")
    return ({k: v.clone() for k, v in model.model.state_dict().items()}, repr(model.model_options),
            dict(model.patches), (float(sampling.sigma_min), float(sampling.sigma_max)))


def assert_same_model(model, snapshot):
    state, options, patches, sigmas = snapshot
    now = model_snapshot(model)
    assert now[1:] == (options, patches, sigmas)
    assert all(torch.equal(state[k], now[0][k]) for k in state)


def refused_untouched(path, model, *fragments):
    """The file is refused naming it and the problem; the file on disk and the model are as before."""
    data, snapshot = path.read_bytes(), model_snapshot(model)
    message = refused(path, *fragments)
    assert path.read_bytes() == data
    assert_same_model(model, snapshot)
    return message


def test_a_delta_outside_the_unet_is_refused_naming_it(tmp_path, tiny_sd15):
    # The reproduced attack: a "delta" for the sampling schedule moved sigma min/max 0.029/14.61 -> 5.03/19.61.
    attack = raw_file(tmp_path, "schedule.safetensors", {"delta.model_sampling.sigmas": torch.full((1000,), 5.0)},
                      meta(prompt_tokens="0"))
    message = refused_untouched(attack, tiny_sd15, "'model_sampling.sigmas'", "not a UNet weight")
    print(message)
    for key in ("diffusion_model.out.2.bias", "first_stage_model.decoder.conv_in.weight",
                "diffusion_model..weight", "diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_q"):
        path = raw_file(tmp_path, "other.safetensors", {f"delta.{key}": torch.zeros(2, 2)}, meta(prompt_tokens="0"))
        refused_untouched(path, tiny_sd15, repr(key), "linear and convolution layers")
    lora = raw_file(tmp_path, "lora_schedule.safetensors", {
        "lora.model_sampling.sigmas.up": torch.ones(1000, 1), "lora.model_sampling.sigmas.down": torch.ones(1, 1),
        "lora.model_sampling.sigmas.alpha": torch.tensor(1.0)}, meta(prompt_tokens="0"))
    refused_untouched(lora, tiny_sd15, "'model_sampling.sigmas'", "not a UNet weight")


BAD_VALUES = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


@pytest.mark.parametrize("where", ["prompt.k", "prompt.v", "delta", "lora.up", "lora.down"])
@pytest.mark.parametrize("value", list(BAD_VALUES))
def test_nan_and_inf_tensors_are_refused(tmp_path, tiny_sd15, where, value):
    tensors = {"prompt.k": torch.ones(2, 768), "prompt.v": torch.ones(2, 768), f"delta.{MID_Q}": torch.zeros(64, 64),
               f"lora.{MID_ATTN_K}.up": torch.zeros(64, 2), f"lora.{MID_ATTN_K}.down": torch.zeros(2, 768),
               f"lora.{MID_ATTN_K}.alpha": torch.tensor(2.0, dtype=torch.float64)}
    name = {"delta": f"delta.{MID_Q}", "lora.up": f"lora.{MID_ATTN_K}.up",
            "lora.down": f"lora.{MID_ATTN_K}.down"}.get(where, where)
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[7] = BAD_VALUES[value]
    path = raw_file(tmp_path, f"{value}.safetensors", tensors, meta())
    refused_untouched(path, tiny_sd15, "1 NaN or infinite value", {"prompt.k": "P_k", "prompt.v": "P_v"}.get(
        where, MID_Q if where == "delta" else MID_ATTN_K))


MID_ATTN_K = "diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight"  # [64, 768]


@pytest.mark.parametrize("alpha,up,fragments", [
    (float("nan"), 1.0, ["alpha nan", "finite number"]),
    (float("inf"), 1.0, ["alpha inf", "finite number"]),
    (1.0, 1e30, ["overflows float32"]),  # finite factors whose product is not
], ids=["alpha-nan", "alpha-inf", "product-overflows"])
def test_low_rank_alpha_and_overflowing_products_are_refused(tmp_path, tiny_sd15, alpha, up, fragments):
    path = raw_file(tmp_path, "alpha.safetensors", {
        f"lora.{MID_ATTN_K}.up": torch.full((64, 2), up), f"lora.{MID_ATTN_K}.down": torch.full((2, 768), up),
        f"lora.{MID_ATTN_K}.alpha": torch.tensor(alpha, dtype=torch.float64)}, meta(prompt_tokens="0"))
    refused_untouched(path, tiny_sd15, MID_ATTN_K, *fragments)


def test_rank_zero_and_empty_deltas_are_refused_at_load(tmp_path, tiny_sd15):
    rank0 = raw_file(tmp_path, "rank0.safetensors", {
        f"lora.{MID_ATTN_K}.up": torch.zeros(64, 0), f"lora.{MID_ATTN_K}.down": torch.zeros(0, 768),
        f"lora.{MID_ATTN_K}.alpha": torch.tensor(1.0)}, meta(prompt_tokens="0"))
    refused_untouched(rank0, tiny_sd15, MID_ATTN_K, "rank 0")
    empty = raw_file(tmp_path, "empty_delta.safetensors", {f"delta.{MID_Q}": torch.zeros(0, 64)},
                     meta(prompt_tokens="0"))
    refused_untouched(empty, tiny_sd15, MID_Q, "empty")
    no_tokens = raw_file(tmp_path, "no_tokens.safetensors", {"prompt.k": torch.zeros(0, 768),
                                                             "prompt.v": torch.zeros(0, 768)}, meta(prompt_tokens="0"))
    refused_untouched(no_tokens, tiny_sd15, "0 tokens")
    many = raw_file(tmp_path, "many_tokens.safetensors", {"prompt.k": torch.zeros(1025, 8),
                                                          "prompt.v": torch.zeros(1025, 8)},
                    meta(prompt_tokens="1025", context_dim="8"))
    refused_untouched(many, tiny_sd15, "1025 tokens", "1 to 1024")


def deep(levels):
    return "[" * levels + "]" * levels


@pytest.mark.parametrize("field,value,fragments", [
    ("settings", deep(100_000), ["settings is nested too deeply"]),  # was an uncaught RecursionError
    ("concepts", deep(100_000), ["concepts is nested too deeply"]),
    ("settings", '{"a": ' + deep(40) + "}", ["settings is nested more than 32 levels"]),
    ("settings", '{"lr": NaN}', ["NaN is not JSON"]),
    ("settings", '{"lr": 1, "lr": 2}', ["duplicate key 'lr'"]),
    ("settings", '{"big": ' + "9" * 5000 + "}", ["bad erasure metadata"]),
    ("concepts", json.dumps(["x" * (1024 * 1024)]), ["metadata is", "refused above 1048576 bytes"]),
    ("prompt_at_inference", "yes", ["prompt_at_inference must be 'true' or 'false'"]),
    ("context_dim", "+768", ["context_dim must be a whole number"]),
    ("context_dim", "7_68", ["context_dim must be a whole number"]),
    ("context_dim", "0", ["context_dim is 0"]),
    ("prompt_tokens", "-1", ["prompt_tokens must be a whole number"]),
], ids=["settings-deep", "concepts-deep", "settings-40-levels", "nan-constant", "duplicate-key", "huge-int",
        "metadata-size", "flag-word", "context-dim-sign", "context-dim-underscore", "context-dim-zero",
        "negative-tokens"])
def test_hostile_metadata_is_refused(tmp_path, tiny_sd15, field, value, fragments):
    path = raw_file(tmp_path, "meta.safetensors", {}, meta(**{"prompt_tokens": "0", field: value}))
    refused_untouched(path, tiny_sd15, *fragments)


def write_raw_header(path, header_bytes, data=b""):
    path.write_bytes(struct.pack("<Q", len(header_bytes)) + header_bytes + data)
    return path


def test_hostile_headers_are_refused(tmp_path, tiny_sd15):
    huge = write_raw_header(tmp_path / "huge_header.safetensors", b"{" + b" " * (16 * 1024 * 1024) + b"}")
    refused_untouched(huge, tiny_sd15, "header is 16777218 bytes", "refused above 16777216")
    nested = write_raw_header(tmp_path / "nested_header.safetensors", ('{"x": ' + deep(100_000) + "}").encode())
    refused_untouched(nested, tiny_sd15, "nested too deeply")
    entry = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    twice = ('{"prompt.k": %s, "prompt.k": %s}' % (json.dumps(entry), json.dumps(entry))).encode()
    refused_untouched(write_raw_header(tmp_path / "twice.safetensors", twice, bytes(8)), tiny_sd15,
                      "duplicate key 'prompt.k'")
    for bad in ({"data_offsets": [-8, 0]}, {"data_offsets": [0.0, 8.0]}, {"shape": "2"}, {"shape": [True, 2]}):
        header = json.dumps({"prompt.k": {**entry, **bad}}).encode()
        refused_untouched(write_raw_header(tmp_path / "bad_entry.safetensors", header, bytes(8)), tiny_sd15,
                          "bad entry for tensor 'prompt.k'")


def test_a_weight_with_both_a_full_and_a_low_rank_delta_is_refused(tmp_path, tiny_sd15):
    path = raw_file(tmp_path, "both.safetensors", {
        f"delta.{MID_ATTN_K}": torch.zeros(64, 768), f"lora.{MID_ATTN_K}.up": torch.zeros(64, 2),
        f"lora.{MID_ATTN_K}.down": torch.zeros(2, 768), f"lora.{MID_ATTN_K}.alpha": torch.tensor(1.0)},
        meta(prompt_tokens="0"))
    refused_untouched(path, tiny_sd15, MID_ATTN_K, "both a full delta and a low-rank delta")
