"""load_model on tiny checkpoints made here: same logits as transformers + bitsandbytes, bit-exact imports."""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

from qlora_fsdp.model import ModelLoadError, load_model
from qlora_fsdp.nf4 import nf4_from_state_dict
from qlora_fsdp.nf4.tensor import NF4Tensor

bnb = pytest.importorskip("bitsandbytes")

# in_features multiples of 64: bitsandbytes' CPU Linear4bit needs it
LLAMA = dict(vocab_size=128, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
ARCHS = {
    "llama": lambda: transformers.LlamaConfig(**LLAMA),
    "qwen2": lambda: transformers.Qwen2Config(**LLAMA, tie_word_embeddings=True),  # q/k/v biases, tied lm_head
    "mistral": lambda: transformers.MistralConfig(**LLAMA),
}
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def bnb_config():
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)  # fmt: skip


def hf_bnb_model(path):
    """transformers + bitsandbytes on CPU, on its portable path (its AVX-512 path rounds the absmax to bf16)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb_config(), device_map="cpu",
                                                              dtype=torch.bfloat16)  # fmt: skip
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    return model


@pytest.fixture(scope="module", params=sorted(ARCHS))
def checkpoints(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(ARCHS[request.param]()).to(torch.bfloat16)
    model.save_pretrained(tmp / "bf16", max_shard_size="100KB")  # several shards + an index
    q = hf_bnb_model(tmp / "bf16")
    q.save_pretrained(tmp / "nf4")  # before any forward: the CPU forward repacks the weights
    return request.param, tmp


def test_16bit_checkpoint_matches_transformers_bitsandbytes(checkpoints):
    arch, tmp = checkpoints
    assert (tmp / "bf16" / "model.safetensors.index.json").is_file()
    ours = load_model(tmp / "bf16", dtype=torch.bfloat16, device="cpu")
    assert isinstance(ours, transformers.PreTrainedModel)
    layer = ours.model.layers[1]
    for name in PROJ:
        w = layer.get_submodule(("self_attn." if "_proj" in name and name[0] in "qkvo" else "mlp.") + name).weight
        assert isinstance(w, NF4Tensor), name
    assert not isinstance(ours.lm_head.weight, NF4Tensor) and not isinstance(ours.model.embed_tokens.weight, NF4Tensor)
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, hf_bnb_model(tmp / "bf16")(ids).logits)


def test_prequantized_checkpoint_imports_bit_exact(checkpoints):
    arch, tmp = checkpoints
    ours = load_model(tmp / "nf4", dtype=torch.bfloat16, device="cpu")
    sd = load_file(tmp / "nf4" / "model.safetensors")
    key = "model.layers.0.mlp.down_proj.weight"
    stored = nf4_from_state_dict(sd, key)
    w = ours.get_parameter(key).nf4
    assert torch.equal(w.data, stored.data) and torch.equal(w.absmax, stored.absmax)
    assert torch.equal(w.nested_absmax, stored.nested_absmax) and torch.equal(w.offset, stored.offset)
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, load_model(tmp / "bf16", device="cpu")(ids).logits)
        assert torch.equal(ours(ids).logits, hf_bnb_model(tmp / "nf4")(ids).logits)
    out = ours.generate(ids[:1, :4], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 8)


def test_peft_wraps_every_projection(checkpoints):
    peft = pytest.importorskip("peft")
    _, tmp = checkpoints
    model = peft.get_peft_model(load_model(tmp / "bf16", device="cpu"), peft.LoraConfig(r=4, target_modules="all-linear"))
    wrapped = [n for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.Linear)]
    assert len(wrapped) == 2 * len(PROJ)  # lm_head excluded, as peft does for "all-linear"


def test_errors(tmp_path, checkpoints):
    _, tmp = checkpoints
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(tmp_path / "nope", device="cpu")
    bad = tmp_path / "fp4"
    bad.mkdir()
    cfg = json.loads((tmp / "nf4" / "config.json").read_text())
    cfg["quantization_config"]["bnb_4bit_quant_type"] = "fp4"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="fp4' is not supported"):
        load_model(bad, device="cpu")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((tmp / "bf16" / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="no model.safetensors"):
        load_model(empty, device="cpu")


def test_random_model_has_the_shape_nf4_linears_and_is_reproducible():
    import transformers

    from qlora_fsdp.model import random_model

    config = transformers.LlamaConfig(vocab_size=100, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    a, b = (random_model(config, dtype=torch.float32, device="cpu", seed=3) for _ in range(2))
    w = a.model.layers[1].mlp.down_proj.weight
    assert isinstance(w, NF4Tensor) and tuple(w.shape) == (128, 256)
    assert torch.equal(a.model.norm.weight, torch.ones(128)) and not a.lm_head.weight.requires_grad
    assert 0.015 < w.dequantize().std() < 0.025  # N(0, 0.02) up to quantization
    ids = torch.randint(0, 100, (2, 9))
    torch.testing.assert_close(a(ids).logits, b(ids).logits, rtol=0, atol=0)


def test_the_model_can_wait_in_another_memory_than_it_is_loaded_on(checkpoints):
    """storage_device: tensors quantized on `device` and kept on `storage_device` (FSDP2 over GPUs keeps the model
    in host memory until fully_shard moves each unit to its GPU; the GPU side runs in the gate's 2gpu/smollm2-real
    path): a host-stored model is the same model, and the loop asks for it exactly for FSDP2 over GPUs."""
    from qlora_fsdp.training.loop import load_storage

    _, tmp = checkpoints
    for ckpt in ("bf16", "nf4"):
        here, there = (load_model(tmp / ckpt, dtype=torch.bfloat16, device="cpu", storage_device=s) for s in (None, "cpu"))
        key = "model.layers.1.self_attn.q_proj.weight"
        assert torch.equal(here.get_parameter(key).nf4.data, there.get_parameter(key).nf4.data)
    cuda, cpu = torch.device("cuda:1"), torch.device("cpu")  # (device objects: no GPU needed)
    assert load_storage(cuda, 2, 1) == "cpu"  # FSDP2 on GPUs
    assert load_storage(cuda, 1, 1) is None and load_storage(cuda, 4, 2) is None and load_storage(cpu, 2, 1) is None
