"""Causal GQA attention of the Llama-3.1-8B shape through each SDPA backend (GPU only): which one the step should use.

    python tools/attention_backends.py [--shapes 4x2048,1x8192]

q (B, 32, T, 128), k and v (B, 8, T, 128), bf16, is_causal. Each backend runs with `enable_gqa=True` and with k/v
repeated to 32 heads (what transformers does when it cannot pass `enable_gqa`). Prints forward and forward+backward
ms per call of one layer, the TFLOP/s that gives (causal: half the T^2 work), and the largest difference of the output
and of dq from the flash backend's.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def timed_ms(fn, iters: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="4x2048,1x8192")
    args = p.parse_args()
    torch.manual_seed(0)
    print(f"{'shape':<9}{'backend':<22}{'gqa':<8}{'fwd ms':>8}{'fwd+bwd ms':>12}{'TFLOP/s':>9}{'max|dout|':>11}{'max|dq|':>10}")
    for shape in args.shapes.split(","):
        b, t = (int(x) for x in shape.split("x"))
        q = torch.randn(b, 32, t, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(b, 8, t, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(b, 8, t, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dout = torch.randn(b, 32, t, 128, device="cuda", dtype=torch.bfloat16)
        flops_fwd = 4 * b * 32 * t * t * 128 / 2  # QK^T and PV, causal half
        ref = None
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
            for gqa in (True, False):

                def fwd():
                    kk, vv = (k, v) if gqa else (k.repeat_interleave(4, 1), v.repeat_interleave(4, 1))
                    return F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa)

                def fwd_bwd():
                    q.grad = k.grad = v.grad = None
                    fwd().backward(dout)

                try:
                    with sdpa_kernel([backend]):
                        f_ms, fb_ms = timed_ms(fwd), timed_ms(fwd_bwd)
                        out = fwd()
                        fwd_bwd()
                except RuntimeError as e:
                    print(f"{shape:<9}{backend.name:<22}{str(gqa):<8} not available: {str(e).splitlines()[0][:80]}")
                    continue
                if ref is None:
                    ref = (out.detach(), q.grad.clone())
                d_out = (out.float() - ref[0].float()).abs().max().item()
                d_q = (q.grad.float() - ref[1].float()).abs().max().item()
                tflops = 3.5 * flops_fwd / fb_ms / 1e9  # backward is 2.5 forwards
                print(f"{shape:<9}{backend.name:<22}{str(gqa):<8}{f_ms:>8.2f}{fb_ms:>12.2f}{tflops:>9.0f}{d_out:>11.2e}{d_q:>10.2e}")


if __name__ == "__main__":
    main()
