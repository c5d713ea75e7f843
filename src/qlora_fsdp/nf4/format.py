"""NF4 weights in bitsandbytes' exact format, and quantization bit-exact with bitsandbytes.

A weight of n elements, blocksize B and nested blocksize NB is stored as

    data              uint8   (ceil(n/2),)        two 4-bit codes a byte; the even element in the high nibble
    absmax            uint8   (ceil(n/B),)        8-bit codes of (block absmax - offset)      [double quant]
                      float32 (ceil(n/B),)        the block absmax itself                      [single quant]
    nested_absmax     float32 (ceil(n/B/NB),)     absmax of each run of NB absmax values       [double quant]
    nested_quant_map  float32 (256,)              bitsandbytes' signed 8-bit dynamic map       [double quant]
    offset            float32 ()                  mean of the block absmax                     [double quant]
    quant_map         float32 (16,)               the NF4 code book

and dequantizes as

    a_i = nested_quant_map[absmax[i]] * nested_absmax[i // NB] + offset      (fp32; multiply and add rounded apart)
    w_j = dtype(quant_map[code_j] * a_{j // B})                               (fp32 product, one rounding to dtype)

Quantization reproduces `bitsandbytes.functional.quantize_4bit(w, blocksize=B, compress_statistics=...,
quant_type="nf4")` bit for bit *on the device it runs on*: bitsandbytes itself computes differently on CPU
(torch ops for the 4-bit codes, a 65536-entry lookup table for the 8-bit absmax codes) and on CUDA (a
threshold tree with its own fp32 constants, a binary search over the dynamic map, and the fast-math approximate
reciprocal of each absmax), and we follow whichever device the weight is on.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import torch

from .fast_math import approx_reciprocal

# NF4 code book: quantiles of N(0, 1) scaled to [-1, 1] (QLoRA, Dettmers et al. 2023), as fp32.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip

VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class NF4FormatError(ValueError):
    """A weight, a quant state or a checkpoint entry that does not describe a valid NF4 weight."""


@functools.lru_cache(maxsize=None)
def nf4_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 NF4 values as a float32 tensor on `device` (cached; do not modify)."""
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


# The decision thresholds of bitsandbytes' CUDA NF4 quantizer (csrc/kernels.cu, dQuantizeNF4), as the
# decimal `float` literals it writes them: nvcc rounds each ONCE to fp32. Four of them (indices 0, 8, 12, 14)
# land one ulp away from the fp32 midpoints of the code book, which bitsandbytes' CPU path uses.
CUDA_TREE_LITERALS = (
    "-0.8480964004993439", "-0.6106329262256622", "-0.4599952697753906", "-0.33967943489551544",
    "-0.23460740596055984", "-0.13791173323988914", "-0.045525018125772476", "0.03979014977812767",
    "0.1202552504837513", "0.2035212516784668", "0.2920137718319893", "0.3893125355243683",
    "0.5016634166240692", "0.6427869200706482", "0.8614784181118011",
)  # fmt: skip


def decimal_to_fp32(literal: str) -> float:
    """The fp32 nearest to a decimal literal (ties to even), rounded once, as a C compiler rounds `1.5f`.

    float32(float(literal)) rounds twice (decimal -> fp64 -> fp32) and can land one ulp off."""
    import struct
    from fractions import Fraction

    exact = Fraction(literal)
    near = struct.unpack("<I", struct.pack("<f", float(literal)))[0]
    bits = min((near - 1, near, near + 1),
               key=lambda b: (abs(Fraction(struct.unpack("<f", struct.pack("<I", b))[0]) - exact), b & 1))  # fmt: skip
    return struct.unpack("<f", struct.pack("<I", bits))[0]


@functools.lru_cache(maxsize=None)
def _nf4_thresholds(device: torch.device | str, cuda_tree: bool = False) -> torch.Tensor:
    """(15,) fp32 thresholds: code = number of thresholds below the scaled value.

    bitsandbytes' CPU path: the fp32 midpoints between neighbouring codes; its CUDA path: its tree's literals."""
    if cuda_tree:
        return torch.tensor([decimal_to_fp32(t) for t in CUDA_TREE_LITERALS], dtype=torch.float32, device=device)
    code = nf4_code(device)
    return (code[:-1] + code[1:]) / 2


@functools.lru_cache(maxsize=None)
def dynamic_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic quantization map (256 sorted fp32 values), used for the absmax.

    The map (Dettmers 2015, "8-Bit Approximations for Parallelism in Deep Learning") has a sign bit, a
    unary-coded decimal exponent e in 0..6 and a linear fraction: for each e, 2**e fraction steps spread
    evenly over [0.1, 1] (their interval midpoints), scaled by 10**(e-6), with both signs; then 0 and 1.
    Computed in fp32 exactly as bitsandbytes computes it (the values are checked in the tests).
    """
    values: list[float] = []
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (e - 6)
        values += (scale * mids).tolist()
        values += (-scale * mids).tolist()
    values += [0.0, 1.0]
    assert len(values) == 256
    return torch.tensor(sorted(values), dtype=torch.float32, device=device)


@dataclass
class NF4Weight:
    """A frozen weight quantized to NF4 in bitsandbytes' layout (see the module docstring).

    `shape` and `dtype` are those of the original weight (the default dequantization dtype).
    """

    data: torch.Tensor  # (ceil(n/2),) uint8
    absmax: torch.Tensor  # (n_blocks,) uint8 [double quant] | float32 [single quant]
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    quant_map: torch.Tensor | None = None  # (16,) float32; None means the standard NF4 code
    nested_absmax: torch.Tensor | None = None  # (n_nested,) float32
    nested_quant_map: torch.Tensor | None = None  # (256,) float32
    offset: torch.Tensor | None = None  # () float32
    nested_blocksize: int = 256

    def __post_init__(self) -> None:
        self.shape = torch.Size(self.shape)
        if self.quant_map is None:
            self.quant_map = nf4_code(self.data.device)
        validate(self)

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        return self.data.device

    def nbytes(self) -> int:
        """Bytes held by the quantized weight and its statistics (code books excluded)."""
        parts = [self.data, self.absmax, self.nested_absmax, self.offset]
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def to(self, device: torch.device | str) -> NF4Weight:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(
            self,
            data=move(self.data),
            absmax=move(self.absmax),
            quant_map=move(self.quant_map),
            nested_absmax=move(self.nested_absmax),
            nested_quant_map=move(self.nested_quant_map),
            offset=move(self.offset),
        )


def _expect(cond: bool, msg: str) -> None:
    if not cond:
        raise NF4FormatError(msg)


def _expect_tensor(t, name: str, dtype: torch.dtype, numel: int) -> None:
    _expect(isinstance(t, torch.Tensor), f"NF4 weight: `{name}` is missing (expected a {dtype} tensor)")
    _expect(t.dtype == dtype, f"NF4 weight: `{name}` has dtype {t.dtype}, expected {dtype}")
    _expect(
        t.numel() == numel,
        f"NF4 weight: `{name}` has {t.numel()} elements, expected {numel} for the stored shape "
        "(corrupt or truncated quant state?)",
    )


def validate(w: NF4Weight) -> None:
    """Raise NF4FormatError with one clear line if `w`'s tensors do not fit its shape and blocksizes."""
    n = w.numel
    _expect(n > 0, f"NF4 weight: shape {tuple(w.shape)} has no elements")
    _expect(w.dtype in FLOAT_DTYPES, f"NF4 weight: dtype {w.dtype} is not one of float16, bfloat16, float32")
    _expect(w.blocksize in VALID_BLOCKSIZES, f"NF4 weight: blocksize {w.blocksize} not in {VALID_BLOCKSIZES}")
    n_blocks = -(-n // w.blocksize)
    _expect_tensor(w.data, "data", torch.uint8, -(-n // 2))
    _expect_tensor(w.quant_map, "quant_map", torch.float32, 16)
    if w.double_quant:
        _expect(w.nested_blocksize > 0, f"NF4 weight: nested blocksize {w.nested_blocksize} must be positive")
        _expect_tensor(w.absmax, "absmax", torch.uint8, n_blocks)
        _expect_tensor(w.nested_absmax, "nested_absmax", torch.float32, -(-n_blocks // w.nested_blocksize))
        _expect_tensor(w.nested_quant_map, "nested_quant_map", torch.float32, 256)
        _expect_tensor(w.offset, "offset", torch.float32, 1)
    else:
        _expect(
            getattr(w.absmax, "dtype", None) != torch.uint8,
            "NF4 weight: `nested_absmax` is missing (a uint8 absmax needs nested_absmax, nested_quant_map, offset)",
        )
        _expect(
            w.nested_quant_map is None and w.offset is None,
            "NF4 weight: nested_quant_map/offset given without nested_absmax",
        )
        _expect_tensor(w.absmax, "absmax", torch.float32, n_blocks)


# ----------------------------------------------------------------------------------------------------------
# Quantization


def quantize_nf4(
    weight: torch.Tensor,
    blocksize: int = 64,
    double_quant: bool = True,
    nested_blocksize: int = 256,
) -> NF4Weight:
    """Quantize `weight` (fp16/bf16/fp32, any shape) to NF4.

    Bit-exact with `bitsandbytes.functional.quantize_4bit(weight, blocksize=blocksize,
    compress_statistics=double_quant, quant_type="nf4")` on the same device (see the module docstring).
    """
    if not isinstance(weight, torch.Tensor) or weight.dtype not in FLOAT_DTYPES:
        got = weight.dtype if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise NF4FormatError(f"quantize_nf4: expected a float16/bfloat16/float32 tensor, got {got}")
    if blocksize not in VALID_BLOCKSIZES:
        raise NF4FormatError(f"quantize_nf4: blocksize {blocksize} not in {VALID_BLOCKSIZES}")
    if weight.numel() == 0:
        raise NF4FormatError(f"quantize_nf4: weight of shape {tuple(weight.shape)} has no elements")
    on_cpu = weight.device.type == "cpu"
    flat = weight.detach().reshape(-1).float()
    codes, absmax = _quantize_nf4_codes(flat, blocksize, on_cpu)
    data = _pack_nibbles(codes)
    common = dict(data=data, shape=weight.shape, dtype=weight.dtype, blocksize=blocksize)
    if not double_quant:
        return NF4Weight(absmax=absmax, **common)
    offset = absmax.mean()
    nested_map = dynamic_code(weight.device)
    qabsmax, nested_absmax = _quantize_blockwise_8bit(absmax - offset, nested_map, nested_blocksize, on_cpu)
    return NF4Weight(
        absmax=qabsmax,
        nested_absmax=nested_absmax,
        nested_quant_map=nested_map.clone(),
        offset=offset,
        nested_blocksize=nested_blocksize,
        **common,
    )


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    # (2m,) int codes in 0..15 -> (m,) uint8, the even element in the high nibble
    codes = codes.to(torch.uint8)
    return (codes[0::2] << 4) | codes[1::2]


def _quantize_nf4_codes(flat: torch.Tensor, blocksize: int, on_cpu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) fp32 -> (codes (n + n % 2,) int32, absmax (n_blocks,) fp32), as bitsandbytes' quantize_4bit op.

    For odd n the pad nibble is the code of a scaled 0.0, as bitsandbytes writes it."""
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)  # (n_full_blocks, B)
    absmax = blocks.abs().amax(dim=1)
    thresholds = _nf4_thresholds(flat.device, cuda_tree=not on_cpu)
    if on_cpu:
        # bitsandbytes' default (CPU) kernel: multiply by the reciprocal of the clamped absmax, clamp to
        # [-1, 1]; the partial last block divides instead, and stores its clamped absmax.
        scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).view(-1, 1)).clamp(-1, 1).reshape(-1)
        if full < n:
            am = flat[full:].abs().max().clamp(min=1e-38)
            absmax = torch.cat([absmax, am.view(1)])
            scaled = torch.cat([scaled, (flat[full:] / am).clamp(-1, 1)])
        scaled = torch.nn.functional.pad(scaled, (0, n % 2))
        return torch.bucketize(scaled, thresholds, out_int32=True), absmax
    # bitsandbytes' CUDA kernel: x * (1 / absmax) for every block, with its fast-math reciprocal; an all-zero
    # block gives 0 * inf = NaN, which falls through its threshold tree to code 0.
    if full < n:
        absmax = torch.cat([absmax, flat[full:].abs().max().view(1)])
    inv = approx_reciprocal(absmax)
    scaled = torch.nn.functional.pad(flat, (0, n % 2)) * inv.repeat_interleave(blocksize)[: n + n % 2]
    codes = torch.bucketize(scaled, thresholds, out_int32=True)
    return torch.where(torch.isnan(scaled), 0, codes), absmax


@functools.lru_cache(maxsize=8)
def _cpu_lookup_table(code_bytes: bytes) -> torch.Tensor:
    # bitsandbytes' CPU blockwise quantizer does not search the code book: it maps a normalized value to one
    # of 65536 evenly spaced bins over [-1, 1] and looks its code up in a table built once, where each bin
    # point -1 + 2i/65535 takes the first code whose upper midpoint is not below it.
    code = torch.frombuffer(bytearray(code_bytes), dtype=torch.float32)
    mids = 0.5 * (code[:-1] + code[1:])
    points = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32)) / 65535.0
    return torch.searchsorted(mids, points, side="left").to(torch.uint8)


def _quantize_blockwise_8bit(
    x: torch.Tensor, code: torch.Tensor, blocksize: int, on_cpu: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) fp32 -> (codes (n,) uint8, absmax (ceil(n/blocksize),) fp32), as bitsandbytes' quantize_blockwise."""
    n = x.numel()
    n_blocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(x, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)
    absmax = padded.abs().amax(dim=1)  # zero padding never raises a max of absolute values
    inv = (1.0 / absmax if on_cpu else approx_reciprocal(absmax)).view(-1, 1)  # CUDA: bnb's fast-math reciprocal
    scaled = (padded * inv).reshape(-1)[:n]
    zero_block = (absmax == 0).repeat_interleave(blocksize)[:n]
    if on_cpu:
        table = _cpu_lookup_table(code.cpu().numpy().tobytes()).to(x.device)
        # index = uint16((v + 1) * 0.5 * 65535 + 0.5) in fp32, where the compiler contracted the last multiply
        # and add into one fma: t * 65535 + 0.5 is exact in fp64, so rounding it once to fp32 is that fma.
        t = (scaled.clamp(-1.0, 1.0) + 1.0) * 0.5
        index = (t.double() * 65535.0 + 0.5).float().to(torch.int64)
        q = table[index.clamp_(0, 65535)]
        return torch.where(zero_block, 0, q).to(torch.uint8), absmax
    return _cuda_binary_search(scaled, code).to(torch.uint8), absmax


def _cuda_binary_search(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' CUDA `dQuantize<0>`: a 7-step binary search over the 256 sorted codes, then the nearer of
    the last pivot and its neighbour (ties to the pivot). NaN (an all-zero block) ends at code 0."""
    pivot = torch.full_like(x, 127, dtype=torch.int64)
    lower_pivot = torch.zeros_like(pivot)
    upper_pivot = torch.full_like(pivot, 255)
    lower = torch.full_like(x, -1.0)
    upper = torch.full_like(x, 1.0)
    val = code[pivot]
    for step in (64, 32, 16, 8, 4, 2, 1):
        up = x > val
        lower_pivot = torch.where(up, pivot, lower_pivot)
        lower = torch.where(up, val, lower)
        upper_pivot = torch.where(up, upper_pivot, pivot)
        upper = torch.where(up, upper, val)
        pivot = torch.where(up, pivot + step, pivot - step)
        val = code[pivot]
    upper = torch.where(upper_pivot == 255, code[255], upper)
    lower = torch.where(lower_pivot == 0, code[0], lower)
    above = x > val
    to_upper = above & (x > (upper + val) * 0.5)
    to_lower = ~above & (x < (lower + val) * 0.5)
    return torch.where(to_upper, upper_pivot, torch.where(to_lower, lower_pivot, pivot))
