"""The memory model: bytes per rank at rest and at a training step's peak, for QLoRA (r=16 on all 7 projections)
under FSDP2 on N = 1, 2, 4, 8 ranks, computed from the model's shapes on the meta device (no GPU needed).

    python benchmarks/memory_report.py [--config llama-3.1-8b|llama-3.1-70b] [--seq 2048] [--chunked-loss]

At rest (qlora_fsdp.parallel.sizing.bytes_at_rest): the base (NF4 linears, 16-bit embeddings, norms and lm_head),
LoRA weights, their gradients and AdamW states, each 1/N a rank. The peak of a step with activation checkpointing,
one microbatch of 1 x seq a rank (step_peak):

    at rest on the GPU            bytes_at_rest(N); with CPU offload only LoRA, its gradients and AdamW states
                                  (offload="frozen": the frozen shards live on the host, as --cpu-offload does now),
                                  or nothing (offload="all": every shard on the host, the rows measured before it)
  + gathered (N > 1)              2 decoder layers (the one computing and the one prefetched: NF4 bytes + bf16 LoRA)
                                  + the whole lm_head (gathered from its forward to its backward)
  + checkpointed layer inputs     L x seq x hidden x 2
  + one layer's activations       ACTIVATION_FACTOR x seq x (hidden + intermediate) x 2: the layer being recomputed
  + dequantized weights           2 x the largest decoder linear in 16 bits
  + the loss                      10 bytes a logit (bf16 logits, fp32 copy, fp32 gradient) for seq x vocab logits,
                                  or for one chunk of about 2^26 logits with --chunked-loss

ACTIVATION_FACTOR is measured: a kept (not checkpointed) eager layer of the 8B shape adds 0.357 GB at 1 x 2048 on an
H200 (docs/design/memory_budget.md), 0.374 GB with the 16.8 MB input it replaces. The measured peaks in
results.jsonl (benchmarks/multi_gpu.py, the same setup) are printed beside the model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, append_results, environment, model_config  # noqa: E402

from qlora_fsdp.parallel.sizing import bytes_at_rest, format_report, nf4_nbytes  # noqa: E402

ACTIVATION_FACTOR = 0.374e9 / (2048 * (4096 + 14336) * 2)  # ~4.95: see the module docstring
CHUNK_LOGITS = 2**26  # --chunked-loss's default chunk (training/chunked_loss)
WORLD_SIZES = (1, 2, 4, 8)


def _linear_shapes(config) -> list[tuple[int, int]]:
    """(in, out) of each decoder layer's 7 linears."""
    d, inter = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    return [(d, q), (d, kv), (d, kv), (q, d), (d, inter), (d, inter), (inter, d)]


def step_peak(config, world: int, seq: int, *, cpu_offload: bool = False, chunked_loss: bool = False,
              lora_r: int = 16, offload: str = "frozen") -> dict[str, float]:  # fmt: skip
    """{term: bytes} of one rank's predicted peak (module docstring) and their "total"; `offload`: what CPU offload
    moves to the host, "frozen" (today's --cpu-offload) or "all" (before)."""
    h, inter, layers, vocab = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    shapes = _linear_shapes(config)
    layer_bytes = sum(nf4_nbytes(i * o)[0] + 2 * lora_r * (i + o) for i, o in shapes)
    logits = min(seq * vocab, CHUNK_LOGITS) if chunked_loss else seq * vocab
    terms = {
        "at_rest": _resident(bytes_at_rest(config, world, lora_r), cpu_offload, offload),
        "gathered": 2 * layer_bytes + 2 * vocab * h if world > 1 else 0.0,
        "checkpointed_inputs": layers * seq * h * 2,
        "layer_activations": ACTIVATION_FACTOR * seq * (h + inter) * 2,
        "dequantized": 2 * 2 * max(i * o for i, o in shapes),
        "loss": 10 * logits,
    }
    terms["total"] = sum(terms.values())
    return terms


def _resident(at_rest: dict[str, float], cpu_offload: bool, offload: str) -> float:
    """What stays on the GPU of a rank's bytes at rest."""
    if not cpu_offload:
        return at_rest["total"]
    if offload not in ("frozen", "all"):
        raise ValueError(f"offload {offload!r}: 'frozen' or 'all'")
    return at_rest["total"] - at_rest["base"] if offload == "frozen" else 0.0


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
