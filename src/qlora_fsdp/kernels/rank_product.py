"""The rank-r LoRA product as a Triton tile, for kernels that add it to a base output instead of writing it.

    lora = rank_product_tile(h_ptr, w_ptr, rows, cols, T, N, R, ...)    # (BT, BN) fp32 tile of h @ w^T
    with h (T, R) the scaled rank-r activations lora_A(x) * s and w (N, R) the lora_B weight, both contiguous

R is padded to RP, a power of two of at least 16 (tl.dot's smallest K); the padding and the rows and columns past
T and N load as zeros. The product runs on the tensor cores with fp32 accumulation ("tf32" input precision only
matters for fp32 inputs; 16-bit inputs multiply exactly). Triton's interpreter multiplies 16-bit floats as raw
integers, so there the tiles are cast to fp32 first (DOT_FP32).
"""

from __future__ import annotations

import functools

import torch

from ..gpu import cuda_capability
from ..nf4.linear import compute_dtype
from ..nf4.triton_dequant import HAS_TRITON, kernel_for, plain_eager_cuda, triton_interpreting

# device types whose LoRA layers (lora/) take the fused autograd Functions (lora_add.py, lora_swiglu.py): CUDA runs their
# Triton kernels, CPU the PyTorch references inside the same Functions, so CPU runs have the GPU's autograd graph
FUSE_DEVICES = ("cuda", "cpu")
# whether CPU tensors run the fused LoRA kernels in Triton's interpreter (the kernel tests) instead of the references
INTERPRET_ON_CPU = False
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # others (fp64) take the references

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def rank_product_tile(
        h_ptr, w_ptr,  # (T, R), (N, R) contiguous
        rows, cols,  # (BT,), (BN,) indices of the tile
        T, N, R,
        RP: tl.constexpr, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    ):  # fmt: skip
        ks = tl.arange(0, RP)  # (RP,)
        k_ok = ks < R
        h_offs = rows[:, None].to(tl.int64) * R + ks[None, :]  # (BT, RP)
        w_offs = cols[None, :].to(tl.int64) * R + ks[:, None]  # (RP, BN): the transposed weight tile
        h = tl.load(h_ptr + h_offs, mask=(rows < T)[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + w_offs, mask=k_ok[:, None] & (cols < N)[None, :], other=0.0)
        if DOT_FP32:
            h, w = h.to(tl.float32), w.to(tl.float32)
        return tl.dot(h, w, input_precision=PRECISION)  # (BT, BN) fp32


def without_autocast(reference):
    """A fused kernel's PyTorch reference with autocast off on its first argument's device: the kernel's math is
    fixed (fp32 accumulation, one rounding), and autocast reaches an op's body in some modes and not in others (eager
    against torch.compile), which would round the product to 16 bits in one and not the other."""

    @functools.wraps(reference)
    def run(*args, **kwargs):
        with torch.autocast(args[0].device.type, enabled=False):
            return reference(*args, **kwargs)

    return run


def lora_kernel(kernel, t: torch.Tensor):
    """How a fused LoRA op launches `kernel` on `t` (kernel_for), or None for its PyTorch reference: CPU tensors take
    the reference unless INTERPRET_ON_CPU asks for the interpreter (training on CPU must not run interpreted kernels)."""
    if not HAS_TRITON or t.dtype not in KERNEL_DTYPES or (t.device.type != "cuda" and not INTERPRET_ON_CPU):
        return None
    return kernel_for(kernel, t)


def launches_directly(t: torch.Tensor) -> bool:
    """Whether a fused LoRA op on `t` launches its kernel itself, bypassing the `torch.ops` dispatcher: plain eager
    CUDA tensors of a kernel dtype (nf4/triton_dequant.py plain_eager_cuda). Dispatching a `triton_op` in eager mode
    costs more host time than the launch (the op's `lora_add` ~130 us a call in benchmarks/fsdp_profile.py on an
    H200, about half of it the dispatcher and `wrap_triton`), and a 1 x 2048 step is bound by host time. Traced,
    faked or wrapped tensors take the op: the same kernel and arguments, what torch.compile sees."""
    return t.dtype in KERNEL_DTYPES and plain_eager_cuda(t)


def dot_options(r: int, dtype: torch.dtype) -> dict:
    """The constexpr arguments of rank_product_tile for rank r and inputs of dtype."""
    interpreting = triton_interpreting()
    return {"RP": max(16, triton.next_power_of_2(r)), "DOT_FP32": interpreting,
            "PRECISION": "ieee" if interpreting or dtype == torch.float32 else "tf32"}  # fmt: skip


# Shared memory per block, in bytes, that Triton 3.9 gives the fused LoRA kernels at their launch tiles (lora_add.TILE
# 64 x 128, lora_swiglu.FORWARD_TILE 32 x 128 and BACKWARD_TILE 16 x 128, 4 warps), against RP, the rank padded as
# in dot_options; measured by compiling them ahead of time (tests/kernels/test_compile_ahead.py compiles them for
# sm75 and sm90 and fails where one needs more than fused_shared_bytes or than its GPU has):
#                                       lora_add          lora_swiglu forward   lora_swiglu backward (+ down_a)
#   16-bit, sm75 (tl.dot on FMA units)  512 RP            512 RP                512 RP
#   16-bit, sm80-89, sm120 (mma)        384 RP + 2,048    640 RP + 2,048        576 RP + 2,048
#   16-bit, sm90 (wgmma)                384 RP + 8,192    640 RP + 2,048        576 RP + 2,048
#   16-bit, sm100                       384 RP + 16,384   640 RP + 2,048        576 RP + 2,048
#   fp32 ("ieee": FMA units, any GPU)   768 RP            1,280 RP              1,152 RP
# (at RP 16 lora_add takes 14,336 on sm90 and 16,384 on sm80-89: small against every GPU's limit). So rank 128 in
# fp16 on a T4 takes 65,536 bytes, all it has; rank 256, 131,072.
SHARED_PER_BLOCK = {(7, 5): 65_536, (8, 0): 166_912, (8, 6): 101_376, (8, 7): 166_912, (8, 9): 101_376,
                    (9, 0): 232_448, (10, 0): 232_448, (10, 3): 232_448, (12, 0): 101_376}  # fmt: skip
# ^ the most shared memory a block can opt in to, per compute capability (CUDA C++ Programming Guide, technical
# specifications); a capability not listed takes the nearest listed one below it (the lowest: sm75)


def padded_rank(r: int) -> int:
    """RP of dot_options: r rounded up to a power of two, at least 16."""
    return max(16, 1 << (r - 1).bit_length())


def shared_memory_per_block(capability: tuple[int, int]) -> int:
    """Bytes of shared memory one block can use on a GPU of compute capability (major, minor) (SHARED_PER_BLOCK)."""
    below = [c for c in SHARED_PER_BLOCK if c <= tuple(capability)]
    return SHARED_PER_BLOCK[max(below) if below else min(SHARED_PER_BLOCK)]


def fused_shared_bytes(r: int, dtype: torch.dtype, capability: tuple[int, int]) -> int:
    """Shared memory per block of the most demanding fused LoRA kernel at rank r in dtype on a GPU of compute
    capability (major, minor): the table above, an upper bound of all of them (exact from RP 64 up)."""
    rp = padded_rank(r)
    if dtype.itemsize >= 4:
        return 1280 * rp  # the SwiGLU forward
    if tuple(capability) < (8, 0):
        return 512 * rp
    return max(640 * rp + 2048, 384 * rp + 16_384)  # the SwiGLU forward; lora_add at RP 16 and 32


def max_fused_rank(dtype: torch.dtype, capability: tuple[int, int]) -> int:
    """The largest LoRA rank whose fused-kernel tiles fit a block's shared memory on a GPU of compute capability
    (major, minor): a power of two (ranks pad to one). 16-bit: 128 on sm75, sm86, sm89, sm120; 256 on sm80, sm90,
    sm100. fp32: 32 on sm75; 64 on sm86, sm89, sm120; 128 on sm80, sm90, sm100."""
    if torch.compiler.is_compiling():  # Dynamo folds it to a constant; a dict it reads could change under it
        return _max_fused_rank(dtype, capability)
    key = (dtype, tuple(capability))  # eager: every LoRA layer asks at every call (takes_fused, check_fused_rank)
    if key not in _MAX_FUSED_RANK:
        _MAX_FUSED_RANK[key] = _max_fused_rank(dtype, capability)
    return _MAX_FUSED_RANK[key]


def _max_fused_rank(dtype: torch.dtype, capability: tuple[int, int]) -> int:
    limit, rp = shared_memory_per_block(capability), 16
    while fused_shared_bytes(2 * rp, dtype, capability) <= limit:
        rp *= 2
    return rp


_MAX_FUSED_RANK: dict[tuple[torch.dtype, tuple[int, int]], int] = {}


def check_fused_rank_for(r: int, dtype: torch.dtype, capability: tuple[int, int]) -> None:
    """ValueError, one line naming the largest rank that fits, if rank r in dtype does not fit (max_fused_rank)."""
    top = max_fused_rank(dtype, capability)
    if r > top:
        major, minor = capability
        raise ValueError(f"LoRA rank {r} in {str(dtype).removeprefix('torch.')} needs "
                         f"{fused_shared_bytes(r, dtype, capability):,} bytes of shared memory per block in the fused "
                         f"LoRA kernels; this GPU (sm{major}{minor}) has {shared_memory_per_block(capability):,}: "
                         f"use --lora-r {top} or less")  # fmt: skip


def check_fused_rank(r: int, dtype: torch.dtype, device: torch.device | str) -> None:
    """check_fused_rank_for the GPU of `device`; nothing for CPU tensors (Triton's interpreter has no such limit)."""
    capability = cuda_capability(device)
    if capability is not None:
        check_fused_rank_for(r, dtype, capability)


def fused_rank_fits(r: int, dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether check_fused_rank passes: for callers that take the unfused path instead of an error."""
    capability = cuda_capability(device)
    return capability is None or r <= max_fused_rank(dtype, capability)


# GPUs where Triton's tl.dot runs as FMA, without tensor cores (Triton 3.x on sm75: "Dot op using MMA for compute
# capability 75 has been deprecated"), and the largest padded rank for which the fused kernels stay memory-bound
# there. Roofline of a T4 (320 GB/s, 8.1 TFLOP/s of fp32 FMA: ridge at 25 FLOP/byte): lora_add reads and writes
# the (T, N) output, 4 bytes an element in 16-bit, for 2 RP FLOPs: RP / 2 FLOP/byte; the SwiGLU kernel reads two
# (T, I) inputs and writes one (6 bytes) for 4 RP FLOPs: 0.67 RP. At RP 16 that is 8 and 10.7 FLOP/byte, under
# half the ridge (FMA loops reach about half their peak), so the fused kernels keep their saving: the (T, N)
# product never written and read back. From RP 32 the SwiGLU kernel nears the ridge and cuBLAS's tensor cores win.
# A decision by the roofline: no T4 was at hand to measure.
FMA_DOT_BELOW = (8, 0)
FMA_MAX_PADDED_RANK = 16


def takes_fused(x: torch.Tensor, rank: int) -> bool:
    """Whether LoRA layers of `rank` take the fused kernels for the input x: its device is in FUSE_DEVICES, the
    rank fits the GPU in the compute dtype (autocast's, else x's), and on GPUs whose tl.dot is FMA (FMA_DOT_BELOW)
    the padded rank is at most FMA_MAX_PADDED_RANK; otherwise the unfused path (cuBLAS) runs."""
    if x.device.type not in FUSE_DEVICES:
        return False
    capability = cuda_capability(x.device)
    if capability is not None and capability < FMA_DOT_BELOW and padded_rank(rank) > FMA_MAX_PADDED_RANK:
        return False
    return fused_rank_fits(rank, compute_dtype(x), x.device)
