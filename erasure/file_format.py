"""The erasure file: safetensors only, settings in the header, validated before any model is touched.

Tensors:
  prompt.k, prompt.v                     [tokens, context_dim]
  delta.<model key>                      full weight delta
  lora.<model key>.up / .down / .alpha   low-rank delta (alpha is a 0-d tensor)
Header metadata (all strings): see _METADATA_FIELDS; structured values are JSON.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Dict, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .concept_erasure import ConceptErasure, ErasureError, LowRankDelta
from .version import FORMAT_VERSION

FORMAT_KEY = "concept_erasure.format"
# Limits for files from strangers: far above what any erasure of an SDXL-size UNet needs (an esd_u LoRA on every
# layer has a header of about 1 MB).
_MAX_HEADER = 16 * 1024 * 1024
_MAX_METADATA = 1024 * 1024
_MAX_JSON_DEPTH = 32
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
                "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


def _metadata(erasure: ConceptErasure) -> Dict[str, str]:
    return {
        FORMAT_KEY: FORMAT_VERSION,
        "concepts": json.dumps(erasure.concepts),
        "method": erasure.method,
        "settings": json.dumps(erasure.settings, sort_keys=True),
        "base_model": erasure.base_model,
        "context_dim": str(erasure.context_dim),
        "prompt_tokens": str(erasure.token_count),
        "placement": erasure.placement,
        "prompt_at_inference": "true" if erasure.prompt_at_inference else "false",
        "pack_version": erasure.pack_version,
        "created": erasure.created,
    }


PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _stored(key: str, tensor: torch.Tensor, dtype) -> torch.Tensor:
    if dtype is None or tensor.dtype == dtype:
        return tensor
    out = tensor.to(dtype)
    if not bool(torch.isfinite(out).all()) and bool(torch.isfinite(tensor).all()):
        raise ErasureError(f"delta {key!r} does not fit {dtype} (largest magnitude {float(tensor.abs().max()):g}); "
                           "save with precision fp32 or bf16")
    return out


def erasure_tensors(erasure: ConceptErasure, precision: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """The file's tensors. `precision` (fp16 / bf16 / fp32) stores the weight deltas in that dtype; None keeps each
    tensor's own dtype. Prompt tokens are always stored as they are (a few KB, and the key must stay exact)."""
    dtype = PRECISIONS[precision] if precision else None
    tensors: Dict[str, torch.Tensor] = {}
    if erasure.has_prompt:
        tensors["prompt.k"] = erasure.prompt_k
        tensors["prompt.v"] = erasure.prompt_v
    for key, delta in erasure.deltas.items():
        if isinstance(delta, LowRankDelta):
            tensors[f"lora.{key}.up"] = _stored(key, delta.up, dtype)
            tensors[f"lora.{key}.down"] = _stored(key, delta.down, dtype)
            # float64, so the Python float comes back exactly
            tensors[f"lora.{key}.alpha"] = torch.tensor(float(delta.alpha), dtype=torch.float64)
        else:
            tensors[f"delta.{key}"] = _stored(key, delta, dtype)
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def write_erasure_file(erasure: ConceptErasure, path: str, precision: Optional[str] = None) -> None:
    """Write to exactly `path` (the caller chooses a fresh name; see folders.save_erasure)."""
    save_file(erasure_tensors(erasure, precision), path, metadata=_metadata(erasure))


_PICKLE_STARTS = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def _looks_like_pickle(head: bytes) -> bool:
    # A pickle's third byte is an opcode, never 0; a safetensors header length of 640, 896, ... starts with the
    # same two bytes, followed by zeros.
    return head[:4] == b"PK\x03\x04" or (head[:2] in _PICKLE_STARTS and head[2:3] not in (b"", b"\x00"))


def _json(text: str, what: str):
    """Strict JSON: no duplicate keys, no NaN / Infinity, nesting at most _MAX_JSON_DEPTH levels."""
    def no_constants(token):
        raise ValueError(f"{token} is not JSON")

    def unique(pairs):
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise ValueError(f"duplicate key {next(k for k in keys if keys.count(k) > 1)!r}")
        return dict(pairs)

    try:
        value = json.loads(text, parse_constant=no_constants, object_pairs_hook=unique)
    except RecursionError:
        raise ValueError(f"{what} is nested too deeply") from None
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > _MAX_JSON_DEPTH:
            raise ValueError(f"{what} is nested more than {_MAX_JSON_DEPTH} levels deep")
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children)
    return value


def _read_header(path: str) -> dict:
    name = os.path.basename(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            header_len = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            fits = header_len is not None and header_len <= min(_MAX_HEADER, size - 8)
            raw = f.read(header_len) if fits else b""
    except OSError as e:
        raise ErasureError(f"{name}: cannot read the file ({e.strerror or e})") from e
    if not raw.startswith(b"{"):
        if _looks_like_pickle(head):
            raise ErasureError(
                f"{name}: this is a pickle / PyTorch checkpoint renamed to .safetensors; only real safetensors "
                "files are loaded (pickle files can run code when loaded)")
        if header_len is None:
            raise ErasureError(f"{name}: not a safetensors file (only {size} bytes)")
        if _MAX_HEADER < header_len <= size - 8:
            raise ErasureError(f"{name}: the safetensors header is {header_len} bytes; erasure files are refused "
                               f"above {_MAX_HEADER} bytes")
        if not fits:
            raise ErasureError(f"{name}: not a safetensors file, or truncated (header length {header_len} "
                               f"does not fit a {size}-byte file)")
    try:
        header = _json(raw.decode("utf-8"), "the header")
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise ErasureError(f"{name}: not a safetensors file (unreadable header: {e})") from e
    data_len = size - 8 - header_len
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            start, end = (_whole(o) for o in info["data_offsets"])
            dtype, shape = info["dtype"], info["shape"]
            if not isinstance(dtype, str) or not isinstance(shape, list):
                raise TypeError(dtype)
            count = 1
            for dim in shape:
                count *= _whole(dim)
        except (KeyError, TypeError, ValueError) as e:
            raise ErasureError(f"{name}: not a valid safetensors file (bad entry for tensor {key!r})") from e
        if dtype not in _FLOAT_DTYPES:
            raise ErasureError(f"{name}: tensor {key!r} has dtype {dtype}; erasure tensors must be "
                               f"floating point ({', '.join(sorted(_FLOAT_DTYPES))})")
        expected = count * _DTYPE_BYTES[dtype]
        if end > data_len:
            raise ErasureError(f"{name}: the file is truncated (tensor {key!r} ends at byte {end} of the data, "
                               f"but only {data_len} bytes are present)")
        if end - start != expected:
            raise ErasureError(f"{name}: tensor {key!r} has {end - start} bytes for shape {info['shape']} "
                               f"{info['dtype']} (expected {expected})")
    return header


def _whole(value) -> int:
    """A JSON number that is a whole number of at least 0 (offsets, sizes)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(value)
    return value


def _count(meta: dict, field: str, default: str = None) -> int:
    text = meta.get(field, default)
    if text is None:
        raise KeyError(field)
    if not (text.isascii() and text.isdigit() and len(text) <= 9):
        raise ValueError(f"{field} must be a whole number, got {text[:40]!r}")
    return int(text)


def _parse_metadata(name: str, meta) -> dict:
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ErasureError(f"{name}: not a valid safetensors file (its __metadata__ must map strings to strings)")
    if meta.get(FORMAT_KEY) is None:
        raise ErasureError(f"{name}: not a concept erasure file (no {FORMAT_KEY!r} in its metadata); "
                           "LoRA or checkpoint files go in their own loaders")
    if meta[FORMAT_KEY] != FORMAT_VERSION:
        raise ErasureError(f"{name}: erasure format {meta[FORMAT_KEY][:40]!r} is not supported by this version "
                           f"(supports {FORMAT_VERSION!r}); update the pack")
    meta_size = sum(len(k.encode()) + len(v.encode()) for k, v in meta.items())
    if meta_size > _MAX_METADATA:
        raise ErasureError(f"{name}: the metadata is {meta_size} bytes; erasure files are refused above "
                           f"{_MAX_METADATA} bytes of metadata")
    flag = meta.get("prompt_at_inference", "false")
    if flag not in ("true", "false"):
        raise ErasureError(f"{name}: bad erasure metadata (prompt_at_inference must be 'true' or 'false', "
                           f"got {flag[:40]!r})")
    try:
        parsed = {
            "concepts": _json(meta.get("concepts", "[]"), "concepts"),
            "method": meta.get("method", ""),
            "settings": _json(meta.get("settings", "{}"), "settings"),
            "base_model": meta.get("base_model", ""),
            "context_dim": _count(meta, "context_dim"),
            "prompt_tokens": _count(meta, "prompt_tokens", "0"),
            "placement": meta.get("placement", "mid"),
            "prompt_at_inference": flag == "true",
            "pack_version": meta.get("pack_version", ""),
            "created": meta.get("created", ""),
        }
    except KeyError as e:
        raise ErasureError(f"{name}: bad erasure metadata (missing {e})") from e
    except ValueError as e:
        raise ErasureError(f"{name}: bad erasure metadata ({e})") from e
    if not isinstance(parsed["concepts"], list) or not all(isinstance(c, str) for c in parsed["concepts"]):
        raise ErasureError(f"{name}: bad erasure metadata (concepts must be a JSON list of strings)")
    if not isinstance(parsed["settings"], dict):
        raise ErasureError(f"{name}: bad erasure metadata (settings must be a JSON object)")
    if parsed["context_dim"] == 0:
        raise ErasureError(f"{name}: bad erasure metadata (context_dim is 0)")
    return parsed


def load_erasure(path: str) -> ConceptErasure:
    """Read and validate an erasure file. Raises ErasureError naming the file and the problem."""
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise ErasureError(f"{name}: no such erasure file ({path})")
    header = _read_header(path)
    meta = _parse_metadata(name, header.get("__metadata__", {}))
    names = [k for k in header if k != "__metadata__"]
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in names}
    except Exception as e:  # safetensors raises its own error types
        raise ErasureError(f"{name}: cannot read tensors ({e})") from e

    prompt_k, prompt_v = tensors.pop("prompt.k", None), tensors.pop("prompt.v", None)
    if meta["prompt_tokens"] > 0 and (prompt_k is None or prompt_v is None):
        raise ErasureError(f"{name}: metadata says {meta['prompt_tokens']} prompt tokens but tensor "
                           f"{'prompt.k' if prompt_k is None else 'prompt.v'} is missing")
    if prompt_k is not None and prompt_k.ndim == 2 and prompt_k.shape[0] != meta["prompt_tokens"]:
        raise ErasureError(f"{name}: prompt.k has {prompt_k.shape[0]} tokens but the metadata says "
                           f"{meta['prompt_tokens']}")

    deltas = {}
    lora: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if key.startswith("delta."):
            deltas[key[len("delta."):]] = t
        elif key.startswith("lora.") and key.count(".") >= 2 and key.rsplit(".", 1)[-1] in ("up", "down", "alpha"):
            base, part = key[len("lora."):].rsplit(".", 1)
            lora.setdefault(base, {})[part] = t
        else:
            raise ErasureError(f"{name}: unexpected tensor {key!r} (not part of the erasure format)")
    for base, parts in lora.items():
        if base in deltas:
            raise ErasureError(f"{name}: {base!r} has both a full delta and a low-rank delta; a weight has one")
        missing = [p for p in ("up", "down", "alpha") if p not in parts]
        if missing:
            raise ErasureError(f"{name}: low-rank delta for {base!r} is missing its {', '.join(missing)} tensor")
        if parts["alpha"].numel() != 1:
            raise ErasureError(f"{name}: lora.{base}.alpha must be a single number")
        deltas[base] = LowRankDelta(parts["up"], parts["down"], float(parts["alpha"].item()))

    try:
        return ConceptErasure(
            context_dim=meta["context_dim"], prompt_k=prompt_k, prompt_v=prompt_v, placement=meta["placement"],
            deltas=deltas, prompt_at_inference=meta["prompt_at_inference"], concepts=meta["concepts"],
            method=meta["method"], settings=meta["settings"], base_model=meta["base_model"],
            pack_version=meta["pack_version"], created=meta["created"])
    except ErasureError as e:
        problem = str(e)
        problem = problem[len("erasure: "):] if problem.startswith("erasure: ") else problem
        raise ErasureError(f"{name}: {problem}") from e
