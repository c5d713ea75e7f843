"""Bytes per rank at rest for Llama-3.1-8B QLoRA (r=16 on all 7 projections) under FSDP2, N = 1, 2, 4, 8.

    python benchmarks/memory_report.py

Computed from the model's shapes on the meta device (no GPU needed): base (NF4 linears + 16-bit embeddings,
norms and lm_head), LoRA weights, their gradients and AdamW states. Activations are not included; the measured
peaks (activations, gathered layers and logits included) follow, from the GPU runs recorded in results.jsonl
(benchmarks/train_step.py and benchmarks/multi_gpu.py).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, append_results, environment  # noqa: E402

from qlora_fsdp.parallel.sizing import bytes_at_rest, format_report, llama_3_1_8b_config  # noqa: E402

if __name__ == "__main__":
    config = llama_3_1_8b_config()
    print("Llama-3.1-8B, QLoRA r=16 on all 7 projections, bytes per rank at rest (computed)")
    print(format_report(config))
    env = environment()
    append_results([{**env, "bench": "memory_at_rest", "ranks": n, **bytes_at_rest(config, n)} for n in (1, 2, 4, 8)])

    import json

    rows = [json.loads(line) for line in RESULTS.read_text().splitlines()] if RESULTS.is_file() else []
    measured = [r for r in rows if r.get("bench") == "train_step" and r.get("system") == "ours" and "peak_gb" in r]
    measured += [r for r in rows if r.get("bench") == "multi_gpu_train"]
    if measured:
        print("\nmeasured peaks (torch.cuda.max_memory_allocated, model included):")
    for r in measured:
        if r["bench"] == "train_step":
            print(f"  1 GPU, our step, batch {r['batch']} x {r['seq']}: {r['peak_gb']:.1f} GB  ({r['gpu']}, {r['date'][:10]})")
        else:
            print(f"  {r['world']} GPU(s), {r['precision']}{' + CPU offload' if r['cpu_offload'] else ''}, microbatch 1 x "
                  f"{r['seq']}: {max(r['peak_gb_per_gpu']):.1f} GB per GPU  ({r['gpu']}, {r['date'][:10]})")
