"""Bytes per rank at rest for Llama-3.1-8B QLoRA (r=16 on all 7 projections) under FSDP2, N = 1, 2, 4, 8.

    python benchmarks/memory_report.py

Computed from the model's shapes on the meta device (no GPU needed): base (NF4 linears + 16-bit embeddings,
norms and lm_head), LoRA weights, their gradients and AdamW states. Activations are not included.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_results, environment  # noqa: E402

from qlora_fsdp.parallel.memory import bytes_at_rest, format_report, llama_3_1_8b_config  # noqa: E402

if __name__ == "__main__":
    config = llama_3_1_8b_config()
    print("Llama-3.1-8B, QLoRA r=16 on all 7 projections, bytes per rank at rest (computed)")
    print(format_report(config))
    env = environment()
    append_results([{**env, "bench": "memory_at_rest", "ranks": n, **bytes_at_rest(config, n)} for n in (1, 2, 4, 8)])
