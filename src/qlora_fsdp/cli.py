"""The `qlora-fsdp` command (also `python -m qlora_fsdp`).

    qlora-fsdp dequant [--rows R --cols C --dtype bf16]   NF4 round trip: quantize, dequantize with the Triton
                                                          kernel (GPU, or the interpreter on CPU), check it
                                                          against the reference and bitsandbytes
"""

from __future__ import annotations

import argparse
import os
import sys
import time

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _dequant(args: argparse.Namespace) -> int:
    if args.rows < 1 or args.cols < 1:
        raise SystemExit(f"qlora-fsdp dequant: --rows and --cols must be positive (got {args.rows}x{args.cols})")
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: run the kernel on CPU
    from .nf4 import dequantize_nf4, dequantize_reference, nf4_to_bnb, quantize_nf4
    from .nf4.triton_dequant import triton_interpreting

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, DTYPES[args.dtype])
    torch.manual_seed(args.seed)
    weight = (torch.randn(args.rows, args.cols, device=device) * 0.02).to(dtype)
    w = quantize_nf4(weight)
    start = time.perf_counter()
    out = dequantize_nf4(w, dtype)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    ref = dequantize_reference(w, dtype)
    how = "Triton kernel" + (" (interpreter)" if triton_interpreting() and device == "cpu" else "")
    print(f"weight {args.rows}x{args.cols} {args.dtype} on {device}: {w.nbytes() / 2**20:.2f} MiB in NF4 "
          f"({weight.numel() * weight.element_size() / w.nbytes():.2f}x smaller)")  # fmt: skip
    print(f"dequantized by the {how} in {seconds * 1e3:.1f} ms; bit-exact with the reference: {torch.equal(out, ref)}")
    err = (out.float() - weight.float()).abs()
    print(f"quantization error: mean {err.mean():.2e}, max {err.max():.2e} (weights ~N(0, 0.02))")
    try:
        import bitsandbytes.functional as bnbF
    except ImportError:
        print("bitsandbytes not installed: skipping the comparison with it")
        return 0 if torch.equal(out, ref) else 1
    packed, qs = bnbF.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    same_bytes = torch.equal(packed.view(-1), w.data) and torch.equal(qs.absmax, w.absmax)
    theirs = nf4_to_bnb(w)
    theirs[1].dtype = dtype
    same_out = torch.equal(bnbF.dequantize_4bit(*theirs), out) if device == "cuda" else None
    print(f"bitsandbytes quantize_4bit gives the same bytes and absmax: {same_bytes}"
          + ("" if same_out is None else f"; its dequantize_4bit the same output: {same_out}"))  # fmt: skip
    return 0 if torch.equal(out, ref) and same_bytes and same_out is not False else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlora-fsdp", description="QLoRA finetuning with an NF4 base, on one GPU or many.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("dequant", help="NF4 round trip with the Triton dequantizer, checked against the references")
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--cols", type=int, default=512)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_dequant)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
