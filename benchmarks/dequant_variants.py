"""Where the NF4 dequant kernel's time goes, and which kernel variant is fastest (GPU only; a tuning aid).

    python benchmarks/dequant_variants.py [--shapes 14336x4096,128256x4096] [--quick]

Measured in one run, bf16 output, time per call of back-to-back launches (CUDA events around 20 calls,
median of 15 batches, weights rotated so that nothing stays in the L2):
- the ceilings: torch's device copy (read + write), torch's fill (write only), and a Triton kernel with exactly
  the dequant's memory traffic and no table lookups (`pattern`), and one with its loads only;
- bitsandbytes' `dequantize_4bit` and the production kernel (`qlora_fsdp.nf4.dequantize_nf4`);
- variants of the production kernel: cache / eviction hints on the packed load and on the store, a
  persistent grid, the bulk tensor copy engine (TMA, Hopper) for the stores and the loads, and launch shapes. Each variant is checked bit-exact against the production kernel.
Prints one table (us, share of copy bandwidth, ratio to bitsandbytes); appends JSON lines to the results file.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_results, copy_bandwidth_tbs, environment  # noqa: E402

from qlora_fsdp.nf4 import dequantize_nf4, nf4_to_bnb, quantize_nf4  # noqa: E402


@triton.jit
def _variant_kernel(
    data_ptr, absmax_ptr, quant_map_ptr, nested_absmax_ptr, nested_map_ptr, offset_ptr, out_ptr,  # as production
    n_tiles,  # programs' worth of work: n / (BLOCKS * BLOCKSIZE), whole tiles only
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, BLOCKS: tl.constexpr,
    LOAD_HINT: tl.constexpr,  # 0 none, 1 .cg (L2 only), 2 evict_first
    STORE_HINT: tl.constexpr,  # 0 none, 1 .cs (streaming), 2 evict_first
    PATTERN: tl.constexpr,  # 1: same loads and stores, no table lookups (the traffic-only ceiling); 2: loads only
    PERSISTENT: tl.constexpr,  # True: a grid of a few programs per SM loops over the tiles
):
    HALF: tl.constexpr = BLOCKSIZE // 2
    pid = tl.program_id(0)
    step = tl.num_programs(0) if PERSISTENT else n_tiles
    q_idx = tl.arange(0, BLOCKS)  # (BLOCKS,)
    byte = q_idx[:, None] * HALF + tl.arange(0, HALF)[None, :]  # (BLOCKS, HALF)
    elem = q_idx[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]  # (BLOCKS, BLOCKSIZE)
    for tile in tl.range(pid, n_tiles, step):
        first = tile.to(tl.int64) * BLOCKS
        q = tl.load(absmax_ptr + first + q_idx)
        code = tl.load(nested_map_ptr + q.to(tl.int32))
        scale = tl.load(nested_absmax_ptr + (first + q_idx) // NESTED)
        absmax = libdevice.mul_rn(code, scale) + tl.load(offset_ptr)
        if LOAD_HINT == 1:
            packed = tl.load(data_ptr + first * HALF + byte, cache_modifier=".cg")
        elif LOAD_HINT == 2:
            packed = tl.load(data_ptr + first * HALF + byte, eviction_policy="evict_first")
        else:
            packed = tl.load(data_ptr + first * HALF + byte)
        if PATTERN:
            hi = (packed >> 4).to(tl.float32) * absmax[:, None]
            lo = (packed & 0xF).to(tl.float32) * absmax[:, None]
        else:
            hi = tl.load(quant_map_ptr + (packed >> 4).to(tl.int32)) * absmax[:, None]
            lo = tl.load(quant_map_ptr + (packed & 0xF).to(tl.int32)) * absmax[:, None]
        values = tl.interleave(hi, lo).to(out_ptr.dtype.element_ty)  # (BLOCKS, BLOCKSIZE)
        dst = out_ptr + first * BLOCKSIZE + elem
        if PATTERN == 2:
            tl.store(dst, values, mask=values == 1234.5)  # never true: no write traffic, loads stay live
        elif STORE_HINT == 1:
            tl.store(dst, values, cache_modifier=".cs")
        elif STORE_HINT == 2:
            tl.store(dst, values, eviction_policy="evict_first")
        else:
            tl.store(dst, values)


@triton.jit
def _tma_kernel(
    data_desc,  # TensorDescriptor over data viewed (n / BLOCKSIZE, BLOCKSIZE / 2) uint8, block (BLOCKS, HALF)
    absmax_ptr, quant_map_ptr, nested_absmax_ptr, nested_map_ptr, offset_ptr,
    out_desc,  # TensorDescriptor over out viewed (n / BLOCKSIZE, BLOCKSIZE), block (BLOCKS, BLOCKSIZE)
    data_ptr,  # plain pointer for TMA_LOAD=False
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, BLOCKS: tl.constexpr, TMA_LOAD: tl.constexpr,
):
    """The production math with the bulk tensor copy engine (Hopper) moving the output, and optionally the input."""
    HALF: tl.constexpr = BLOCKSIZE // 2
    first = tl.program_id(0).to(tl.int64) * BLOCKS
    q_idx = tl.arange(0, BLOCKS)
    q = tl.load(absmax_ptr + first + q_idx)
    code = tl.load(nested_map_ptr + q.to(tl.int32))
    scale = tl.load(nested_absmax_ptr + (first + q_idx) // NESTED)
    absmax = libdevice.mul_rn(code, scale) + tl.load(offset_ptr)
    if TMA_LOAD:
        packed = data_desc.load([(first).to(tl.int32), 0])
    else:
        byte = q_idx[:, None] * HALF + tl.arange(0, HALF)[None, :]
        packed = tl.load(data_ptr + first * HALF + byte, eviction_policy="evict_first")
    hi = tl.load(quant_map_ptr + (packed >> 4).to(tl.int32)) * absmax[:, None]
    lo = tl.load(quant_map_ptr + (packed & 0xF).to(tl.int32)) * absmax[:, None]
    values = tl.interleave(hi, lo).to(out_desc.dtype)  # (BLOCKS, BLOCKSIZE)
    out_desc.store([(first).to(tl.int32), 0], values)


def run_tma(w, out, elements, warps, tma_load=False):
    from triton.tools.tensor_descriptor import TensorDescriptor

    blocks = elements // w.blocksize
    half = w.blocksize // 2
    data_desc = TensorDescriptor.from_tensor(w.data.view(-1, half), block_shape=[blocks, half])
    out_desc = TensorDescriptor.from_tensor(out.view(-1, w.blocksize), block_shape=[blocks, w.blocksize])
    _tma_kernel[(w.numel // elements,)](
        data_desc, w.absmax, w.quant_map, w.nested_absmax, w.nested_quant_map, w.offset, out_desc, w.data,
        BLOCKSIZE=w.blocksize, NESTED=w.nested_blocksize, BLOCKS=blocks, TMA_LOAD=tma_load, num_warps=warps,
    )  # fmt: skip
    return out


@triton.jit
def _prefetch_kernel(
    data_ptr, absmax_ptr, quant_map_ptr, nested_absmax_ptr, nested_map_ptr, offset_ptr, out_ptr,
    n_tiles, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, BLOCKS: tl.constexpr,
):
    """Persistent production math with the next tile's packed bytes loaded before this tile's stores (software
    prefetch in registers): each program keeps one load in flight while it writes."""
    HALF: tl.constexpr = BLOCKSIZE // 2
    pid = tl.program_id(0)
    step = tl.num_programs(0)
    q_idx = tl.arange(0, BLOCKS)
    byte = q_idx[:, None] * HALF + tl.arange(0, HALF)[None, :]  # (BLOCKS, HALF)
    elem = q_idx[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]  # (BLOCKS, BLOCKSIZE)
    nxt = tl.load(data_ptr + pid.to(tl.int64) * BLOCKS * HALF + byte, eviction_policy="evict_first")
    for tile in tl.range(pid, n_tiles, step):
        packed = nxt
        ahead = tl.minimum(tile + step, n_tiles - 1).to(tl.int64)  # the last tile reloads itself: in range
        nxt = tl.load(data_ptr + ahead * BLOCKS * HALF + byte, eviction_policy="evict_first")
        first = tile.to(tl.int64) * BLOCKS
        q = tl.load(absmax_ptr + first + q_idx)
        code = tl.load(nested_map_ptr + q.to(tl.int32))
        scale = tl.load(nested_absmax_ptr + (first + q_idx) // NESTED)
        absmax = libdevice.mul_rn(code, scale) + tl.load(offset_ptr)
        hi = tl.load(quant_map_ptr + (packed >> 4).to(tl.int32)) * absmax[:, None]
        lo = tl.load(quant_map_ptr + (packed & 0xF).to(tl.int32)) * absmax[:, None]
        values = tl.interleave(hi, lo).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + first * BLOCKSIZE + elem, values, cache_modifier=".cs")


def run_prefetch(w, out, elements, warps, persistent=4):
    blocks = elements // w.blocksize
    n_tiles = w.numel // elements
    grid = (min(n_tiles, persistent * torch.cuda.get_device_properties(0).multi_processor_count),)
    _prefetch_kernel[grid](
        w.data, w.absmax, w.quant_map, w.nested_absmax, w.nested_quant_map, w.offset, out, n_tiles,
        BLOCKSIZE=w.blocksize, NESTED=w.nested_blocksize, BLOCKS=blocks, num_warps=warps,
    )  # fmt: skip
    return out


@triton.jit
def _fill_kernel(out_ptr, value, ELEMENTS: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * ELEMENTS + tl.arange(0, ELEMENTS)
    tl.store(out_ptr + offs, tl.full((ELEMENTS,), value, out_ptr.dtype.element_ty))


def run_variant(w, out, elements, warps, load_hint=0, store_hint=0, pattern=0, persistent=0):
    blocks = elements // w.blocksize
    n_tiles = w.numel // elements
    grid = (min(n_tiles, persistent * torch.cuda.get_device_properties(0).multi_processor_count),) if persistent \
        else (n_tiles,)  # fmt: skip
    _variant_kernel[grid](
        w.data, w.absmax, w.quant_map, w.nested_absmax, w.nested_quant_map, w.offset, out, n_tiles,
        BLOCKSIZE=w.blocksize, NESTED=w.nested_blocksize, BLOCKS=blocks, LOAD_HINT=load_hint,
        STORE_HINT=store_hint, PATTERN=pattern, PERSISTENT=bool(persistent), num_warps=warps,
    )  # fmt: skip
    return out


def per_call_us(fn, calls: int = 20, batches: int = 15) -> float:
    """Median over batches of the event-timed mean per call of `calls` back-to-back calls fn(i)."""
    for i in range(3):
        fn(i)
    torch.cuda.synchronize()
    times = []
    for b in range(batches):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(calls):
            fn(b * calls + i)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="14336x4096,128256x4096")
    parser.add_argument("--quick", action="store_true", help="fewer launch shapes")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/dequant_variants.py needs a CUDA GPU")
    import bitsandbytes.functional as bnbF

    env = environment()
    copy_tbs = copy_bandwidth_tbs()
    print(f"{env['gpu']}  torch {env['torch']}  triton {env['triton']}  copy {copy_tbs:.3f} TB/s", flush=True)
    dtype = torch.bfloat16
    launch_shapes = [(2048, 2), (8192, 8)] if args.quick else \
        [(2048, 2), (4096, 4), (8192, 8), (16384, 8), (16384, 16), (32768, 16)]  # fmt: skip
    rows = []
    for spec in args.shapes.split(","):
        r, c = map(int, spec.split("x"))
        n = r * c
        copies = 2 if n >= 32 << 20 else 4
        weights = [quantize_nf4(torch.randn(r, c, device="cuda", dtype=dtype) * 0.02) for _ in range(copies)]
        nbytes = weights[0].nbytes() + 2 * n  # fewest bytes: stored bytes read once, bf16 output written once
        outs = [torch.empty(r, c, device="cuda", dtype=dtype) for _ in range(2)]
        expect = dequantize_nf4(weights[0], dtype)

        def record(name, us, exact=None, **cfg):
            row = {**env, "bench": "dequant_variant", "shape": [r, c], "variant": name, "us": us,
                   "bytes_moved": nbytes, "copy_tbs": copy_tbs, "copy_share": nbytes / us / 1e6 / copy_tbs,
                   "bit_exact": exact, **cfg}  # fmt: skip
            rows.append(row)
            print(f"{spec:>12} {name:<34} {us:8.1f} us  {row['copy_share']:6.1%} of copy"
                  + ("" if exact is None else f"  exact={exact}"), flush=True)

        # ceilings
        src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda").random_()
        dst = torch.empty_like(src)
        record("torch copy, same bytes", per_call_us(lambda i: dst.copy_(src)))
        src = dst = None
        record("torch fill bf16 output", per_call_us(lambda i: outs[i % 2].fill_(1.0)))
        record("triton fill bf16 output", per_call_us(lambda i: _fill_kernel[(n // 4096,)](outs[i % 2], 1.0, ELEMENTS=4096, num_warps=4)))
        # the peers
        states = []
        for w in weights:
            packed, qs = nf4_to_bnb(w)
            qs.dtype = dtype
            states.append((packed, qs))
        bnb_us = per_call_us(lambda i: bnbF.dequantize_4bit(*states[i % copies]))
        record("bitsandbytes dequantize_4bit", bnb_us, torch.equal(bnbF.dequantize_4bit(*states[0]), expect))
        states = None
        record("production dequantize_nf4", per_call_us(lambda i: dequantize_nf4(weights[i % copies], dtype)))
        # variants
        for elements, warps in launch_shapes:
            cfg = {"elements": elements, "warps": warps}
            variants = [("pattern only (no lookups)", run_variant, dict(pattern=1)),
                        ("loads only", run_variant, dict(pattern=2)), ("base", run_variant, {}),
                        ("load .cg", run_variant, dict(load_hint=1)),
                        ("load evict_first", run_variant, dict(load_hint=2)),
                        ("store .cs", run_variant, dict(store_hint=1)),
                        ("store evict_first", run_variant, dict(store_hint=2)),
                        ("load evict_first + store .cs", run_variant, dict(load_hint=2, store_hint=1)),
                        ("persistent x8", run_variant, dict(persistent=8)),
                        ("persistent x16", run_variant, dict(persistent=16)),
                        ("persistent x4 + prefetch", run_prefetch, dict(persistent=4)),
                        ("persistent x8 + prefetch", run_prefetch, dict(persistent=8)),
                        ("persistent x16 + prefetch", run_prefetch, dict(persistent=16)),
                        ("TMA store", run_tma, {}), ("TMA load + store", run_tma, dict(tma_load=True))]  # fmt: skip
            for name, fn, kw in variants:
                try:
                    out = fn(weights[0], outs[0], elements, warps, **kw)
                    exact = None if kw.get("pattern") else torch.equal(out, expect)
                    us = per_call_us(lambda i: fn(weights[i % copies], outs[i % 2], elements, warps, **kw))
                    record(f"{name} [{elements}x{warps}w]", us, exact, **cfg, **kw)
                except Exception as e:  # noqa: BLE001 - a variant that does not compile is a result too
                    print(f"{spec:>12} {name} [{elements}x{warps}w] failed: {type(e).__name__}: {str(e)[:200]}")
        print(f"{spec}: 1.5x bitsandbytes needs <= {bnb_us / 1.5:.1f} us", flush=True)
        weights = outs = expect = None
        torch.cuda.empty_cache()
    path = append_results(rows)
    print("\nbest per shape (bit-exact variants):")
    for spec in args.shapes.split(","):
        shape = list(map(int, spec.split("x")))
        mine = [x for x in rows if x["shape"] == shape]
        bnb = next(x["us"] for x in mine if x["variant"].startswith("bitsandbytes"))
        good = sorted((x for x in mine if x["bit_exact"] and not x["variant"].startswith("bitsandbytes")),
                      key=lambda x: x["us"])  # fmt: skip
        for x in good[:5]:
            print(f"{spec:>12} {x['variant']:<40} {x['us']:8.1f} us {x['copy_share']:6.1%} of copy  {bnb / x['us']:.2f}x bnb")
    print(f"results -> {path}")


if __name__ == "__main__":
    main()
