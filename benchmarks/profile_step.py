"""Where a training step's time and memory go: one system of train_step.py, shape by shape, under torch.profiler.

    python benchmarks/profile_step.py [--system ours_compiled_chunked[/field=value...]] [--shapes 1x2048,4x2048]
                                      [--trace out.json.gz] [--config tiny] [--peer ours_in_hf] [--python-profile 25]

Prints (1) the GPU time per kernel category (matmul, NF4 dequant, attention, fused Triton, other elementwise,
copies) and the share of the step the GPU is idle, (2) the 25 kernels with the most GPU time, (3) the host ops
with the most self time, and (4) memory: the model at rest, the peak during forward (loss included) and the peak
during backward.

--peer NAME profiles a system of peers.py instead (e.g. hf_peft_bnb, ours_in_hf: transformers' own forward and loss),
on checkpoints written as peers.py writes them. Every run also times the steps with Python's garbage collector
frozen (gc.freeze: collections skip every object that existed before), --python-profile N prints the N Python
functions with the most self time under cProfile, and --launch-timing the host time of each Triton launch, layer by
layer, and the garbage collections (benchmarks/host_timing.py): where a host-bound step's host time goes.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_step import DEVICE, build_system, make_batch, sync, tiny_config  # noqa: E402

from qlora_fsdp.parallel.sizing import llama_3_1_8b_config  # noqa: E402

CATEGORIES = [  # first match wins
    ("nf4 dequant", r"nf4|dequant"),
    ("attention", r"flash|fmha|attention|sdpa"),
    ("matmul", r"gemm|nvjet|sm90_xmma|cutlass|cublas|splitk|matmul"),
    ("fused triton (inductor)", r"^triton_"),
    ("copies", r"memcpy|memset|copy"),
    ("other elementwise / reductions", r"."),
]


def category(name: str) -> str:
    for cat, pattern in CATEGORIES:
        if re.search(pattern, name, re.IGNORECASE):
            return cat
    return "other"


def busy_us(events) -> float:
    """GPU time covered by at least one kernel (the union of the kernels' intervals)."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in events)
    total, end = 0.0, -1.0
    for s, e in spans:
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def live_at_peak(snapshot: dict, device: int = 0) -> tuple[int, list[tuple[int, list[dict]]]]:
    """Replay a memory snapshot's allocation trace: (peak bytes above the start, [(size, frames)] of the blocks
    that the trace allocated and that were live at that peak). Blocks allocated before recording began are
    not in the trace: the result is what the recorded region added on top of them."""
    trace = snapshot["device_traces"][device]
    live, total, peak, peak_at = {}, 0, 0, -1
    for i, ev in enumerate(trace):
        if ev["action"] == "alloc":
            live[ev["addr"]] = ev["size"]
            total += ev["size"]
            if total > peak:
                peak, peak_at = total, i
        elif ev["action"] == "free_completed" and ev["addr"] in live:
            total -= live.pop(ev["addr"])
    blocks = {}
    for ev in trace[: peak_at + 1]:
        if ev["action"] == "alloc":
            blocks[ev["addr"]] = (ev["size"], ev.get("frames", []))
        elif ev["action"] == "free_completed":
            blocks.pop(ev["addr"], None)
    return peak, sorted(blocks.values(), key=lambda b: -b[0])


def where(frames: list[dict], depth: int = 2) -> str:
    """The innermost `depth` frames of our code, transformers, peft or inductor's generated code."""
    keep = [f for f in frames if re.search(r"qlora_fsdp|transformers|peft|torchinductor|benchmarks", f["filename"])]
    return " < ".join(f"{Path(f['filename']).name}:{f['line']} {f['name']}" for f in keep[:depth]) or "?"


def print_peak_breakdown(snapshot: dict, top: int = 25) -> None:
    peak, blocks = live_at_peak(snapshot)
    groups = {}
    for size, frames in blocks:
        key = where(frames)
        n, s = groups.get(key, (0, 0))
        groups[key] = (n + 1, s + size)
    print(f"\nlive at the recorded peak, above what was allocated before: {peak / 1e6:.1f} MB in {len(blocks)} blocks")
    print(f"{'allocated at (innermost first)':<110}{'blocks':>7}{'MB':>9}")
    for key, (n, s) in sorted(groups.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"{key[:108]:<110}{n:>7}{s / 1e6:>9.1f}")


def memory_phases(loop, batch, breakdown: bool = False) -> dict:
    """Peak GB during the forward (loss included) and during backward + optimizer of one step; with `breakdown`,
    also print what is live at the step's peak (from a recorded allocation trace)."""
    gb = lambda x: x / 1e9  # noqa: E731
    if breakdown:
        torch.cuda.memory._record_memory_history(max_entries=2_000_000)
    b = loop._to_device(batch)
    n = loop.label_tokens(b)
    sync()
    torch.cuda.reset_peak_memory_stats()
    rest = torch.cuda.memory_allocated()
    loss = loop._forward_loss_sum(b) / n
    sync()
    fwd_peak, after_fwd = torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss.backward()
    loop.optimizer.step()
    loop.optimizer.zero_grad(set_to_none=True)
    sync()
    if breakdown:
        print_peak_breakdown(torch.cuda.memory._snapshot())
        torch.cuda.memory._record_memory_history(enabled=None)
    return {"at_rest_gb": gb(rest), "forward_peak_gb": gb(fwd_peak), "held_for_backward_gb": gb(after_fwd - rest),
            "backward_peak_gb": gb(torch.cuda.max_memory_allocated())}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--system", default="ours_compiled_chunked")
    p.add_argument("--shapes", default="1x2048")
    p.add_argument("--config", choices=["llama-3.1-8b", "tiny"], default="llama-3.1-8b")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--trace", default=None, help="write a Chrome trace per shape here: a folder")
    p.add_argument("--peak-breakdown", action="store_true", help="what is live at the step's memory peak")
    p.add_argument("--peer", default=None, help="a system of peers.py instead of --system (e.g. ours_in_hf)")
    p.add_argument("--checkpoints", default=str(Path(tempfile.gettempdir()) / "qlora_peers_checkpoints"))
    p.add_argument("--python-profile", type=int, default=0, metavar="N",
                   help="the N Python functions with the most self time over the steps (cProfile)")
    p.add_argument("--launch-timing", action="store_true",
                   help="host time of each Triton launch in the step, by layer, and back to back (CUDA); GC")
    args = p.parse_args()
    config = llama_3_1_8b_config() if args.config == "llama-3.1-8b" else tiny_config()
    if args.peer:
        step = build_peer(args.peer, config, args)
        args.system = args.peer
    else:
        step = build_system(args.system, config, args)
    for shape in args.shapes.split(","):
        profile_shape(step, getattr(step, "loop", None), config, shape, args)  # the baseline has no loop


def build_peer(name: str, config, args):
    """peers.py's system `name` on its checkpoints (written once under --checkpoints), built for --shapes."""
    from common import parse_shapes
    from peer_systems import IMPORTS, build
    from peers import peer_checkpoints
    from train_step import MAX_GRAD_NORM

    if name not in IMPORTS:
        raise SystemExit(f"profile_step.py: unknown --peer {name}; known: {', '.join(IMPORTS)}")
    max_seq = max(t for _, t in parse_shapes(args.shapes))
    return build(name, peer_checkpoints(config, Path(args.checkpoints)), config, max_seq, "inductor", DEVICE,
                 MAX_GRAD_NORM)  # fmt: skip


def timed_steps_ms(step, batch, steps: int) -> float:
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step(batch)
    sync()
    return (time.perf_counter() - start) / steps * 1e3


def print_python_profile(step, batch, steps: int, top: int) -> None:
    """cProfile over `steps` steps: the `top` functions by self time, per step (a host-bound step's host time)."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step(batch)
    sync()
    prof.disable()
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (calls, primitive calls, self s, cumulative s, callers)
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    print(f"\n{'python function (self time, cProfile)':<90}{'calls':>7}{'ms/step':>9}{'us/call':>9}")
    for (file, line, fn), (calls, _, self_s, _, _) in rows:
        label = f"{Path(file).name}:{line} {fn}" if line else fn
        print(f"{label[:88]:<90}{calls // steps:>7}{self_s / steps * 1e3:>9.2f}{self_s / calls * 1e6:>9.1f}")


def print_step_launch_times(step, batch, steps: int) -> None:
    """Triton launches' host time inside the step, then the NF4 dequantizer's back to back in this process."""
    from host_timing import back_to_back_dequant_times, gc_timer, print_gc_times, print_launch_times, triton_launch_timer

    with triton_launch_timer() as times, gc_timer() as collections:
        for _ in range(steps):
            step(batch)
        sync()
    print_launch_times(times, steps, "Triton launches in the step")
    print_gc_times(collections, steps)
    if DEVICE == "cuda":
        print_launch_times(back_to_back_dequant_times(), 1, "NF4 dequantizer, 500 launches back to back")


def print_gaps(kernels, steps: int, top: int = 12, min_us: float = 20.0) -> None:
    """The GPU's idle stretches between kernels (the profiler's `## Call CompiledFxGraph` ranges left out): their
    total per step by size, and the largest with the kernels on either side."""
    real = sorted((e for e in kernels if not e.name.startswith("##")), key=lambda e: e.time_range.start)
    gaps, end, last = [], None, None
    for e in real:
        if end is not None and e.time_range.start - end > min_us:
            gaps.append((e.time_range.start - end, last, e.name))
        if end is None or e.time_range.end > end:
            end, last = e.time_range.end, e.name
    total = sum(g for g, _, _ in gaps) / steps / 1e3
    small = sum(g for g, _, _ in gaps if g < 200) / steps / 1e3
    print(f"GPU idle in gaps over {min_us:.0f} us: {total:.1f} ms/step ({len(gaps) // steps} gaps/step; gaps under "
          f"200 us: {small:.1f} ms)")  # fmt: skip
    for g, before, after in sorted(gaps, key=lambda x: -x[0])[:top]:
        print(f"  {g / 1e3:8.2f} ms  after {before[:55]:<55}  before {after[:55]}")


def print_matmuls_by_shape(prof, steps: int, top: int = 30) -> None:
    """GPU time of the matmul ops by input shapes: which base and LoRA matmuls the step spends its time in."""
    ops = [e for e in prof.key_averages(group_by_input_shape=True) if e.key in ("aten::mm", "aten::addmm", "aten::bmm")]
    total = sum(e.device_time_total for e in ops)
    print(f"\n{'matmul op and input shapes':<90}{'calls':>7}{'ms/step':>9}{'TFLOP/s':>9}   (all matmuls: "
          f"{total / steps / 1e3:.1f} ms/step)")  # fmt: skip
    for e in sorted(ops, key=lambda e: -e.device_time_total)[:top]:
        shapes = [s for s in e.input_shapes if s]
        a, b = shapes[1:3] if e.key == "aten::addmm" else shapes[:2]  # addmm's bias comes first
        flops = 2 * a[-2] * a[-1] * b[-1] * e.count
        tf = flops / e.device_time_total / 1e6 if e.device_time_total else 0.0
        label = f"{e.key} {a} x {b}"
        print(f"{label[:88]:<90}{e.count // steps:>7}{e.device_time_total / steps / 1e3:>9.2f}{tf:>9.0f}")


def profile_shape(step, loop, config, shape: str, args) -> None:
    b, t = (int(x) for x in shape.split("x"))
    batch = make_batch(config, b, t)
    for _ in range(3):
        step(batch)
    step_ms = timed_steps_ms(step, batch, args.steps)
    gc.freeze()  # everything alive now leaves the collector's generations: what do its collections cost a step?
    frozen_ms = timed_steps_ms(step, batch, args.steps)
    gc.unfreeze()
    if args.python_profile:
        print_python_profile(step, batch, args.steps, args.python_profile)
    if args.launch_timing:
        print_step_launch_times(step, batch, args.steps)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(args.steps):
            step(batch)
        sync()
    if args.trace:
        Path(args.trace).mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(Path(args.trace) / f"{shape}.json.gz"))
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.device_time for e in kernels) / args.steps / 1e3  # ms per step
    busy = busy_us(kernels) / args.steps / 1e3
    print(f"\n{args.system}, {shape}: step {step_ms:.1f} ms unprofiled ({frozen_ms:.1f} ms with gc frozen); kernels "
          f"{total:.1f} ms, GPU busy {busy:.1f} ms of the profiled step")  # fmt: skip
    print_gaps(kernels, args.steps)
    by_cat, by_name = {}, {}
    for e in kernels:
        by_cat[category(e.name)] = by_cat.get(category(e.name), 0.0) + e.device_time
        n, d = by_name.get(e.name, (0, 0.0))
        by_name[e.name] = (n + 1, d + e.device_time)
    print(f"{'category':<34}{'ms/step':>9}{'share':>8}")
    for cat, us in sorted(by_cat.items(), key=lambda kv: -kv[1]):
        print(f"{cat:<34}{us / args.steps / 1e3:>9.1f}{us / args.steps / 1e3 / total:>8.1%}")
    print(f"\n{'kernel':<90}{'calls':>7}{'ms/step':>9}")
    for name, (n, us) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:25]:
        print(f"{name[:88]:<90}{n // args.steps:>7}{us / args.steps / 1e3:>9.2f}")
    print_matmuls_by_shape(prof, args.steps)
    cpu = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:15]
    print(f"\n{'host op (self time)':<90}{'calls':>7}{'ms/step':>9}")
    for e in cpu:
        print(f"{e.key[:88]:<90}{e.count // args.steps:>7}{e.self_cpu_time_total / args.steps / 1e3:>9.2f}")
    if DEVICE == "cuda" and loop is not None:
        print("\nmemory:", {k: round(v, 2) for k, v in memory_phases(loop, batch, args.peak_breakdown).items()}, flush=True)


if __name__ == "__main__":
    main()
