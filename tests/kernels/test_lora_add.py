"""lora_add.py: the LoRA output kernel (Triton's interpreter on CPU) against fp64 autograd on odd shapes, and
RankScaledLoraLinear through it against peft's own LoRA layers in a tiny Llama."""

import pytest
import torch

from qlora_fsdp.kernels import lora_add as la
from qlora_fsdp.kernels import rank_product

# the device, the skip and the autouse fixture that runs CPU tensors in Triton's interpreter: test_lora_swiglu's
from .test_lora_swiglu import DEVICE, _counting, _kernels_in_the_interpreter, needs_kernel, tiny_lora_llama  # noqa: F401


def inputs(lead, n, r, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape, std=1.0: (torch.randn(*shape, generator=g) * std).to(DEVICE, dtype)  # noqa: E731
    return [make(*lead, n), make(*lead, r), make(n, r, std=0.3)]


@needs_kernel
@pytest.mark.parametrize("lead, n, r", [((1,), 16, 16), ((5,), 200, 4), ((2, 35), 130, 24), ((3,), 129, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_and_gradients_match_fp64(lead, n, r, dtype):
    """Partial tiles, r below 16 and above, a (B, T, N) base: the output and all three gradients."""
    args = [a.requires_grad_() for a in inputs(lead, n, r, dtype)]
    y = la.lora_add(*args)
    grad = torch.randn(*lead, n, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    y.backward(grad)
    xs = [a.detach().double().requires_grad_() for a in args]
    want = xs[0] + xs[1] @ xs[2].t()
    want.backward(grad.double())
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]  # one rounding to dtype
    assert y.dtype == dtype and y.shape == args[0].shape
    torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol)
    for name, a, x in zip(("base", "h", "w"), args, xs):
        scale = x.grad.abs().max().item() + 1.0
        torch.testing.assert_close(a.grad.double() / scale, x.grad / scale, rtol=tol, atol=tol, msg=name)


@needs_kernel
def test_kernel_equals_its_pytorch_reference():
    """fp32: the dot's summation order is the only difference."""
    base, h, w = inputs((33,), 257, 16, torch.float32)
    torch.testing.assert_close(la.lora_add_op(base, h, w), la.lora_add_reference(base, h, w), rtol=1e-6, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_direct_launch_equals_the_op(monkeypatch, dtype):
    """In plain eager CUDA code LoraAddFunction launches the kernel itself, not through torch.ops
    (rank_product.launches_directly); here both ways on the test's device (on CPU the direct launch is forced, in
    Triton's interpreter): the same output and gradients to the bit, and only one way reaches the dispatcher."""
    results = []
    for direct in (False, True):
        monkeypatch.setattr(rank_product, "launches_directly", lambda t, direct=direct: direct)
        ops = []
        op = torch.ops.qlora_fsdp.lora_add
        monkeypatch.setattr(torch.ops.qlora_fsdp, "lora_add", lambda *a, op=op, ops=ops: ops.append(1) or op(*a))
        args = [a.requires_grad_() for a in inputs((3, 37), 130, 24, dtype)]
        y = la.lora_add(*args)
        y.backward(torch.ones_like(y))
        assert len(ops) == (0 if direct else 1)
        results.append([y, *(a.grad for a in args)])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_only_plain_eager_cuda_tensors_launch_directly():
    """CPU tensors, fake tensors and anything under torch.compile take the op (what Dynamo and AOTAutograd trace)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    assert not rank_product.launches_directly(torch.ones(2))
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(torch.ones(2))
    assert not rank_product.launches_directly(fake)
    if torch.cuda.is_available():
        assert rank_product.launches_directly(torch.ones(2, device="cuda"))
        assert not rank_product.launches_directly(torch.ones(2, device="cuda", dtype=torch.float64))
        assert not torch.compile(rank_product.launches_directly, backend="eager", fullgraph=True)(
            torch.ones(2, device="cuda"))


def test_shapes_that_do_not_fit_are_one_line_errors():
    base, h, w = inputs((4,), 32, 8, torch.float32)
    with pytest.raises(ValueError, match="lora_add: base \\(..., N\\)"):
        la.lora_add(base, h, w[:, :4])
    with pytest.raises(ValueError, match="lora_add: base"):
        la.lora_add(base, h[:3], w)


def test_no_rows():
    base, h, w = inputs((0,), 32, 8, torch.float32)
    assert la.lora_add(base, h, w).shape == (0, 32)


@needs_kernel
def test_lora_layers_train_like_peft(monkeypatch):
    """A tiny Llama with peft LoRA on all linears, fp32: through the kernel, peft's loss and LoRA gradients; LoRA
    dropout on (it acts on the layer input, before the kernel) gives the same masks, hence the same results."""
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    for dropout in (0.0, 0.1):
        results = []
        for fused in (False, True):
            monkeypatch.setattr(rank_product, "FUSE_DEVICES", (DEVICE,) if fused else ())
            model = tiny_lora_llama(dropout).to(DEVICE)
            calls = []
            monkeypatch.setattr(la.LoraAddFunction, "forward", _counting(la.LoraAddFunction.forward, calls))
            torch.manual_seed(3)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            assert len(calls) == (2 * 7 if fused else 0)  # 2 layers x 7 projections
            results.append((loss, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
        (loss, grads), (loss_f, grads_f) = results
        torch.testing.assert_close(loss_f, loss, rtol=1e-5, atol=1e-6)
        for name in grads:
            assert grads[name].abs().sum() > 0, name
            torch.testing.assert_close(grads_f[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.timeout(300)
def test_compiled_layers_trace_the_op_without_graph_breaks(monkeypatch):
    """compile_model over LoRA layers that take lora_add (and the fused MLP): 0 graph breaks, eager's loss."""
    from torch._dynamo.utils import counters

    from qlora_fsdp.compile import compile_counts, compile_model
    from qlora_fsdp.lora.fused_mlp import patch_lora_swiglu

    monkeypatch.setattr(rank_product, "FUSE_DEVICES", ("cpu",))
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    losses = []
    torch._dynamo.reset()
    counters.clear()
    try:
        for compiled in (False, True):
            model = tiny_lora_llama()
            patch_lora_swiglu(model)
            if compiled:
                compile_model(model, backend="aot_eager")
            losses.append(model(input_ids=ids, labels=ids).loss)
            losses[-1].backward()
        counts = compile_counts()
    finally:
        torch._dynamo.reset()
    assert counts["graph_breaks"] == 0 and counts["graphs"] >= 1, counts
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
