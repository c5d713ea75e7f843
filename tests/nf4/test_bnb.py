"""Interop with bitsandbytes objects and with 4-bit checkpoints written by transformers + bitsandbytes."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

bnb = pytest.importorskip("bitsandbytes")
bnbF = bnb.functional
transformers = pytest.importorskip("transformers")

from qlora_fsdp.nf4 import (  # noqa: E402
    NF4FormatError,
    dequantize_reference,
    nf4_from_bnb,
    nf4_from_state_dict,
    nf4_to_bnb,
    nf4_to_state_dict,
    quantize_nf4,
)
from qlora_fsdp.nf4.bnb import quant_state_key  # noqa: E402
from tests.nf4.bnb_oracle import dequantize_4bit as bnb_dequantize_4bit  # noqa: E402

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llama(tmp_path):
    # in_features are multiples of 64: bitsandbytes' AVX-512 CPU forward repacks weights and cannot take others
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    return model


def load_bnb(path, storage=torch.uint8):
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=storage,
    )  # fmt: skip
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=config, device_map="cpu", dtype=torch.bfloat16
    )


def quantized_keys(state_dict):
    return [k.removesuffix(".quant_state.bitsandbytes__nf4") for k in state_dict if k.endswith("bitsandbytes__nf4")]


@pytest.fixture(scope="module")
def bnb_checkpoint(tmp_path_factory):
    """A tiny random Llama, its bf16 checkpoint and the 4-bit checkpoint transformers + bitsandbytes write."""
    tmp = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    fp_model = tiny_llama(tmp)
    q_model = load_bnb(tmp / "bf16")
    q_model.save_pretrained(tmp / "nf4")
    return tmp, fp_model, q_model


def test_reads_transformers_checkpoint_bit_exact(bnb_checkpoint):
    tmp, fp_model, q_model = bnb_checkpoint
    sd = load_file(tmp / "nf4" / "model.safetensors")
    keys = quantized_keys(sd)
    assert len(keys) == 2 * len(PROJECTIONS)
    fp_sd = fp_model.state_dict()
    for key in keys:
        w = nf4_from_state_dict(sd, key)
        # the stored bytes are what our quantizer makes of the bf16 weight ...
        again = quantize_nf4(fp_sd[key])
        assert torch.equal(w.data, again.data) and torch.equal(w.absmax, again.absmax)
        assert torch.equal(w.nested_absmax, again.nested_absmax) and torch.equal(w.offset, again.offset)
        # ... and dequantize as bitsandbytes dequantizes the loaded module's weight
        param = q_model.get_parameter(key)
        assert torch.equal(dequantize_reference(w), bnb_dequantize_4bit(param.data, param.quant_state))


def test_written_entries_load_back_into_transformers(bnb_checkpoint, tmp_path):
    tmp, fp_model, q_model = bnb_checkpoint
    sd = load_file(tmp / "nf4" / "model.safetensors")
    rewritten = dict(sd)
    for key in quantized_keys(sd):
        for k in [k for k in rewritten if k.startswith(key + ".") or k == key]:
            del rewritten[k]
        rewritten.update(nf4_to_state_dict(nf4_from_state_dict(sd, key), key))
    assert rewritten.keys() == sd.keys()
    for k in sd:
        assert torch.equal(rewritten[k], sd[k]), k
    out = tmp_path / "rewritten"
    q_model.save_pretrained(out)
    save_file(rewritten, out / "model.safetensors", metadata={"format": "pt"})
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, device_map="cpu", dtype=torch.bfloat16)
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, q_model(ids).logits)


def test_reads_bf16_quant_storage(bnb_checkpoint, tmp_path):
    tmp, _, _ = bnb_checkpoint
    model = load_bnb(tmp / "bf16", storage=torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16_storage")
    sd_bf16 = load_file(tmp_path / "bf16_storage" / "model.safetensors")
    sd_u8 = load_file(tmp / "nf4" / "model.safetensors")
    key = "model.layers.1.mlp.down_proj.weight"
    assert sd_bf16[key].dtype == torch.bfloat16
    a, b = nf4_from_state_dict(sd_bf16, key), nf4_from_state_dict(sd_u8, key)
    assert torch.equal(a.data, b.data) and torch.equal(dequantize_reference(a), dequantize_reference(b))


@pytest.mark.parametrize("double_quant", [True, False])
def test_quant_state_round_trip(double_quant):
    w = torch.randn(48, 200, dtype=torch.float16)
    packed, qs = bnbF.quantize_4bit(w, blocksize=128, compress_statistics=double_quant, quant_type="nf4")
    ours = nf4_from_bnb(packed, qs)
    packed2, qs2 = nf4_to_bnb(ours)
    assert torch.equal(packed2, packed)
    for dtype in (torch.bfloat16, torch.float32):
        qs2.dtype = dtype
        assert torch.equal(bnb_dequantize_4bit(packed2, qs2), dequantize_reference(ours, dtype))
    # our state dict is what bitsandbytes' own serializer writes
    theirs = {"w." + k: v for k, v in qs.as_dict(packed=True).items()}
    mine = nf4_to_state_dict(ours, "w")
    mine.pop("w")
    assert mine.keys() == theirs.keys()
    for k in mine:
        assert torch.equal(mine[k], theirs[k]), k


# ------------------------------------------------------------------------------------------ bad input


@pytest.fixture
def entries():
    return nf4_to_state_dict(quantize_nf4(torch.randn(16, 64)), "layer.weight")


def test_corrupt_quant_state_json(entries):
    entries[quant_state_key("layer.weight")] = torch.tensor(list(b'{"quant_type": "nf4", "blo'), dtype=torch.uint8)
    with pytest.raises(NF4FormatError, match=r"layer.weight.quant_state.bitsandbytes__nf4: corrupt quant state"):
        nf4_from_state_dict(entries, "layer.weight")


def test_truncated_absmax(entries):
    entries["layer.weight.absmax"] = entries["layer.weight.absmax"][:-3]
    with pytest.raises(NF4FormatError, match=r"layer.weight: .*`absmax` has 13 elements, expected 16"):
        nf4_from_state_dict(entries, "layer.weight")


def test_missing_entry(entries):
    del entries["layer.weight.nested_absmax"]
    with pytest.raises(NF4FormatError, match=r"layer.weight.nested_absmax: missing from the checkpoint"):
        nf4_from_state_dict(entries, "layer.weight")


def test_shape_that_does_not_match_the_bytes(entries):
    meta = {"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [32, 64], "nested_blocksize": 256,
            "nested_dtype": "float32", "nested_offset": 0.1}  # fmt: skip
    entries[quant_state_key("layer.weight")] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    with pytest.raises(NF4FormatError, match="`data` has 512 elements, expected 1024"):
        nf4_from_state_dict(entries, "layer.weight")


def test_wrong_code_book(entries):
    entries["layer.weight.quant_map"] = entries["layer.weight.quant_map"].flip(0)
    with pytest.raises(NF4FormatError, match="not the NF4 code book"):
        nf4_from_state_dict(entries, "layer.weight")


def test_fp4_is_not_supported():
    packed, qs = bnbF.quantize_4bit(torch.randn(16, 64), quant_type="fp4")
    entries = {"l.weight": packed, **{"l.weight." + k: v for k, v in qs.as_dict(packed=True).items()}}
    with pytest.raises(NF4FormatError, match="quant type 'fp4' is not supported"):
        nf4_from_state_dict(entries, "l.weight")
    with pytest.raises(NF4FormatError, match="quant type 'fp4' is not supported"):
        nf4_from_bnb(packed, qs)
