"""Launch shapes of the fused LoRA kernels (lora_swiglu forward and backward, lora_add) at Llama-3.1-8B sizes.

    python benchmarks/lora_kernels.py [--tokens 8192] [--rank 16]

Each kernel is memory-bound: its floor is the bytes it must move at the device's copy bandwidth (measured in the
same run). Every (BT, BN, warps) tried is checked against the production launch's output, then timed (GPU time
from the profiler, mean of 20 calls). Prints one table per kernel, best first; appends JSON lines to the results
file. The production shapes are the module constants (lora_swiglu.FORWARD_TILE / BACKWARD_TILE, lora_add.TILE).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_results, copy_bandwidth_tbs, environment, gpu_time_us  # noqa: E402

from qlora_fsdp.kernels import lora_add as la  # noqa: E402
from qlora_fsdp.kernels import lora_swiglu as ls  # noqa: E402

SHAPES = [(16, 64, 4), (16, 128, 2), (16, 128, 4), (16, 256, 4), (32, 64, 2), (32, 64, 4), (32, 128, 2),
          (32, 128, 4), (32, 128, 8), (32, 256, 4), (32, 256, 8), (64, 64, 4), (64, 128, 4), (64, 128, 8)]  # fmt: skip


def sweep(name: str, run, nbytes: int, bandwidth: float, rows: list[dict]):
    """run(bt, bn, warps) -> outputs; each shape checked against the production one, then timed."""
    want = run(None, None, None)
    results = []
    for bt, bn, warps in [(None, None, None)] + SHAPES:
        try:
            got = run(bt, bn, warps)
            same = all(torch.equal(a, b) for a, b in zip(got, want))
            us, _ = gpu_time_us(lambda i: run(bt, bn, warps), iters=20)
        except Exception as e:  # noqa: BLE001 - a shape Triton cannot build (resources) is reported, not fatal
            print(f"{name} {bt}x{bn} w{warps}: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
            continue
        results.append((us, bt, bn, warps, same))
    floor = nbytes / bandwidth / 1e6
    print(f"\n{name}: {nbytes / 1e9:.3f} GB moved, floor {floor:.1f} us at the copy bandwidth")
    print(f"{'BT x BN, warps':>22} {'us':>9} {'x floor':>8}  same")
    for us, bt, bn, warps, same in sorted(results):
        label = "production" if bt is None else f"{bt} x {bn}, {warps}"
        print(f"{label:>22} {us:9.1f} {us / floor:8.2f}  {same}")
        rows.append({"bench": "lora_kernels", "kernel": name, "block": label, "us": us, "floor_us": floor, "same": same})


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--rank", type=int, default=16)
    args = p.parse_args()
    t, r, dtype = args.tokens, args.rank, torch.bfloat16
    bandwidth = copy_bandwidth_tbs()
    print(f"copy bandwidth {bandwidth:.2f} TB/s (read + write)")
    make = lambda *shape, std=1.0: torch.randn(*shape, device="cuda", dtype=dtype) * std  # noqa: E731
    rows: list[dict] = []

    i = 14336
    base_g, base_u, grad_act = make(t, i), make(t, i), make(t, i)
    hg, hu, wg, wu = make(t, r), make(t, r), make(i, r, std=0.05), make(i, r, std=0.05)
    kernel = ls.kernel_for(ls._lora_swiglu_kernel, base_g)

    grad_h, a_down_t = make(t, r), make(i, r, std=0.05)

    def swiglu(*grads):
        def run(bt, bn, warps):
            out = ls._launch(kernel, base_g, base_u, hg, hu, wg, wu, *grads, tile=bt and (bt, bn, warps))
            return out if isinstance(out, tuple) else (out,)

        return run

    tile = t * i * 2
    sweep(f"lora_swiglu forward ({t}, {i})", swiglu(), 3 * tile, bandwidth, rows)
    sweep(f"lora_swiglu backward ({t}, {i})", swiglu(grad_act), 5 * tile, bandwidth, rows)
    sweep(f"lora_swiglu backward + down lora_A ({t}, {i})", swiglu(grad_act, grad_h, a_down_t), 5 * tile, bandwidth, rows)

    for n in (4096, 1024):
        base, h, w = make(t, n), make(t, r), make(n, r, std=0.05)
        add_kernel = la.kernel_for(la._lora_add_kernel, base)

        def run(bt, bn, warps, base=base, h=h, w=w, add_kernel=add_kernel):
            return (la._launch(add_kernel, base, h, w, tile=bt and (bt, bn, warps)),)

        sweep(f"lora_add ({t}, {n})", run, 2 * t * n * 2, bandwidth, rows)

    env = environment()
    append_results([{**env, **row} for row in rows])


if __name__ == "__main__":
    main()
