"""Writes the embedded default model: a tiny random Llama (bf16) beside the embedded tokenizer.

    python tools/make_tiny_model.py        # -> src/qlora_fsdp/assets/tiny/{config.json, model.safetensors, ...}

Deterministic (seed 0). The weights are random: the LoRA adapter learns the task on top of a frozen NF4
copy of them, which is what the default `qlora-fsdp train` run demonstrates.
"""

from pathlib import Path

import torch
import transformers

ASSETS = Path(__file__).resolve().parents[1] / "src" / "qlora_fsdp" / "assets" / "tiny"


def main() -> None:
    tok = transformers.AutoTokenizer.from_pretrained(ASSETS)
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(ASSETS)
    print(f"wrote {ASSETS}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")


if __name__ == "__main__":
    main()
