"""Greedy generation speed with an NF4 base: dequantized per token, dequantized once with the adapter merged
(inference.dense_weights, what `generate` does), against the dense 16-bit model and bitsandbytes' 4-bit model, in one
run on one device.

    python benchmarks/generate_speed.py --model DIR|FILE.gguf|embedded [--device cpu|cuda] [--dtype bf16] [--tokens 64]

Each system answers the same prompt greedily with the same number of new tokens (eos ignored); the report gives
tokens/s, the ratio to the dense model, and whether each system's tokens equal the dense model's (NF4 per token
and once must be identical to each other: same weights, and the adapter, r=16 on all 7 projections with B = 0 as
peft initialises it, adds exactly zero whether merged or not), as in `qlora-fsdp generate`. Rows go to results.jsonl on GPUs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_results, environment  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _timed_tokens(model, ids: torch.Tensor, tokens: int, device: torch.device) -> tuple[list[int], float]:
    def once():
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                                  min_new_tokens=tokens, do_sample=False, pad_token_id=0)  # fmt: skip

    once()  # warm-up: kernels, caches
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = once()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out[0, ids.shape[1] :].tolist(), time.perf_counter() - start


def measure(model_path: str, device: str, dtype: str, tokens: int, prompt: str) -> list[dict]:
    import peft

    from qlora_fsdp.inference import dense_weights
    from qlora_fsdp.model import dequantize_model, load_model, resolve_model_dir
    from qlora_fsdp.training.batches import load_tokenizer

    dev = torch.device(device)
    tok = load_tokenizer(model_path)
    ids = tok(prompt, return_tensors="pt").input_ids.to(dev)
    nf4 = load_model(model_path, dtype=DTYPES[dtype], device=dev)
    lora = peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
    adapted = peft.get_peft_model(nf4, lora).eval()
    rows = {}
    rows["nf4, dequantized per token"] = _timed_tokens(adapted, ids, tokens, dev)
    with dense_weights(adapted, merge=True) as swapped:
        if not swapped:
            raise SystemExit("the dense copy does not fit on this device")
        rows["nf4, dequantized once"] = _timed_tokens(adapted, ids, tokens, dev)
    dense = dequantize_model(load_model(model_path, dtype=DTYPES[dtype], device=dev)).eval()
    rows["dense 16-bit (our NF4 weights)"] = _timed_tokens(dense, ids, tokens, dev)
    del dense
    try:
        import transformers

        bnb_config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                     bnb_4bit_use_double_quant=True,
                                                     bnb_4bit_compute_dtype=DTYPES[dtype])  # fmt: skip
        theirs = transformers.AutoModelForCausalLM.from_pretrained(resolve_model_dir(model_path), dtype=DTYPES[dtype],
                                                                   quantization_config=bnb_config,
                                                                   device_map={"": dev}).eval()  # fmt: skip
        rows["bitsandbytes nf4 (transformers)"] = _timed_tokens(theirs, ids, tokens, dev)
    except Exception as e:  # not installed, or no 4-bit kernels on this device
        print(f"bitsandbytes: not measured ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    dense_answer, dense_s = rows["dense 16-bit (our NF4 weights)"]
    per_token = rows["nf4, dequantized per token"][0]
    env = environment()
    out = []
    for name, (answer, seconds) in rows.items():
        row = {"bench": "generate_speed", "system": name, "model": str(model_path), "device": str(dev), "dtype": dtype,
               "new_tokens": tokens, "tokens_per_s": tokens / seconds, "vs_dense": dense_s / seconds,
               "same_tokens_as_dense": answer == dense_answer, "same_tokens_as_nf4_per_token": answer == per_token,
               **env}  # fmt: skip
        out.append(row)
        print(f"{name:<34} {row['tokens_per_s']:8.1f} tokens/s  {row['vs_dense']:5.2f}x dense  "
              f"same tokens as dense: {row['same_tokens_as_dense']}")  # fmt: skip
    print(f"nf4 per token and once give the same tokens: {per_token == rows['nf4, dequantized once'][0]}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt", default="The capital of France is")
    args = ap.parse_args()
    from qlora_fsdp.quiet import quiet_known_messages

    quiet_known_messages()
    rows = measure(args.model, args.device, args.dtype, args.tokens, args.prompt)
    if args.device.startswith("cuda"):
        append_results(rows)


if __name__ == "__main__":
    main()
