"""Writes the embedded default model: a tiny Llama (bf16) beside the embedded tokenizer and task.

    python tools/make_tiny_model.py [--steps 3000]   # -> src/qlora_fsdp/assets/tiny/{config.json, model.safetensors}

The base is pretrained (all weights, a few minutes on a CPU) on two of the embedded task's three kinds,
reversing and sorting letters, never on giving the last letter, with freshly drawn words (none of the held-out
set's). The default `qlora-fsdp train` run then freezes it in NF4 and trains a LoRA adapter on all three kinds: the
adapter learns the kind the base never saw.
Deterministic for a given torch version (seed 0).
"""

import argparse
import json
import math
import random
import string
from pathlib import Path

import torch
import transformers

import datasets

from qlora_fsdp.data import Batcher, tokenize_dataset

ASSETS = Path(__file__).resolve().parents[1] / "src" / "qlora_fsdp" / "assets" / "tiny"


def pretraining_corpus(n: int, seed: int = 0) -> datasets.Dataset:
    """n reverse/sort instruction examples on random words absent from the held-out set."""
    held_out = {json.loads(line)["input"] for line in (ASSETS / "eval.jsonl").read_text().splitlines()}
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))
        if word in held_out:
            continue
        if rng.random() < 0.5:
            rows.append({"instruction": "Reverse the word.", "input": word, "output": word[::-1]})
        else:
            rows.append({"instruction": "Sort the letters.", "input": word, "output": "".join(sorted(word))})
    return datasets.Dataset.from_list(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()
    tok = transformers.AutoTokenizer.from_pretrained(ASSETS)
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    data = tokenize_dataset(pretraining_corpus(args.steps * 32), tok, max_length=96, completion_only=True)
    batches = Batcher(data, packing=False, batch_size=32, pad_token_id=tok.pad_token_id, seed=0).forever()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    model.train()
    for step in range(1, args.steps + 1):
        b = next(batches)
        loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0:
            print(f"step {step}: loss {loss.item():.4f}", flush=True)
    model = model.to(torch.bfloat16).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(ASSETS)
    print(f"wrote {ASSETS}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")


if __name__ == "__main__":
    main()
