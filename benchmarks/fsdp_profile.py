"""Where a 2-GPU FSDP2 step's time goes, against one GPU running the same global batch; and a 2x T4 projection.

    python benchmarks/fsdp_profile.py [--gpus 2] [--variants 2gpu,1gpu,2gpu-offload,2gpu-keep] [--seq 2048]
                                      [--pcie-gbs 10] [--t4-tflops 25]

Each variant builds the Llama-3.1-8B shape (random weights) in its own processes, runs `--warmup` steps of QLoRA
(r=16 on all 7 projections, activation checkpointing, --precision, optionally --compile and --chunked-loss,
1 x --seq a microbatch; one GPU accumulates --gpus microbatches, so the global batch is the same), times
`--timed-steps` steps, then runs `--steps` steps under torch.profiler. Per rank it reports:

    wall            step time of the timed steps (host clock, the GPU drained at both ends; the profiler, which
                    adds host time to every op, off); tokens/s come from it
    profiled        step time under the profiler: the times below are its shares
    compute         GPU time with at least one compute kernel running (the union of their intervals)
    comm            GPU time with an NCCL kernel running; `exposed` = comm while no compute kernel runs
    copies          GPU time of memcpy / memset (host <-> device with CPU offload)
    idle            wall - the union of all kernels: the GPU waits for the host
    collectives     bytes all-gathered and reduce-scattered a step (recorded at the torch.distributed call)
    top host ops    rank 0's host ops with the most self time

Variants: 2gpu (what `--nproc 2` runs), 1gpu, 2gpu-offload (`--cpu-offload`), 2gpu-keep (decoder layers not
resharded after forward: backward gathers nothing again), 1gpu-dispatch and 2gpu-dispatch (the fused LoRA kernels
launched through the `torch.ops` dispatcher in eager mode, as before kernels/rank_product.py launches_directly).

The 2x T4 projection (no T4 here: every input is stated) takes the measured bytes a rank receives a step over a
PCIe link of --pcie-gbs GB/s, and the step's LoRA FLOPs (4N + attention + LoRA per token; x1.5 for the forward
that checkpointing runs again) at --t4-tflops:
    T4 compute per microbatch  c = 1.5 FLOPs / rate,  communication per step  m = received bytes / bandwidth
    1 GPU: 2c a step;  2 GPUs: c + max(0, m - c) if gathers overlap compute (prefetch), c + m if they do not.
`--cpu --config tiny` runs the script on CPU processes (gloo) as a smoke test. Appends JSON lines to results.jsonl.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_results, copy_task_batches, environment, lora_step_flops_per_token  # noqa: E402
from multi_gpu import _join, model_config, spawn  # noqa: E402


# -- interval arithmetic on kernel timelines (microseconds) ----------------------------------------------------
def union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Merged, sorted, non-overlapping intervals covering the same time."""
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def length(intervals: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in union(intervals))


def minus(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Time covered by `a` and not by `b`."""
    return length(a) - length([(max(x, y), min(x2, y2)) for x, x2 in union(a) for y, y2 in union(b)
                               if max(x, y) < min(x2, y2)])  # fmt: skip


def kernel_kind(name: str) -> str:
    low = name.lower()
    if "nccl" in low:
        return "comm"
    if low.startswith("memcpy") or low.startswith("memset") or "memcpy" in low:
        return "copy"
    return "compute"


def timeline_summary(kernels: list[tuple[str, float, float]], wall_us: float, steps: int) -> dict:
    """kernels: (name, start us, end us) of every device kernel in the profiled steps -> ms per step of compute,
    comm, comm not hidden under compute, copies and device idle."""
    by_kind: dict[str, list[tuple[float, float]]] = {"compute": [], "comm": [], "copy": []}
    for name, a, b in kernels:
        by_kind[kernel_kind(name)].append((a, b))
    busy = length([iv for ivs in by_kind.values() for iv in ivs])
    ms = 1e-3 / steps
    return {"wall_ms": wall_us * ms, "compute_ms": length(by_kind["compute"]) * ms,
            "comm_ms": length(by_kind["comm"]) * ms, "exposed_comm_ms": minus(by_kind["comm"], by_kind["compute"]) * ms,
            "copy_ms": length(by_kind["copy"]) * ms, "idle_ms": max(0.0, wall_us - busy) * ms,
            "kernels_per_step": len(kernels) / steps}  # fmt: skip


# -- bytes at the collectives ----------------------------------------------------------------------------------
class CollectiveBytes:
    """Records the bytes of every all-gather (its output) and reduce-scatter (its input) called through
    torch.distributed while active, as FSDP2 calls them (torch 2.13: the *_single names): their sums by kind, and
    each call as (kind, bytes, whether it ran inside autograd's backward)."""

    # name -> (kind, the argument whose size counts: position, keyword)
    NAMES = {"all_gather_into_tensor": ("all_gather", 0, "output_tensor"),
             "all_gather_single": ("all_gather", 0, "output_tensor"),
             "reduce_scatter_tensor": ("reduce_scatter", 1, "input"),
             "reduce_scatter_single": ("reduce_scatter", 1, "input")}  # fmt: skip

    def __init__(self):
        self.bytes = {"all_gather": 0, "reduce_scatter": 0}
        self.calls: list[tuple[str, int, bool]] = []
        self._saved = {}

    def __enter__(self):
        import torch.distributed as dist

        for name, (kind, pos, key) in self.NAMES.items():
            if not hasattr(dist, name):
                continue
            orig = self._saved[name] = getattr(dist, name)

            def record(*a, _orig=orig, _kind=kind, _pos=pos, _key=key, **kw):
                t = a[_pos] if len(a) > _pos else kw[_key]
                self.bytes[_kind] += t.numel() * t.element_size()
                self.calls.append((_kind, t.numel() * t.element_size(), torch._C._current_graph_task_id() != -1))
                return _orig(*a, **kw)

            setattr(dist, name, record)
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist

        for name, orig in self._saved.items():
            setattr(dist, name, orig)


# -- one variant ---------------------------------------------------------------------------------------------------
def _worker(rank, world, port, args, variant, out):
    from torch.profiler import ProfilerActivity, profile

    import qlora_fsdp.parallel as parallel
    from qlora_fsdp.model import random_model
    from qlora_fsdp.training import TrainConfig, make_loop
    from qlora_fsdp.training.batches import FixedBatches

    device = _join(rank, world, port)
    cuda = device != "cpu"
    if variant == "2gpu-keep":  # layers keep their gathered 4-bit bytes from forward to backward
        keep = parallel.apply_fsdp
        parallel.apply_fsdp = lambda model, **kw: keep(model, **{**kw, "reshard_after_forward": False})
    if variant.endswith("-dispatch"):  # the fused LoRA ops through torch.ops even in plain eager CUDA code
        from qlora_fsdp.kernels import rank_product

        rank_product.launches_directly = lambda t: False
    config = model_config(args.config)
    if args.layers:
        config.num_hidden_layers = args.layers
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    model = random_model(config, dtype=dtype, device=device, seed=0)
    steps = args.steps
    cfg = TrainConfig(output_dir=tempfile.mkdtemp(), precision=args.precision, activation_checkpointing=True, lora_r=16,
                      lora_alpha=32, lr=2e-4, warmup_steps=2, max_steps=args.warmup + args.timed_steps + steps, grad_accum=args.gpus // world,
                      batch_size=1, max_length=args.seq, cpu_offload=variant.endswith("offload"), progress=False,
                      device=device, seed=0, compile=args.compile, chunked_loss=args.chunked_loss)  # fmt: skip
    batches = copy_task_batches((args.warmup + args.timed_steps + steps) * args.gpus, args.seq, config.vocab_size)
    loop = make_loop(cfg, model=model, train_batches=FixedBatches(batches))
    loop.model.train()
    losses = [loop.train_step()["loss"] for _ in range(args.warmup)]
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    losses += [loop.train_step()["loss"] for _ in range(args.timed_steps)]
    sync()
    timed_ms = (time.perf_counter() - start) * 1e3 / max(1, args.timed_steps)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with CollectiveBytes() as coll, profile(activities=activities) as prof:
        start = time.perf_counter()
        losses += [loop.train_step()["loss"] for _ in range(steps)]
        sync()
        wall_us = (time.perf_counter() - start) * 1e6
    device_type = torch.autograd.DeviceType.CUDA
    kernels = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == device_type]
    result = {"variant": variant, "rank": rank, "world": world, "losses": losses, **timeline_summary(kernels, wall_us, steps),
              "profiled_wall_ms": wall_us / 1e3 / steps, "timed_steps": args.timed_steps,
              "allgather_bytes": coll.bytes["all_gather"] / steps,
              "reduce_scatter_bytes": coll.bytes["reduce_scatter"] / steps,
              "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else float("nan"),
              "tokens_per_step": args.gpus * args.seq}  # fmt: skip
    if args.timed_steps:
        result["wall_ms"] = timed_ms
    host = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    result["top_host_ops_ms"] = [(e.key, e.self_cpu_time_total / 1e3 / steps, e.count // steps) for e in host]
    torch.save(result, out / f"rank{rank}.pt")
    if world > 1:
        torch.distributed.destroy_process_group()
    os._exit(0)


def t4_projection(one: dict, two: dict, config, seq: int, pcie_gbs: float, t4_tflops: float) -> dict:
    """Seconds a step on 1 and on 2 T4s from the step's FLOPs and the bytes a rank receives (see the docstring)."""
    # one microbatch on one T4; checkpointing runs the forward twice: 6N where the model FLOPs count 4N
    c = 1.5 * lora_step_flops_per_token(config, seq) * seq / (t4_tflops * 1e12)
    world = two["world"]
    received = (two["allgather_bytes"] + two["reduce_scatter_bytes"]) * (world - 1) / world
    m = received / (pcie_gbs * 1e9)
    return {"t4_compute_s_per_microbatch": c, "t4_comm_s_per_step": m, "received_gb_per_step": received / 1e9,
            "speedup_overlapped": 2 * c / (c + max(0.0, m - c)), "speedup_serial": 2 * c / (c + m),
            "pcie_gbs": pcie_gbs, "t4_tflops": t4_tflops}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--variants", default="2gpu,1gpu,2gpu-offload,2gpu-keep")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--layers", type=int, default=0, help="decoder layers (default: the config's)")
    p.add_argument("--precision", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--compile", action="store_true", help="compiled decoder layers (--compile)")
    p.add_argument("--chunked-loss", action="store_true")
    p.add_argument("--warmup", type=int, default=2, help="steps before the profiled ones (with --compile: 3 or more)")
    p.add_argument("--timed-steps", type=int, default=3, help="steps timed without the profiler (tokens/s)")
    p.add_argument("--steps", type=int, default=2, help="steps under the profiler")
    p.add_argument("--pcie-gbs", type=float, default=10.0, help="assumed T4-to-T4 bandwidth, GB/s, one direction")
    p.add_argument("--t4-tflops", type=float, default=25.0, help="assumed fp16 matmul rate a T4 reaches, TFLOP/s")
    p.add_argument("--config", choices=["llama-3.1-8b", "llama-3.1-70b", "tiny"], default="llama-3.1-8b")
    p.add_argument("--cpu", action="store_true", help="CPU processes (gloo) even where GPUs exist: a smoke test")
    args = p.parse_args()
    if args.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    env = {**environment(), "gpus": args.gpus}
    results = {}
    for variant in args.variants.split(","):
        world = 1 if variant.startswith("1gpu") else args.gpus
        t0 = time.perf_counter()
        out = spawn(_worker, world, args, variant)
        ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]
        results[variant] = ranks
        r0 = ranks[0]
        row = {"bench": "fsdp_profile", "variant": variant, "world": world, "seq": args.seq, "layers": args.layers or None,
               "precision": args.precision, "compile": args.compile, "chunked_loss": args.chunked_loss,
               "tokens_per_s": r0["tokens_per_step"] / (r0["wall_ms"] / 1e3), "seconds": time.perf_counter() - t0,
               "ranks": [{k: v for k, v in r.items() if k not in ("variant", "world")} for r in ranks]}  # fmt: skip
        append_results([{**env, **row}])
        print(f"{variant}: {row['tokens_per_s']:,.0f} tokens/s ({time.perf_counter() - t0:.0f} s)", flush=True)
        for r in ranks:
            print(f"  rank {r['rank']}: wall {r['wall_ms']:.1f} ms a step (profiled {r['profiled_wall_ms']:.1f}) | compute {r['compute_ms']:.1f} | comm "
                  f"{r['comm_ms']:.1f} (exposed {r['exposed_comm_ms']:.1f}) | copies {r['copy_ms']:.1f} | idle "
                  f"{r['idle_ms']:.1f} | {r['kernels_per_step']:.0f} kernels | all-gather "
                  f"{r['allgather_bytes'] / 1e9:.2f} GB, reduce-scatter {r['reduce_scatter_bytes'] / 1e9:.3f} GB | "
                  f"peak {r['peak_gb']:.1f} GB | losses {[round(x, 4) for x in r['losses']]}", flush=True)  # fmt: skip
        for key, ms, count in r0["top_host_ops_ms"][:6]:
            print(f"    host {key[:60]:<60} {ms:9.1f} ms a step ({count} calls)")
    one, two = results.get("1gpu"), results.get("2gpu")
    if one and two:
        config = model_config(args.config)
        if args.layers:
            config.num_hidden_layers = args.layers
        proj = t4_projection(one[0], two[0], config, args.seq, args.pcie_gbs, args.t4_tflops)
        speedup = one[0]["wall_ms"] / two[0]["wall_ms"]
        print(f"\n2 vs 1 GPU, same global batch: {speedup:.2f}x here")
        print(f"2x T4 projection (assumed {args.pcie_gbs:g} GB/s PCIe, {args.t4_tflops:g} TFLOP/s): "
              f"{proj['received_gb_per_step']:.2f} GB received a step -> {proj['t4_comm_s_per_step']:.2f} s; compute "
              f"{proj['t4_compute_s_per_microbatch']:.2f} s a microbatch; 2 vs 1 T4 {proj['speedup_overlapped']:.2f}x "
              f"with overlapped gathers, {proj['speedup_serial']:.2f}x without")  # fmt: skip
        append_results([{**env, "bench": "fsdp_t4_projection", "seq": args.seq, "measured_speedup": speedup, **proj}])


if __name__ == "__main__":
    main()
