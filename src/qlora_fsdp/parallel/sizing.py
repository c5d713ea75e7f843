"""Bytes per rank at rest for QLoRA under FSDP2, computed from a model's shapes on the meta device.

    NF4 weight of n elements (blocksize B, nested N):  n/2 + n/B + 4*ceil(n/B/N)  bytes, split over the ranks,
                                                       + 4 (the double-quant offset, on every rank)
    other parameters (embeddings, norms, lm_head):     16-bit, split over the ranks
    LoRA (r on a linear (out, in)):                    r*(in + out) fp32 weights, as many fp32 gradients,
                                                       2x fp32 AdamW states, all split over the ranks
"""

from __future__ import annotations


import torch

GiB = 2**30


def nf4_nbytes(n: int, blocksize: int = 64, nested_blocksize: int = 256) -> tuple[int, int]:
    """(sharded bytes, replicated bytes) of one double-quantized NF4 weight of n elements."""
    blocks = -(-n // blocksize)
    return -(-n // 2) + blocks + 4 * -(-blocks // nested_blocksize), 4


def bytes_at_rest(config, world_size: int, lora_r: int = 16, dtype_bytes: int = 2) -> dict[str, float]:
    """{base, lora, grads, optimizer, total} bytes one rank holds, for a transformers config with LoRA on every
    linear of the decoder layers (peft's "all-linear")."""
    from transformers import AutoModelForCausalLM

    from ..model import quantizable_linears

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    targets = quantizable_linears(model)
    base = lora = 0.0
    for name, p in model.named_parameters():
        if name in targets:
            sharded, replicated = nf4_nbytes(p.numel())
            base += sharded / world_size + replicated
            out_f, in_f = p.shape
            lora += 4 * lora_r * (in_f + out_f) / world_size
        else:
            base += dtype_bytes * p.numel() / world_size
    report = {"base": base, "lora": lora, "grads": lora, "optimizer": 2 * lora}
    report["total"] = sum(report.values())
    return report


def llama_3_1_8b_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                       tie_word_embeddings=False)  # fmt: skip


def format_report(config, world_sizes=(1, 2, 4, 8), lora_r: int = 16) -> str:
    rows = [f"{'ranks':>5} {'base GiB':>9} {'LoRA GiB':>9} {'grads GiB':>9} {'AdamW GiB':>9} {'total GiB':>9}"]
    for n in world_sizes:
        r = bytes_at_rest(config, n, lora_r)
        rows.append(f"{n:>5} {r['base'] / GiB:>9.3f} {r['lora'] / GiB:>9.3f} {r['grads'] / GiB:>9.3f} "
                    f"{r['optimizer'] / GiB:>9.3f} {r['total'] / GiB:>9.3f}")  # fmt: skip
    return "\n".join(rows)


