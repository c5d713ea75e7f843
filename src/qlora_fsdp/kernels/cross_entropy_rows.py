"""Cross-entropy of a chunk of logit rows and its gradient, in one Triton kernel that overwrites the logits.

    loss = cross_entropy_rows_(logits, targets)      logits (n, V) 16-bit or fp32, targets (n,) int, -100 ignored
    # loss (n,) fp32; logits now hold d loss.sum() / d logits, in their own dtype

Per row z (read as fp32) with target y:
    lse  = log sum_v exp(z_v)                        (pass 1: running max and rescaled sum, one read of the row)
    loss = lse - z_y                                 (0 for an ignored row)
    grad = exp(z - lse) - onehot(y)                  (pass 2: a second read, written in place; 0 for an ignored row)

This is what memory/chunked_loss.py computed with separate PyTorch ops on an fp32 copy of the logits (upcast, logsumexp,
gather, exp, subtract, mask, downcast: about 16 bytes moved per logit); the kernel moves 6 bytes per 16-bit logit
(two reads and a write) and needs no fp32 copy. The results agree to fp32 rounding: only the order of the sum in
lse differs.

Dispatch: CUDA tensors run the kernel; CPU tensors run it under TRITON_INTERPRET=1 (how CI tests it) and
otherwise the same math in PyTorch (`cross_entropy_rows_reference_`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..nf4.triton_dequant import HAS_TRITON, triton_interpreting

IGNORE_INDEX = -100
BLOCK = 4096  # logits per loop step of a program (one program per row)

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _cross_entropy_rows_kernel(
        logits_ptr,  # (n, V), rows `row_stride` apart, overwritten with the gradient
        targets_ptr,  # (n,) int64
        loss_ptr,  # (n,) float32
        row_stride,
        V,
        IGNORE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * row_stride
        cols = tl.arange(0, BLOCK)
        # pass 1: per lane, the running max and the sum of exp relative to it
        m = tl.full((BLOCK,), float("-inf"), tl.float32)
        s = tl.zeros((BLOCK,), tl.float32)
        for start in range(0, V, BLOCK):
            z = tl.load(base + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, z)
            s = s * tl.exp(m - m_new) + tl.exp(z - m_new)  # lanes still at -inf stay at 0 (exp(nan) guarded below)
            s = tl.where(m_new == float("-inf"), 0.0, s)
            m = m_new
        row_max = tl.max(m, 0)
        total = tl.sum(tl.where(m == float("-inf"), 0.0, s * tl.exp(m - row_max)), 0)
        lse = row_max + tl.log(total)
        y = tl.load(targets_ptr + row)
        valid = y != IGNORE
        z_y = tl.load(base + tl.where(valid, y, 0)).to(tl.float32)
        tl.store(loss_ptr + row, tl.where(valid, lse - z_y, 0.0))
        # pass 2: softmax - onehot, in place (z_y was read above)
        for start in range(0, V, BLOCK):
            mask = start + cols < V
            z = tl.load(base + start + cols, mask=mask, other=0.0).to(tl.float32)
            p = tl.exp(z - lse)
            p = tl.where(start + cols == y, p - 1.0, p)
            p = tl.where(valid, p, 0.0)
            tl.store(base + start + cols, p.to(logits_ptr.dtype.element_ty), mask=mask)


def cross_entropy_rows(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row cross-entropy (n,) fp32 and the row logsumexp (n,) fp32, in PyTorch ops; logits left as they are."""
    z = logits.float()  # (n, V)
    lse = torch.logsumexp(z, dim=-1)  # (n,)
    valid = targets != IGNORE_INDEX  # (n,)
    safe = targets.masked_fill(~valid, 0)  # (n,): an in-range index for ignored rows, masked out
    return torch.where(valid, lse - z.gather(1, safe[:, None]).squeeze(1), 0.0), lse


def cross_entropy_rows_reference_(logits: Tensor, targets: Tensor) -> Tensor:
    """`cross_entropy_rows_` in PyTorch ops (fp32 intermediates the size of the logits)."""
    loss, lse = cross_entropy_rows(logits, targets)  # (n,), (n,)
    valid = targets != IGNORE_INDEX
    safe = targets.masked_fill(~valid, 0)
    probs = logits.float().sub_(lse[:, None]).exp_()  # (n, V): softmax (in place of the fp32 copy when 16-bit)
    probs[torch.arange(len(safe), device=probs.device), safe] -= 1.0  # softmax - onehot
    probs.masked_fill_(~valid[:, None], 0.0)
    logits.copy_(probs)
    return loss


def cross_entropy_rows_(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-row cross-entropy (n,) fp32 of `logits` (n, V) against `targets` (n,); the logits are overwritten with
    the gradient of the loss sum (see the module docstring). ValueError for shapes that do not match."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1] or logits.stride(1) != 1:
        raise ValueError(f"cross_entropy_rows_: logits (n, V) with unit column stride and targets (n,) expected, got "
                         f"{tuple(logits.shape)} and {tuple(targets.shape)}")  # fmt: skip
    run_kernel = HAS_TRITON and (logits.is_cuda or triton_interpreting())
    if not run_kernel or logits.shape[0] == 0:
        return cross_entropy_rows_reference_(logits, targets)
    loss = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    _cross_entropy_rows_kernel[(logits.shape[0],)](
        logits, targets.to(torch.int64), loss, logits.stride(0), logits.shape[1],
        IGNORE=IGNORE_INDEX, BLOCK=BLOCK, num_warps=8,
    )  # fmt: skip
    return loss
