"""The NF4 base path (NF4Tensor + nf4_linear) and a peft LoRA on top, against fp32 autograd on the dequantized weight."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qlora_fsdp.nf4 import dequantize_reference, quantize_nf4
from qlora_fsdp.nf4.tensor import NF4Tensor

SHAPES = [(64, 64), (96, 200), (7, 130), (1, 64)]  # (out, in), odd ones included


def nf4_linear_module(out_f, in_f, dtype, bias=False):
    lin = nn.Linear(in_f, out_f, bias=bias)
    w = quantize_nf4(lin.weight.data.to(dtype))
    lin.weight = nn.Parameter(NF4Tensor(w, dtype), requires_grad=False)
    return lin, w


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_input_grad_match_dense(shape, dtype):
    out_f, in_f = shape
    lin, w = nf4_linear_module(out_f, in_f, dtype)
    x = torch.randn(3, 5, in_f, dtype=dtype, requires_grad=True)
    y = lin(x)
    g = torch.randn_like(y)
    y.backward(g)
    dense = dequantize_reference(w, dtype)  # the reference: autograd through a dense matmul
    x2 = x.detach().clone().requires_grad_()
    y2 = x2 @ dense.t()
    y2.backward(g)
    assert y.dtype == dtype and torch.equal(y, y2)
    assert torch.equal(x.grad, x2.grad)
    assert not lin.weight.requires_grad and lin.weight.grad is None


def test_bias_and_autocast():
    lin, w = nf4_linear_module(48, 64, torch.bfloat16, bias=True)
    lin.bias.requires_grad_(True)
    x = torch.randn(4, 64, requires_grad=True)  # fp32 input, bf16 autocast: computes in bf16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    ref = x.detach().bfloat16() @ dequantize_reference(w, torch.bfloat16).t() + lin.bias.detach().bfloat16()
    assert torch.equal(y, ref)
    assert x.grad.dtype == torch.float32
    assert torch.allclose(lin.bias.grad, torch.full((48,), 4.0))


def test_lora_gradients_match_fp32_autograd():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(130, 72, bias=False)

        def forward(self, x):
            return self.proj(x)

    model = Tiny()
    w = quantize_nf4(model.proj.weight.data)
    model.proj.weight = nn.Parameter(NF4Tensor(w, torch.float32), requires_grad=False)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["proj"], use_rslora=True))
    layer = pm.base_model.model.proj
    nn.init.normal_(layer.lora_B["default"].weight, std=0.1)  # non-zero B so every gradient is non-trivial
    x = torch.randn(2, 9, 130, requires_grad=True)
    y = pm(x)
    g = torch.randn_like(y)
    y.backward(g)

    A = layer.lora_A["default"].weight.detach().clone().requires_grad_()
    B = layer.lora_B["default"].weight.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    scale = 16 / 8**0.5  # rsLoRA: alpha / sqrt(r)
    y2 = x2 @ dequantize_reference(w, torch.float32).t() + scale * (x2 @ A.t()) @ B.t()
    y2.backward(g)
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_A["default"].weight.grad, A.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_B["default"].weight.grad, B.grad, rtol=1e-5, atol=1e-5)


def test_tensor_ops():
    lin, w = nf4_linear_module(32, 64, torch.bfloat16)
    t = lin.weight
    assert isinstance(t, nn.Parameter) and isinstance(t, NF4Tensor) and t.shape == (32, 64)
    assert t.to(torch.float16).dtype == torch.float16  # compute dtype only ...
    assert t.to(torch.float16).nf4.absmax.dtype == torch.uint8  # ... statistics untouched
    assert torch.equal(t.clone().dequantize(), t.dequantize())
    lin.to(torch.float32)
    assert isinstance(lin.weight, NF4Tensor) and lin.weight.dtype == torch.float32
    with pytest.raises(NotImplementedError, match="dequantize the weight first"):
        t + 1
    with pytest.raises(TypeError, match="cannot convert to torch.int8"):
        t.to(torch.int8)
    assert F.linear(torch.ones(1, 64, dtype=torch.bfloat16), t).shape == (1, 32)


@pytest.fixture
def keep():
    from qlora_fsdp.nf4.linear import keep_dequantized

    keep_dequantized(True)
    yield
    keep_dequantized(False)


def _saved_and_dequantized(lin, x, g, monkeypatch):
    """(bytes autograd saved in forward, dequantizations in backward) of lin(x).backward(g)."""
    calls, saved = [], []
    original = NF4Tensor.dequantize
    monkeypatch.setattr(NF4Tensor, "dequantize", lambda self, *a: calls.append(1) or original(self, *a))
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):  # fmt: skip
        y = lin(x)
    calls.clear()
    y.backward(g)
    return sum(saved), len(calls), y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keep_dequantized_saves_the_weight_and_gives_the_same_grads(dtype, monkeypatch, request):
    lin, _ = nf4_linear_module(96, 200, dtype)
    x = torch.randn(3, 5, 200, dtype=dtype, requires_grad=True)
    g = torch.randn(3, 5, 96, dtype=dtype)
    plain_bytes, plain_calls, y = _saved_and_dequantized(lin, x, g, monkeypatch)
    grad, x.grad = x.grad, None
    request.getfixturevalue("keep")
    kept_bytes, kept_calls, y_kept = _saved_and_dequantized(lin, x, g, monkeypatch)
    assert (plain_calls, kept_calls) == (1, 0)  # backward dequantizes again, or not at all
    assert kept_bytes - plain_bytes == 96 * 200 * dtype.itemsize  # the dense (out, in) weight
    assert torch.equal(y_kept, y) and torch.equal(x.grad, grad)


@pytest.mark.timeout(300)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton dequant op (CPU compiles the reference's ops, "
                    "which the partitioner always recomputes)")  # fmt: skip
def test_keep_dequantized_compiled_saves_the_weight():
    """Inductor's partitioner: the MUST_RECOMPUTE tag makes backward dequantize again; keep_dequantized tags MUST_SAVE
    and the compiled forward saves the dense weight for backward instead. Same gradients."""
    from qlora_fsdp.nf4.linear import keep_dequantized

    lin = nn.Linear(256, 96, bias=False, device="cuda")
    lin.weight = nn.Parameter(NF4Tensor(quantize_nf4(lin.weight.data), torch.float32), requires_grad=False)
    x = torch.randn(4, 256, device="cuda", requires_grad=True)
    g = torch.randn(4, 96, device="cuda")
    results = []
    for keep in (False, True):
        torch._dynamo.reset()
        keep_dequantized(keep)
        try:
            f = torch.compile(lambda t: lin(t), backend="inductor", fullgraph=True)
            saved = []
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
                y = f(x)
            y.backward(g)
            results.append((saved, x.grad.clone()))
            x.grad = None
        finally:
            keep_dequantized(False)
            torch._dynamo.reset()
    (plain, grad), (kept, grad_kept) = results
    assert (96, 256) not in plain and (96, 256) in kept, (plain, kept)
    torch.testing.assert_close(grad_kept, grad, rtol=1e-5, atol=1e-6)


def test_keep_dequantized_turns_the_autograd_cache_off_while_on():
    """AOTAutograd's cache key leaves out the partitioner tags: a cached graph without keep_dequantized would be
    served again. keep_dequantized(True) turns that cache off, keep_dequantized(False) restores the setting."""
    import torch._functorch.config as functorch_config

    from qlora_fsdp.nf4.linear import keep_dequantized

    before = functorch_config.enable_autograd_cache
    try:
        for setting in (True, False):
            functorch_config.enable_autograd_cache = setting
            keep_dequantized(True)
            assert functorch_config.enable_autograd_cache is False
            keep_dequantized(True)  # again: still off, and the setting before is kept
            keep_dequantized(False)
            assert functorch_config.enable_autograd_cache is setting
    finally:
        keep_dequantized(False)
        functorch_config.enable_autograd_cache = before
