"""Host time of one NF4 dequant call, piece by piece (GPU only): where the per-call overhead goes on small shapes.

    python tools/launch_overhead.py [--shape 1024x4096]

Back-to-back calls, one synchronize at the end, mean per call over 2,000 calls (the GPU work of a 1024x4096 dequant,
about 4 us, hides under the host time): torch.empty of the output; Triton's launch through `kernel[grid](...)`;
the same compiled kernel launched directly (`CompiledKernel[grid](*args)`, Triton's own binder and cache lookup
skipped); the whole `dequantize_nf4`; bitsandbytes' `dequantize_4bit`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from qlora_fsdp.nf4 import dequantize_nf4, nf4_to_bnb, quantize_nf4  # noqa: E402
from qlora_fsdp.nf4 import triton_dequant as td  # noqa: E402


def per_call_us(fn, calls: int = 2000) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="1024x4096")
    args = p.parse_args()
    rows, cols = map(int, args.shape.split("x"))
    w = quantize_nf4(torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16) * 0.02)
    out = torch.empty(rows, cols, device="cuda", dtype=torch.bfloat16)
    n = out.numel()
    blocks = td.ELEMENTS_PER_PROGRAM // w.blocksize
    grid = (n // w.blocksize // blocks, 1, 1)
    kw = dict(BLOCKSIZE=w.blocksize, NESTED=w.nested_blocksize, BLOCKS=blocks, DOUBLE_QUANT=True, COMPILED=True,
              BF16_BY_BITS=False, FULL=True, num_warps=td.NUM_WARPS)  # fmt: skip
    pos = (w.data, w.absmax, w.quant_map, w.nested_absmax, w.nested_quant_map, w.offset, out, n)
    compiled = td._nf4_dequant_kernel[grid](*pos, **kw)
    # every argument in signature order, constexprs included, as JITFunction.run passes them
    all_args = (*pos, w.blocksize, w.nested_blocksize, blocks, True, True, False, True)
    runner = compiled[grid]
    results = {
        "torch.empty": per_call_us(lambda: torch.empty(rows, cols, device="cuda", dtype=torch.bfloat16)),
        "kernel[grid](...)": per_call_us(lambda: td._nf4_dequant_kernel[grid](*pos, **kw)),
        "CompiledKernel[grid](*args)": per_call_us(lambda: runner(*all_args)),
        "dequantize_nf4": per_call_us(lambda: dequantize_nf4(w, torch.bfloat16)),
    }
    direct = torch.full_like(out, float("nan"))  # poisoned: every element must be written
    compiled[grid](*all_args[:6], direct, *all_args[7:])
    torch.cuda.synchronize()
    exact = torch.equal(direct, dequantize_nf4(w, torch.bfloat16))
    try:
        import bitsandbytes.functional as bnbF

        packed, qs = nf4_to_bnb(w)
        qs.dtype = torch.bfloat16
        results["bitsandbytes dequantize_4bit"] = per_call_us(lambda: bnbF.dequantize_4bit(packed, qs))
    except ImportError:
        pass
    print(f"{torch.cuda.get_device_name()}, {args.shape} bf16, host us per call (back-to-back):")
    for name, us in results.items():
        print(f"  {name:<32}{us:8.1f}")
    print(f"  direct launch bit-exact: {exact}")


if __name__ == "__main__":
    main()
