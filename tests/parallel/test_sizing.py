"""The memory report's bytes at rest against the bytes the loaded objects really hold."""

import torch
import transformers

from qlora_fsdp.model import load_model
from qlora_fsdp.nf4.tensor import NF4Tensor
from qlora_fsdp.parallel.sizing import bytes_at_rest, format_report, llama_3_1_8b_config


def test_one_rank_equals_the_loaded_model(tmp_path):
    config = transformers.LlamaConfig(vocab_size=104, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype=torch.bfloat16, device="cpu")
    held = sum(p.nf4.nbytes() if isinstance(p, NF4Tensor) else p.numel() * p.element_size() for p in model.parameters())
    assert bytes_at_rest(config, 1)["base"] == held
    lora = sum(4 * 16 * (p.shape[0] + p.shape[1]) for p in model.parameters() if isinstance(p, NF4Tensor))
    assert bytes_at_rest(config, 1, lora_r=16)["lora"] == lora


def test_llama_8b_report_splits_over_ranks():
    one, eight = bytes_at_rest(llama_3_1_8b_config(), 1), bytes_at_rest(llama_3_1_8b_config(), 8)
    assert 5.2 < one["base"] / 2**30 < 5.4  # 4-bit linears + 16-bit embeddings and lm_head
    assert abs(eight["total"] * 8 - one["total"]) < 8 * 4 * 224  # only the 224 offsets are replicated
    assert "ranks" in format_report(llama_3_1_8b_config(), (1, 2))
