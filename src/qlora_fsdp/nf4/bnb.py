"""Interop with bitsandbytes: its `QuantState` objects and its state-dict / safetensors key layout.

A 4-bit weight saved by transformers + bitsandbytes under the key `P` (e.g. `model.layers.0.mlp.up_proj.weight`)
is stored as

    P                                     uint8 (ceil(n/2), 1)  the packed codes (or another quant_storage dtype
                                                                 holding the same bytes)
    P.absmax                              uint8 | float32
    P.quant_map                           float32 (16,)
    P.nested_absmax, P.nested_quant_map   float32                [double quant]
    P.quant_state.bitsandbytes__nf4       uint8 JSON: quant_type, blocksize, dtype, shape,
                                          nested_blocksize, nested_dtype, nested_offset

Reading never requantizes: the bytes become an `NF4Weight` as they are. Writing produces the same keys, so
transformers and bitsandbytes load what we write. Only the state-dict functions work without bitsandbytes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import torch

from .format import FLOAT_DTYPES, NF4FormatError, NF4Weight, nf4_code

QUANT_STATE_SUFFIX = ".quant_state.bitsandbytes__"
_DTYPES = {str(d).removeprefix("torch."): d for d in FLOAT_DTYPES}


def quant_state_key(prefix: str, quant_type: str = "nf4") -> str:
    return f"{prefix}{QUANT_STATE_SUFFIX}{quant_type}"


def is_quantized_entry(state_dict: Mapping[str, object], prefix: str) -> bool:
    """True if `state_dict` holds a bitsandbytes 4-bit weight (of any quant type) under `prefix`."""
    return any(k.startswith(prefix + QUANT_STATE_SUFFIX) for k in state_dict)


def nf4_from_state_dict(state_dict: Mapping[str, torch.Tensor], prefix: str) -> NF4Weight:
    """Read the bitsandbytes entries of one weight (`prefix` = its key) into an `NF4Weight`, bit for bit.

    Raises NF4FormatError naming the key for a missing, corrupt or truncated entry, and for fp4 weights.
    """
    qs_keys = [k for k in state_dict if k.startswith(prefix + QUANT_STATE_SUFFIX)]
    if not qs_keys:
        raise NF4FormatError(f"{prefix}: no `{prefix}{QUANT_STATE_SUFFIX}nf4` entry: not a bitsandbytes 4-bit weight")
    qs_key = qs_keys[0]
    quant_type = qs_key.removeprefix(prefix + QUANT_STATE_SUFFIX)
    if quant_type != "nf4":
        raise NF4FormatError(
            f"{prefix}: quant type '{quant_type}' is not supported (only nf4); requantize the model with "
            "bnb_4bit_quant_type='nf4'"
        )
    meta = _read_meta(state_dict[qs_key], qs_key)

    def get(suffix: str) -> torch.Tensor:
        key = prefix + suffix
        if key not in state_dict:
            raise NF4FormatError(f"{key}: missing from the checkpoint (truncated or incomplete file?)")
        return state_dict[key]

    packed = get("")
    if packed.dtype != torch.uint8:  # quant_storage=bf16/fp16/fp32 etc.: the same bytes under another dtype
        packed = packed.contiguous().view(-1).view(torch.uint8)
    double_quant = "nested_blocksize" in meta or (prefix + ".nested_absmax") in state_dict
    try:
        kwargs = {}
        if double_quant:
            offset = meta.get("nested_offset")
            if not isinstance(offset, (int, float)):
                raise NF4FormatError(f"{qs_key}: `nested_offset` is missing or not a number")
            kwargs = dict(
                nested_absmax=get(".nested_absmax"),
                nested_quant_map=get(".nested_quant_map"),
                offset=torch.tensor(float(offset), dtype=torch.float32, device=packed.device),
                nested_blocksize=_int_field(meta, "nested_blocksize", qs_key),
            )
        w = NF4Weight(
            data=packed.reshape(-1),
            absmax=get(".absmax"),
            quant_map=get(".quant_map"),
            shape=torch.Size(meta["shape"]),
            dtype=meta["dtype"],
            blocksize=meta["blocksize"],
            **kwargs,
        )
    except NF4FormatError as e:
        raise NF4FormatError(f"{prefix}: {e}") from None
    if not torch.equal(w.quant_map.cpu(), nf4_code("cpu")):
        raise NF4FormatError(f"{prefix}.quant_map: not the NF4 code book (corrupt entry?)")
    return w


def _int_field(meta: dict, name: str, key: str) -> int:
    value = meta.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise NF4FormatError(f"{key}: `{name}` is missing or not a positive integer")
    return value


def _read_meta(tensor: torch.Tensor, key: str) -> dict:
    try:
        meta = json.loads(bytes(tensor.detach().cpu().to(torch.uint8).numpy()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError, RuntimeError):
        raise NF4FormatError(f"{key}: corrupt quant state (not valid JSON); re-save the checkpoint") from None
    if not isinstance(meta, dict):
        raise NF4FormatError(f"{key}: corrupt quant state (expected a JSON object)")
    if meta.get("quant_type", "nf4") != "nf4":
        raise NF4FormatError(f"{key}: quant type '{meta.get('quant_type')}' is not supported (only nf4)")
    meta["blocksize"] = _int_field(meta, "blocksize", key)
    dtype = _DTYPES.get(meta.get("dtype"))
    if dtype is None:
        raise NF4FormatError(f"{key}: `dtype` {meta.get('dtype')!r} is not one of {sorted(_DTYPES)}")
    meta["dtype"] = dtype
    shape = meta.get("shape")
    if not isinstance(shape, list) or not shape or not all(isinstance(s, int) and s > 0 for s in shape):
        raise NF4FormatError(f"{key}: `shape` {shape!r} is not a list of positive integers")
    return meta


def nf4_to_state_dict(w: NF4Weight, prefix: str) -> dict[str, torch.Tensor]:
    """The bitsandbytes entries of one weight under `prefix` (uint8 storage), ready for safetensors."""
    meta = {
        "quant_type": "nf4",
        "blocksize": w.blocksize,
        "dtype": str(w.dtype).removeprefix("torch."),
        "shape": list(w.shape),
    }
    out = {
        prefix: w.data.reshape(-1, 1),
        prefix + ".absmax": w.absmax,
        prefix + ".quant_map": w.quant_map,
    }
    if w.double_quant:
        meta.update(nested_blocksize=w.nested_blocksize, nested_dtype="float32", nested_offset=w.offset.item())
        out[prefix + ".nested_absmax"] = w.nested_absmax
        out[prefix + ".nested_quant_map"] = w.nested_quant_map.clone()
    out[quant_state_key(prefix)] = torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
    return out


def nf4_from_bnb(packed: torch.Tensor, quant_state) -> NF4Weight:
    """A `bitsandbytes.functional.QuantState` (and its packed tensor) -> `NF4Weight`, sharing the tensors."""
    if quant_state.quant_type != "nf4":
        raise NF4FormatError(f"quant type '{quant_state.quant_type}' is not supported (only nf4)")
    if packed.dtype != torch.uint8:
        packed = packed.contiguous().view(-1).view(torch.uint8)
    kwargs = {}
    if quant_state.nested:
        s2 = quant_state.state2
        kwargs = dict(
            nested_absmax=s2.absmax,
            nested_quant_map=s2.code,
            offset=quant_state.offset.reshape(()).float(),
            nested_blocksize=s2.blocksize,
        )
    return NF4Weight(
        data=packed.reshape(-1),
        absmax=quant_state.absmax,
        quant_map=quant_state.code,
        shape=quant_state.shape,
        dtype=quant_state.dtype,
        blocksize=quant_state.blocksize,
        **kwargs,
    )


def nf4_to_bnb(w: NF4Weight):
    """`NF4Weight` -> (packed (ceil(n/2), 1) uint8, `bitsandbytes.functional.QuantState`); needs bitsandbytes."""
    try:
        from bitsandbytes.functional import QuantState
    except ImportError:
        raise ImportError("nf4_to_bnb needs bitsandbytes: pip install 'qlora-fsdp[bnb]'") from None
    state2 = None
    if w.double_quant:
        state2 = QuantState(
            absmax=w.nested_absmax, code=w.nested_quant_map, blocksize=w.nested_blocksize, dtype=torch.float32
        )
    qs = QuantState(
        absmax=w.absmax,
        shape=w.shape,
        code=w.quant_map,
        blocksize=w.blocksize,
        quant_type="nf4",
        dtype=w.dtype,
        offset=w.offset,
        state2=state2,
    )
    return w.data.reshape(-1, 1), qs
