"""Fuzzing the erasure file reader: thousands of mutated and truncated files (a seeded generator, no extra
dependency). Each one either loads to a valid erasure that changes only UNet linear/conv weights, or is refused
with ErasureError; nothing else is raised, no file is changed, and no model is changed."""
import json
import random
import struct
from collections import Counter

import pytest
import torch

from comfyui_concept_erasure.erasure import ConceptErasure, ErasureError, LowRankDelta, apply_erasure, load_erasure
from comfyui_concept_erasure.erasure import write_erasure_file
from comfyui_concept_erasure.erasure.concept_erasure import PromptPatch
from tiny_models import build_model

CASES = 3000
SEED = 20240318
MID = "diffusion_model.middle_block.1.transformer_blocks.0.attn2"
CONV = "diffusion_model.input_blocks.0.0.weight"  # [32, 4, 3, 3]

HOSTILE_KEYS = ["delta.model_sampling.sigmas", "delta.diffusion_model.out.2.bias", "delta.latent_format.scale",
                f"delta.{MID}.to_q", "lora.model_sampling.sigmas.up", "delta.", "lora..up", "__metadata__x",
                "delta.diffusion_model.input_blocks.1.0.in_layers.0.weight", f"delta.{MID}.to_k.weight",
                f"lora.{MID}.to_v.weight.alpha", "prompt.k", "prompt.v", "delta.diffusion_model..weight"]
HOSTILE_VALUES = ["[" * 5000 + "]" * 5000, '{"a": NaN}', "1e999", "9" * 5000, "", "null", "[1, 2", '{"x": 1, "x": 2}',
                  "true", "yes", "-1", "0", "768", "2048", "+768", "\u0000", "x" * 70000, '["a", 1]', "{}", "[]",
                  '{"nested": ' + "[" * 40 + "]" * 40 + "}", "mid", "all", "everywhere", "1", "99999999999"]
HOSTILE_JSON = [None, True, 1, -1, 1.5, 2 ** 70, "F32", "F16", "I64", "BF16", "F8_E4M3", "U16", [], [0], [-1, 4],
                [0, 2 ** 63], [1, 2, 3], {"a": 1}, "x", [0.5, 8], [True, 8], [[1]], [2 ** 40, 2 ** 40]]
BAD_FLOATS = {"F32": [struct.pack("<f", v) for v in (float("nan"), float("inf"), 3e38, -0.0)],
              "F16": [b"\x00\x7e", b"\x00\x7c", b"\xff\x7b"], "BF16": [b"\xc0\x7f", b"\x80\x7f", b"\x7f\x7f"],
              "F64": [struct.pack("<d", v) for v in (float("nan"), float("-inf"), 1e308)]}


def seed_erasures():
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape, dtype=torch.float32: (torch.randn(*shape, generator=g) * 0.05).to(dtype)  # noqa: E731
    return [
        ConceptErasure(context_dim=768, prompt_k=rand(2, 768), prompt_v=rand(2, 768), placement="midout",
                       deltas={f"{MID}.to_k.weight": LowRankDelta(rand(64, 2), rand(2, 768), alpha=2.0),
                               CONV: rand(32, 4, 3, 3)},
                       concepts=["a cat"], method="lp", settings={"rank": 2, "nested": {"a": [1, 2]}},
                       base_model="SD15", pack_version="0.1.0", created="2025-01-01T00:00:00+00:00"),
        ConceptErasure(context_dim=768, prompt_k=rand(1, 768, dtype=torch.float16),
                       prompt_v=rand(1, 768, dtype=torch.float16), prompt_at_inference=True, method="lp_attached"),
        ConceptErasure(context_dim=768, deltas={f"{MID}.to_q.weight": rand(64, 64, dtype=torch.bfloat16),
                                                CONV: LowRankDelta(rand(32, 1), rand(1, 4, 3, 3), alpha=0.5)},
                       method="esd_x"),
    ]


def split(data):
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def join(header, body, rng):
    encoded = json.dumps(header).encode()
    length = len(encoded)
    if rng.random() < 0.1:  # a lying length prefix
        length = max(0, length + rng.choice([-9, -1, 1, 7, 2 ** 20, 2 ** 40]))
    return struct.pack("<Q", length) + encoded + body


def mutate_header(data, rng):
    header, body = split(data)
    tensors = [k for k in header if k != "__metadata__"]
    meta = header.setdefault("__metadata__", {})
    kind = rng.choice(["entry", "entry", "rename", "drop", "meta", "meta", "meta_type", "copy"])
    if kind == "entry" and tensors:
        entry = header[rng.choice(tensors)]
        entry[rng.choice(["dtype", "shape", "data_offsets"])] = rng.choice(HOSTILE_JSON)
    elif kind == "rename" and tensors:
        header[rng.choice(HOSTILE_KEYS)] = header.pop(rng.choice(tensors))
    elif kind == "drop" and tensors:
        del header[rng.choice(tensors)]
    elif kind == "meta":
        field = rng.choice(["settings", "concepts", "context_dim", "prompt_tokens", "placement",
                            "prompt_at_inference", "concept_erasure.format", "method", "base_model"])
        if rng.random() < 0.2:
            meta.pop(field, None)
        else:
            meta[field] = rng.choice(HOSTILE_VALUES)
    elif kind == "meta_type":
        meta[rng.choice(list(meta) or ["x"])] = rng.choice(HOSTILE_JSON)
    elif kind == "copy" and tensors:  # a second name for the same bytes
        header[rng.choice(HOSTILE_KEYS)] = dict(header[rng.choice(tensors)])
    return join(header, body, rng)


def poison_data(data, rng):
    header, body = split(data)
    tensors = [k for k in header if k != "__metadata__"]
    if not tensors:
        return data
    entry = header[rng.choice(tensors)]
    start, end = entry["data_offsets"]
    pattern = rng.choice(BAD_FLOATS[entry["dtype"]])
    if end - start < len(pattern):
        return data
    at = start + rng.randrange((end - start) // len(pattern)) * len(pattern)
    body = body[:at] + pattern + body[at + len(pattern):]
    return join(header, body, random.Random(0))


def mutate(data, rng):
    """One random mutation of a valid file; returns (kind, bytes)."""
    (n,) = struct.unpack("<Q", data[:8])
    kind = rng.choice(["truncate", "flip", "flip", "insert", "delete", "length", "header", "header", "header",
                       "data", "data"])
    if kind == "truncate":
        return kind, data[:rng.randrange(len(data))]
    if kind == "flip":
        out = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            at = rng.randrange(min(8 + n, len(out)) if rng.random() < 0.7 else len(out))
            out[at] = rng.randrange(256)
        return kind, bytes(out)
    if kind == "insert":
        at = rng.randrange(len(data))
        return kind, data[:at] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 16))) + data[at:]
    if kind == "delete":
        at = rng.randrange(len(data))
        return kind, data[:at] + data[at + rng.randint(1, 16):]
    if kind == "length":
        value = rng.choice([0, 1, 2, n - 1, n + 1, n * 2, 2 ** 31, 2 ** 64 - 1, rng.randrange(2 ** 64)])
        return kind, struct.pack("<Q", value) + data[8:]
    if kind == "header":
        return kind, mutate_header(data, rng)
    return kind, poison_data(data, rng)


def allowed_keys(model):
    unet = model.model.diffusion_model
    return {f"diffusion_model.{name}.weight" for name, m in unet.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def check_loaded(erasure, model, allowed):
    """A loaded erasure is valid and, applied, patches nothing but UNet linear/conv weights and the prompt."""
    erasure.validate()
    assert all(k.startswith("diffusion_model.") and k.endswith(".weight") for k in erasure.deltas)
    try:
        patched = apply_erasure(model, erasure, attach_prompt=True)
    except ErasureError:
        return "loaded, refused by the model"
    assert set(patched.patches) <= allowed
    assert not patched.object_patches
    attn2 = patched.model_options["transformer_options"].get("patches", {}).get("attn2_patch", [])
    assert all(isinstance(p, PromptPatch) for p in attn2)
    return "loaded and applied"


@pytest.mark.parametrize("cases", [CASES], ids=[f"{CASES} files"])
def test_fuzzed_files_load_or_are_refused(tmp_path, cases):
    model = build_model("sd15")
    allowed = allowed_keys(model)
    state = {k: v.clone() for k, v in model.model.state_dict().items()}
    options = repr(model.model_options)
    seeds = []
    for i, erasure in enumerate(seed_erasures()):
        path = tmp_path / f"seed{i}.safetensors"
        write_erasure_file(erasure, str(path))
        seeds.append(path.read_bytes())
    rng = random.Random(SEED)
    path = tmp_path / "fuzzed.safetensors"
    outcomes, failures = Counter(), []
    for case in range(cases):
        data = rng.choice(seeds)
        kinds = []
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            try:
                kind, data = mutate(data, rng)
            except (ValueError, struct.error, KeyError, TypeError, IndexError, AttributeError):
                # the previous mutation broke the layout this one edits: cut the file instead
                kind, data = "truncate", data[:rng.randrange(len(data) + 1)]
            kinds.append(kind)
        path.write_bytes(data)
        try:
            outcome = check_loaded(load_erasure(str(path)), model, allowed)
        except ErasureError as e:
            outcome = "refused"
            if path.name not in str(e):
                failures.append((case, kinds, f"message does not name the file: {e}"))
        except Exception as e:  # noqa: BLE001 - this is what the test looks for
            outcome = "crashed"
            failures.append((case, kinds, f"{type(e).__name__}: {e}"[:300]))
        outcomes[outcome] += 1
        if path.read_bytes() != data:
            failures.append((case, kinds, "the file changed"))
        if model.patches or repr(model.model_options) != options:
            failures.append((case, kinds, "the input model changed"))
            break
    print(f"fuzzed {cases} files (seed {SEED}): " + ", ".join(f"{v} {k}" for k, v in sorted(outcomes.items())))
    assert not failures, failures[:5]
    assert all(torch.equal(state[k], v) for k, v in model.model.state_dict().items())
    assert outcomes["refused"] > cases // 2 and outcomes["loaded and applied"] > 0
