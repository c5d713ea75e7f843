"""Single-kernel NF4 dequantization in Triton, registered as a `torch.library.triton_op`.

One launch does all of it: each program takes BLOCKS quant blocks, decodes their 8-bit absmax codes through
the dynamic map (`code[q] * nested_absmax + offset`), expands the packed nibbles through the NF4 code book,
scales, rounds once to the output dtype and writes the interleaved result. No intermediate buffer: the
fp32 absmax lives in registers only.

Bit-exactness: the absmax multiply uses `mul_rn` on GPUs so the compiler cannot fuse it with the following
add into an fma (bitsandbytes rounds the two apart); the interpreter runs numpy, which never fuses. The
interpreter truncates fp32 -> bf16 casts, so there the kernel rounds to nearest even with integer ops.

Dispatch (`dequantize_nf4`): CUDA tensors run the kernel (through `wrap_triton`, so `torch.compile` traces it
with no graph break); CPU tensors run the kernel under `TRITON_INTERPRET=1` in eager mode (how CI tests it)
and the pure-PyTorch reference otherwise, including while being traced.
"""

from __future__ import annotations

import os
import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .format import FLOAT_DTYPES, NF4FormatError, NF4Weight
from .reference import dequantize_nf4_reference

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton ships with torch on Linux
    HAS_TRITON = False


def triton_interpreting() -> bool:
    """True when Triton kernels run in its CPU interpreter (TRITON_INTERPRET=1 when triton was imported)."""
    if not HAS_TRITON:
        return False
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")  # triton < 3.4


# Elements written per program. Tuned on an H100 with `benchmarks/dequant.py --sweep` (2026-11-26: 2048 x 2 warps
# was fastest or within 1% of it on 14336x4096 and 4096x4096).
ELEMENTS_PER_PROGRAM = 2048
NUM_WARPS = 2

if HAS_TRITON:

    @triton.jit
    def _nf4_dequant_kernel(
        data_ptr,  # (ceil(n/2),) uint8
        absmax_ptr,  # (n_blocks,) uint8 [DOUBLE_QUANT] | float32
        quant_map_ptr,  # (16,) float32
        nested_absmax_ptr,  # (ceil(n_blocks/NESTED),) float32   [DOUBLE_QUANT]
        nested_map_ptr,  # (256,) float32                       [DOUBLE_QUANT]
        offset_ptr,  # () float32                             [DOUBLE_QUANT]
        out_ptr,  # (n,) fp16 | bf16 | fp32
        n,  # elements
        BLOCKSIZE: tl.constexpr,  # elements per quant block
        NESTED: tl.constexpr,  # quant blocks per nested absmax
        BLOCKS: tl.constexpr,  # quant blocks per program
        DOUBLE_QUANT: tl.constexpr,
        COMPILED: tl.constexpr,  # False in the interpreter (see the module docstring)
        BF16_BY_BITS: tl.constexpr,  # interpreter and bf16 output: round on the bits
        FULL: tl.constexpr,  # every program covers BLOCKS whole quant blocks: no masks
    ):
        HALF: tl.constexpr = BLOCKSIZE // 2
        first = tl.program_id(0).to(tl.int64) * BLOCKS  # first quant block of this program (int64 base)
        n_blocks = tl.cdiv(n, BLOCKSIZE)
        q_idx = tl.arange(0, BLOCKS)  # (BLOCKS,)
        q_in = q_idx < (n_blocks - first)  # masked-off lanes load garbage that stays in range, never stored

        if DOUBLE_QUANT:
            q = tl.load(absmax_ptr + first + q_idx, mask=None if FULL else q_in)
            code = tl.load(nested_map_ptr + q.to(tl.int32))
            scale = tl.load(nested_absmax_ptr + (first + q_idx) // NESTED, mask=None if FULL else q_in)
            if COMPILED:
                absmax = libdevice.mul_rn(code, scale)
            else:
                absmax = code * scale
            absmax = absmax + tl.load(offset_ptr)
        else:
            absmax = tl.load(absmax_ptr + first + q_idx, mask=None if FULL else q_in)

        # (BLOCKS, HALF) packed bytes, local offsets in int32 from an int64 base
        byte = q_idx[:, None] * HALF + tl.arange(0, HALF)[None, :]
        bytes_left = tl.cdiv(n, 2) - first * HALF
        packed = tl.load(data_ptr + first * HALF + byte, mask=None if FULL else byte < bytes_left,
                         eviction_policy="evict_first")  # read once: don't keep it in L1/L2
        hi = tl.load(quant_map_ptr + (packed >> 4).to(tl.int32)) * absmax[:, None]
        lo = tl.load(quant_map_ptr + (packed & 0xF).to(tl.int32)) * absmax[:, None]
        values = tl.interleave(hi, lo)  # (BLOCKS, BLOCKSIZE): high nibble -> even element

        elem = q_idx[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
        elems_left = n - first * BLOCKSIZE
        if BF16_BY_BITS:  # round to nearest, ties to even, on the bits (finite values)
            bits = values.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            values = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            values = values.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + first * BLOCKSIZE + elem, values, mask=None if FULL else elem < elems_left,
                 cache_modifier=".cs")  # streaming store


def _launch(kernel, data, absmax, quant_map, nested_absmax, nested_quant_map, offset, out, blocksize, nested_blocksize):
    n = out.numel()
    blocks = max(1, ELEMENTS_PER_PROGRAM // blocksize)
    double_quant = nested_absmax is not None
    interpreting = triton_interpreting()
    if not double_quant:  # the kernel never reads these; any float32 tensor fills the slots
        nested_absmax = nested_quant_map = offset = absmax
    grid = (triton.cdiv(triton.cdiv(n, blocksize), blocks),)
    kernel[grid](
        data, absmax, quant_map, nested_absmax, nested_quant_map, offset, out, n,
        BLOCKSIZE=blocksize, NESTED=nested_blocksize, BLOCKS=blocks, DOUBLE_QUANT=double_quant,
        COMPILED=not interpreting, BF16_BY_BITS=interpreting and out.dtype == torch.bfloat16,
        FULL=n % (blocks * blocksize) == 0, num_warps=NUM_WARPS,
    )  # fmt: skip
    return out


def _run_in_interpreter(t: Tensor) -> bool:
    """True for a real (not fake) tensor outside torch.compile while Triton's interpreter is on: launch the kernel
    there; otherwise a CPU op takes its PyTorch reference."""
    if not triton_interpreting():
        return False
    from torch._subclasses.fake_tensor import is_fake

    return not is_fake(t) and not torch.compiler.is_compiling()


def kernel_for(kernel, t: Tensor):
    """How a triton_op launches `kernel` on `t`'s device: through wrap_triton on CUDA (traceable by torch.compile),
    as it is in the interpreter (`_run_in_interpreter`); None where the op takes its PyTorch reference."""
    if t.device.type == "cuda" and HAS_TRITON:
        return torch.library.wrap_triton(kernel)
    return kernel if _run_in_interpreter(t) else None


@torch.library.triton_op("qlora_fsdp::dequantize_nf4", mutates_args=())
def dequantize_nf4_op(
    data: Tensor,
    absmax: Tensor,
    quant_map: Tensor,
    nested_absmax: Tensor | None,
    nested_quant_map: Tensor | None,
    offset: Tensor | None,
    shape: list[int],
    blocksize: int,
    nested_blocksize: int,
    dtype: torch.dtype,
) -> Tensor:
    """NF4 tensors of one weight -> a new contiguous `shape` tensor of `dtype` (see the module docstring)."""
    kernel = kernel_for(_nf4_dequant_kernel, data) if HAS_TRITON else None
    if kernel is not None:
        out = torch.empty(shape, dtype=dtype, device=data.device)
        return _launch(kernel, data, absmax, quant_map, nested_absmax, nested_quant_map, offset, out,
                       blocksize, nested_blocksize)  # fmt: skip
    return dequantize_nf4_reference(
        data, absmax, quant_map, nested_absmax, nested_quant_map, offset, shape, blocksize, nested_blocksize, dtype
    )


def plain_eager_cuda(t: Tensor) -> bool:
    """True for a plain CUDA tensor outside any tracing or dispatch mode: the kernel can launch directly."""
    return (
        HAS_TRITON and t.is_cuda and type(t) is Tensor and not torch.compiler.is_compiling()
        and _get_current_dispatch_mode() is None
    )  # fmt: skip


def dequantize_nf4(w: NF4Weight, dtype: torch.dtype | None = None) -> Tensor:
    """Dequantize an `NF4Weight` to a dense `w.shape` tensor of `dtype` (default: its original dtype).

    In plain eager CUDA code the kernel launches directly: the custom-op dispatcher costs ~35 us of host time
    a call (measured on an H100), more than the kernel itself on most Llama shapes. Anything traced, faked or
    wrapped goes through `torch.ops.qlora_fsdp.dequantize_nf4`.
    """
    dtype = dtype or w.dtype
    if dtype not in FLOAT_DTYPES:
        raise NF4FormatError(f"dequantize_nf4: output dtype {dtype} is not one of float16, bfloat16, float32")
    if plain_eager_cuda(w.data):
        out = torch.empty(w.shape, dtype=dtype, device=w.data.device)
        return _launch(_nf4_dequant_kernel, w.data, w.absmax, w.quant_map, w.nested_absmax, w.nested_quant_map,
                       w.offset, out, w.blocksize, w.nested_blocksize)  # fmt: skip
    return torch.ops.qlora_fsdp.dequantize_nf4(
        w.data, w.absmax, w.quant_map, w.nested_absmax, w.nested_quant_map, w.offset,
        list(w.shape), w.blocksize, w.nested_blocksize, dtype,
    )  # fmt: skip
