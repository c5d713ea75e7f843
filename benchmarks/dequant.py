"""NF4 -> fp16/bf16 dequantization on the GPU: our single Triton kernel vs bitsandbytes vs the PyTorch
reference, with the device-to-device copy bandwidth measured in the same run.

    python benchmarks/dequant.py [--sweep] [--quick]

For every shape and dtype: bit-exactness against bitsandbytes (and the reference), the time per call as a
Python caller sees it (host overhead included), the GPU time (profiler kernel durations), the kernels per
call, and the achieved bandwidth (packed bytes + statistics read, output written) as a share of the copy
bandwidth. Prints a table last and appends JSON lines to benchmarks/results.jsonl.

Targets (H100): >= 1.5x bitsandbytes per call on every shape; >= 90% of copy bandwidth from 16M elements.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_results, copy_bandwidth_tbs, environment, gpu_time_us, host_time_us  # noqa: E402

from qlora_fsdp.nf4 import dequantize_nf4, dequantize_reference, nf4_to_bnb, quantize_nf4  # noqa: E402
from qlora_fsdp.nf4 import triton_dequant  # noqa: E402

# (rows, cols) of the weight, with where the shape comes from. Unsloth's challenge MLPs are
# hidden x intermediate = 2048x8192, 1024x4096, 4096x14336: gate/up are (inter, hidden), down (hidden, inter).
SHAPES = {
    (4096, 4096): "Llama-3.1-8B q/o_proj",
    (1024, 4096): "Llama-3.1-8B k/v_proj; Unsloth MLP2 down",
    (14336, 4096): "Llama-3.1-8B gate/up; Unsloth MLP3 gate/up",
    (4096, 14336): "Llama-3.1-8B down; Unsloth MLP3 down",
    (128256, 4096): "Llama-3.1-8B lm_head",
    (8192, 2048): "Unsloth MLP1 gate/up",
    (2048, 8192): "Unsloth MLP1 down",
    (4096, 1024): "Unsloth MLP2 gate/up",
}
L2_BYTES = 50 << 20


def moved_bytes(w, dtype) -> int:
    """Fewest bytes a dequantization must move: every stored byte read once, every output written once."""
    return w.nbytes() + w.numel * torch.finfo(dtype).bits // 8


def make_weights(rows: int, cols: int, dtype: torch.dtype):
    """Enough independent weights that rotating through them defeats the L2 cache (at most 4)."""
    one = rows * cols * (0.5 + torch.finfo(dtype).bits / 8)
    copies = max(1, min(4, int(3 * L2_BYTES // one) + 1))
    return [quantize_nf4(torch.randn(rows, cols, device="cuda", dtype=dtype) * 0.02) for _ in range(copies)]


def check_exact(weights, dtype) -> bool:
    import bitsandbytes.functional as bnbF

    w = weights[0]
    ours = dequantize_nf4(w, dtype)
    packed, qs = nf4_to_bnb(w)
    qs.dtype = dtype
    theirs = bnbF.dequantize_4bit(packed, qs)
    ok = torch.equal(ours, theirs)
    if w.numel <= 64 << 20:  # the reference needs ~20 bytes an element of scratch
        ok = ok and torch.equal(ours, dequantize_reference(w, dtype))
    return ok


def check_quantize_exact(rows: int, cols: int, dtype: torch.dtype) -> bool:
    """quantize_nf4 on CUDA vs bitsandbytes' CUDA quantize_4bit, bit for bit."""
    import bitsandbytes.functional as bnbF

    x = torch.randn(rows, cols, device="cuda", dtype=dtype) * 0.02
    ours = quantize_nf4(x)
    packed, qs = bnbF.quantize_4bit(x, blocksize=64, compress_statistics=True, quant_type="nf4")
    return (
        torch.equal(ours.data, packed.view(-1))
        and torch.equal(ours.absmax, qs.absmax)
        and torch.equal(ours.nested_absmax, qs.state2.absmax)
        and torch.equal(ours.offset, qs.offset)
    )


def measure(impl: str, weights, dtype, iters: int) -> dict:
    import bitsandbytes.functional as bnbF

    if impl == "ours":
        fn = lambda i: dequantize_nf4(weights[i % len(weights)], dtype)  # noqa: E731
    elif impl == "ours_op":  # through the custom-op dispatcher, as torch.compile'd code calls it
        def fn(i):
            w = weights[i % len(weights)]
            return torch.ops.qlora_fsdp.dequantize_nf4(w.data, w.absmax, w.quant_map, w.nested_absmax,
                                                       w.nested_quant_map, w.offset, list(w.shape), w.blocksize,
                                                       w.nested_blocksize, dtype)  # fmt: skip
    elif impl == "bitsandbytes":
        states = []
        for w in weights:
            packed, qs = nf4_to_bnb(w)
            qs.dtype = dtype
            states.append((packed, qs))
        fn = lambda i: bnbF.dequantize_4bit(*states[i % len(states)])  # noqa: E731
    elif impl == "reference":
        fn = lambda i: dequantize_reference(weights[i % len(weights)], dtype)  # noqa: E731
        iters = max(3, iters // 20)
    else:
        raise ValueError(impl)
    host = host_time_us(fn, iters)
    gpu, kernels = gpu_time_us(fn, min(iters, 50))
    return {"impl": impl, "host_us": host, "gpu_us": gpu, "kernels": kernels}


def sweep(copy_tbs: float) -> list[dict]:
    """GPU time of launch configurations on a large and a mid-size shape (bf16)."""
    rows = []
    saved = triton_dequant.ELEMENTS_PER_PROGRAM, triton_dequant.NUM_WARPS
    for shape in [(14336, 4096), (4096, 4096)]:
        weights = make_weights(*shape, torch.bfloat16)
        for elements in (1024, 2048, 4096, 8192, 16384):
            for warps in (2, 4, 8, 16):
                if elements // (32 * warps) < 8:  # fewer than 8 elements a thread
                    continue
                triton_dequant.ELEMENTS_PER_PROGRAM, triton_dequant.NUM_WARPS = elements, warps
                gpu, _ = gpu_time_us(lambda i: dequantize_nf4(weights[i % len(weights)], torch.bfloat16), 30)
                bw = moved_bytes(weights[0], torch.bfloat16) / gpu / 1e6
                rows.append({"shape": shape, "elements": elements, "warps": warps, "gpu_us": gpu,
                             "copy_share": bw / copy_tbs})  # fmt: skip
        del weights
    triton_dequant.ELEMENTS_PER_PROGRAM, triton_dequant.NUM_WARPS = saved
    print("\nlaunch-config sweep (bf16, GPU time):")
    print(f"{'shape':>14} {'elems/prog':>10} {'warps':>5} {'GPU us':>9} {'of copy BW':>10}")
    for r in rows:
        print(f"{str(r['shape']):>14} {r['elements']:>10} {r['warps']:>5} {r['gpu_us']:>9.1f} {r['copy_share']:>9.0%}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also sweep launch configurations")
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    parser.add_argument("--iters", type=int, default=200)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/dequant.py needs a CUDA GPU")
    iters = 30 if args.quick else args.iters
    env = environment()
    copy_tbs = copy_bandwidth_tbs()
    print(f"{env['gpu']}  torch {env['torch']}  triton {env['triton']}  copy bandwidth {copy_tbs:.2f} TB/s")
    if args.sweep:
        sweep_rows = sweep(copy_tbs)
        append_results([{**env, "bench": "dequant_sweep", "copy_tbs": copy_tbs, **r} for r in sweep_rows])

    quant_ok = {dtype: check_quantize_exact(4096, 4096, dtype) for dtype in (torch.bfloat16, torch.float16)}
    print("quantize_nf4 on CUDA bit-exact with bitsandbytes:", {str(k): v for k, v in quant_ok.items()})

    table, records = [], []
    for (rows, cols), origin in SHAPES.items():
        for dtype in (torch.bfloat16, torch.float16):
            weights = make_weights(rows, cols, dtype)
            exact = check_exact(weights, dtype)
            nbytes = moved_bytes(weights[0], dtype)
            res = {impl: measure(impl, weights, dtype, iters) for impl in ("ours", "ours_op", "bitsandbytes", "reference")}
            ours, bnb = res["ours"], res["bitsandbytes"]
            row = {
                **env, "bench": "dequant", "shape": [rows, cols], "origin": origin, "dtype": str(dtype),
                "elements": rows * cols, "bytes_moved": nbytes, "copy_tbs": copy_tbs, "bit_exact": exact,
                **{f"{k}_{m}": v[m] for k, v in res.items() for m in ("host_us", "gpu_us", "kernels")},
                "speedup_host": bnb["host_us"] / ours["host_us"], "speedup_gpu": bnb["gpu_us"] / ours["gpu_us"],
                "ours_copy_share": nbytes / ours["gpu_us"] / 1e6 / copy_tbs,
                "bnb_copy_share": nbytes / bnb["gpu_us"] / 1e6 / copy_tbs,
                "config": [triton_dequant.ELEMENTS_PER_PROGRAM, triton_dequant.NUM_WARPS],
            }  # fmt: skip
            records.append(row)
            table.append(row)
            del weights
            torch.cuda.empty_cache()
    path = append_results(records)

    print(f"\nNF4 dequant, {env['gpu']}, copy {copy_tbs:.2f} TB/s; per call from Python (host) and GPU time, us")
    header = (f"{'shape':>13} {'dtype':>5} {'exact':>5} | {'ours host':>9} {'op host':>8} {'bnb host':>9} {'ref host':>9} "
              f"{'x bnb':>6} | {'ours GPU':>8} {'bnb GPU':>8} {'k':>3} {'ours BW':>7} {'bnb BW':>6}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for r in table:
        dt = "bf16" if "bfloat" in r["dtype"] else "fp16"
        print(
            f"{'x'.join(map(str, r['shape'])):>13} {dt:>5} {'yes' if r['bit_exact'] else 'NO':>5} | "
            f"{r['ours_host_us']:>9.1f} {r['ours_op_host_us']:>8.1f} {r['bitsandbytes_host_us']:>9.1f} {r['reference_host_us']:>9.0f} "
            f"{r['speedup_host']:>5.2f}x | {r['ours_gpu_us']:>8.1f} {r['bitsandbytes_gpu_us']:>8.1f} "
            f"{r['bitsandbytes_kernels']:>3} {r['ours_copy_share']:>7.0%} {r['bnb_copy_share']:>6.0%}"
        )
    print("(op host = through the custom-op dispatcher, as compiled code calls it; k = bitsandbytes kernels a call,"
          " ours is 1; BW = share of copy bandwidth, GPU time.)")
    big = [r for r in table if r["elements"] >= 16 << 20]
    print(
        f"targets: >=1.5x bnb per call on every shape: min {min(r['speedup_host'] for r in table):.2f}x; "
        f">=90% of copy BW from 16M elements: min {min(r['ours_copy_share'] for r in big):.0%}; "
        f"all bit-exact: {all(r['bit_exact'] for r in table)}; results -> {path}"
    )


if __name__ == "__main__":
    main()
