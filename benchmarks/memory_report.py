"""The memory model: bytes per rank at rest and at a training step's peak, for QLoRA (r=16 on all 7 projections)
under FSDP2 on N = 1, 2, 4, 8 ranks, computed from the model's shapes on the meta device (no GPU needed).

    python benchmarks/memory_report.py [--config llama-3.1-8b|llama-3.1-70b] [--seq 2048] [--chunked-loss]

At rest (qlora_fsdp.parallel.sizing.bytes_at_rest): the base (NF4 linears, 16-bit embeddings, norms and lm_head),
LoRA weights, their gradients and AdamW states, each 1/N a rank. The peak of a step with activation checkpointing,
one microbatch of 1 x seq a rank (step_peak): qlora_fsdp.memory.budget.predict_peak, the model --max-memory plans
with (its terms: at rest on the GPU, with --cpu-offload only LoRA's share; 2 gathered decoder layers and the lm_head
for N > 1; the checkpointed layers' inputs; the transient of a layer's backward or of the loss, chunked or not).
The measured peaks in results.jsonl (benchmarks/multi_gpu.py, the same setup) are printed beside the model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, append_results, environment, model_config  # noqa: E402

from qlora_fsdp.memory.budget import Setup, predict_peak  # noqa: E402
from qlora_fsdp.parallel.sizing import bytes_at_rest, format_report  # noqa: E402

WORLD_SIZES = (1, 2, 4, 8)


def step_peak(config, world: int, seq: int, *, cpu_offload: bool = False, chunked_loss: bool = False,
              lora_r: int = 16, offload: str = "frozen") -> dict[str, float]:  # fmt: skip
    """{term: bytes} of one rank's predicted peak and their "total": qlora_fsdp.memory.budget.predict_peak for the
    setup measured here (eager, checkpointing of every layer, batch 1); `offload`: what CPU offload moves to the
    host, "frozen" (today's --cpu-offload) or "all" (before)."""
    setup = Setup(activation_checkpointing=True, chunked_loss=chunked_loss)
    return predict_peak(config, 1, seq, setup, compiled=False, lora_r=lora_r, world=world, cpu_offload=cpu_offload,
                        offload=offload)  # fmt: skip


def measured_rows(path: Path = RESULTS) -> list[dict]:
    """benchmarks/multi_gpu.py's rows with checkpointing (the setup step_peak models)."""
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return [r for r in rows if r.get("bench") == "multi_gpu_train" and r.get("ac") and "peak_gb_per_gpu" in r]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="llama-3.1-8b", choices=["llama-3.1-8b", "llama-3.1-70b"])
    p.add_argument("--seq", type=int, default=2048, help="tokens of a rank's microbatch (batch 1)")
    p.add_argument("--chunked-loss", action="store_true")
    args = p.parse_args()
    config = model_config(args.config)
    print(f"{args.config}, QLoRA r=16 on all 7 projections, bytes per rank at rest (computed)")
    print(format_report(config))
    print(f"\npredicted peak per rank, checkpointing, 1 x {args.seq} a rank"
          f"{', chunked loss' if args.chunked_loss else ''} (GB)")  # fmt: skip
    print(f"{'ranks':>5} {'GPU-resident':>13} {'CPU offload':>12}")
    for n in WORLD_SIZES:
        resident, offload = (step_peak(config, n, args.seq, cpu_offload=o, chunked_loss=args.chunked_loss)["total"]
                             for o in (False, True))  # fmt: skip
        print(f"{n:>5} {resident / 1e9:>13.2f} {offload / 1e9 if n > 1 else float('nan'):>12.2f}")
    env = environment()
    append_results([{**env, "bench": "memory_at_rest", "config": args.config, "ranks": n, **bytes_at_rest(config, n)}
                    for n in WORLD_SIZES])  # fmt: skip
    if args.config != "llama-3.1-8b":
        return
    rows = measured_rows()
    if rows:
        print("\nmeasured peaks (benchmarks/multi_gpu.py, torch.cuda.max_memory_allocated) against the model:")
    for r in rows:
        offload = r.get("offload", "all")  # rows from before frozen-only offload have no "offload"
        predicted = step_peak(config, r["world"], r["seq"], cpu_offload=r["cpu_offload"], offload=offload)["total"] / 1e9
        measured = max(r["peak_gb_per_gpu"])
        print(f"  {r['world']} GPU(s), {r['precision']}{f' + CPU offload ({offload})' if r['cpu_offload'] else ''}, 1 x {r['seq']}: "
              f"{measured:.2f} GB measured, {predicted:.2f} predicted ({predicted / measured - 1:+.1%})  "
              f"({r['gpu']}, {r['commit']})")  # fmt: skip


if __name__ == "__main__":
    main()
