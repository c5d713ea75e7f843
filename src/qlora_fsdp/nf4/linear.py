"""The frozen NF4 base path of a QLoRA linear layer: y = x W^T + b with W dequantized on the fly.

    forward:   W = dequant(w)            (out, in), compute dtype; freed right after the matmul
               y = x @ W^T + b           x (..., in) -> y (..., out)
    backward:  dL/dx = dL/dy @ dequant(w)  the weight is dequantized again, never kept for backward
               (keep_dequantized(True): the forward's W is kept instead, one dequantization a step fewer for
               2 bytes a weight held until backward: for Llama 3.1 8B 14 GB without activation checkpointing,
               one layer's 0.44 GB with it, where forward and backward of a layer follow each other)

The base weight is frozen, so the op yields the input gradient only (and the bias gradient when a trainable
bias asks for it): LoRA adapters are separate modules beside it, which lets autograd split input-gradient
from weight-gradient work (DESIGN.md constraint 4). Under autocast the compute dtype is the autocast dtype;
otherwise it is the input's dtype.

skippable=True (memory/recompute_skip.py: the last projection of a checkpointed layer): while `outputs_unused()` is on
(that layer's recomputation, whose y nothing reads) the matmul does not run and y is returned unwritten, with the same
backward and the same tensors saved for it. The flag is read when the op runs, not when it is traced (the custom op
`qlora_fsdp::matmul_unless_unused`), so a compiled layer runs one graph in forward and in its recomputation.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor
from torch.fx import traceback as fx_traceback
from torch.utils.checkpoint import CheckpointPolicy


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a matmul on x computes in: autocast's for x's device type where it is on, else x's."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


@contextmanager
def _partitioner_policy(policy: CheckpointPolicy):
    """While torch.compile traces this (AOTAutograd keeps node metadata), tag the ops made here with `policy` for
    the min-cut partitioner; a no-op in eager mode.

    MUST_RECOMPUTE: the partitioner merges the forward's and the backward's dequantizations (CSE) and would then
    save the dense weight for backward; the tag, which selective activation checkpointing also uses, makes it
    dequantize again in backward instead, as eager does. MUST_SAVE (keep_dequantized): without a tag the
    partitioner would still recompute, since the packed bytes it saves instead are 4x smaller than the weight."""
    if not fx_traceback.has_preserved_node_meta():
        yield
        return
    meta = fx_traceback.get_current_meta()
    old = meta.get("recompute")
    meta["recompute"] = policy
    try:
        yield
    finally:
        if old is None:
            meta.pop("recompute", None)
        else:
            meta["recompute"] = old


_KEEP_DEQUANTIZED = False
_AUTOGRAD_CACHE_BEFORE_KEEP: bool | None = None


def keep_dequantized(keep: bool) -> None:
    """Whether NF4 linears keep the forward's dequantized weight for backward (process-wide; see the module
    docstring). Compiled graphs read it when traced: a change retraces them.

    While on, AOTAutograd's graph cache is off: its key leaves out the partitioner tags, so a graph compiled
    without keep_dequantized (in this process or an earlier one) would be served again (seen on an H100)."""
    global _KEEP_DEQUANTIZED, _AUTOGRAD_CACHE_BEFORE_KEEP
    import torch._functorch.config as functorch_config

    keep = bool(keep)
    if keep and not _KEEP_DEQUANTIZED:
        _AUTOGRAD_CACHE_BEFORE_KEEP = functorch_config.enable_autograd_cache
        functorch_config.enable_autograd_cache = False
    elif not keep and _KEEP_DEQUANTIZED:
        functorch_config.enable_autograd_cache = _AUTOGRAD_CACHE_BEFORE_KEEP
    _KEEP_DEQUANTIZED = keep


_OUTPUTS_UNUSED = False


class outputs_unused:
    """While on, skippable NF4 linears (nf4_linear(skippable=True)) compute no output. Reusable and nestable: a
    non-reentrant checkpoint enters its recomputation context at every recomputation (the zero-bubble pipeline's
    split backward recomputes a layer twice)."""

    def __init__(self):
        self._before: list[bool] = []

    def __enter__(self):
        global _OUTPUTS_UNUSED
        self._before.append(_OUTPUTS_UNUSED)
        _OUTPUTS_UNUSED = True
        return self

    def __exit__(self, *exc):
        global _OUTPUTS_UNUSED
        _OUTPUTS_UNUSED = self._before.pop()
        return False


@torch.library.custom_op("qlora_fsdp::matmul_unless_unused", mutates_args=())
def matmul_unless_unused(x: Tensor, w: Tensor) -> Tensor:
    """x @ w^T, x (..., in), w (out, in) -> (..., out); unwritten (torch.empty) while outputs_unused() is on, decided
    when the op runs: traced graphs treat it as one opaque op, the same graph either way."""
    if _OUTPUTS_UNUSED:
        return x.new_empty((*x.shape[:-1], w.shape[0]))
    return x @ w.t()


@matmul_unless_unused.register_fake
def _(x: Tensor, w: Tensor) -> Tensor:
    return x.new_empty((*x.shape[:-1], w.shape[0]))


class NF4LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight, bias: Tensor | None, dtype: torch.dtype, skippable: bool = False) -> Tensor:
        ctx.weight, ctx.dtype, ctx.x_dtype = weight, dtype, x.dtype
        ctx.has_bias = bias is not None
        ctx.keep = _KEEP_DEQUANTIZED
        tracing = torch.compiler.is_compiling()
        if skippable and not tracing and _OUTPUTS_UNUSED:  # eager: the dequantization too, unless kept for backward
            # (traced, the flag is not read here: the op below reads it at run time)
            if ctx.keep:
                ctx.save_for_backward(weight.dequantize(dtype))
            return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=dtype)  # (..., out), never written
        with _partitioner_policy(CheckpointPolicy.MUST_SAVE if ctx.keep else CheckpointPolicy.MUST_RECOMPUTE):
            w = weight.dequantize(dtype)  # (out, in)
        if ctx.keep:
            ctx.save_for_backward(w)
        if skippable and tracing:
            y = torch.ops.qlora_fsdp.matmul_unless_unused(x.to(dtype), w)  # (..., out)
        else:
            y = x.to(dtype) @ w.t()  # (..., out)
        if bias is not None:
            y = y + bias.to(dtype)
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            w = ctx.saved_tensors[0] if ctx.keep else ctx.weight.dequantize(ctx.dtype)  # (out, in)
            grad_x = (grad_y.to(ctx.dtype) @ w).to(ctx.x_dtype)  # (..., in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
        return grad_x, None, grad_bias, None, None


def nf4_linear(x: Tensor, weight, bias: Tensor | None = None, *, skippable: bool = False) -> Tensor:
    """`F.linear(x, weight, bias)` for an NF4Tensor weight (see the module docstring)."""
    dtype = compute_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        return NF4LinearFunction.apply(x, weight, bias, dtype, skippable)
