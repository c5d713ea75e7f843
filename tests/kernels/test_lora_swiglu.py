"""lora_swiglu.py: the fused LoRA + SwiGLU kernel (Triton's interpreter on CPU) against fp64 autograd on odd shapes,
and the MLP patch against peft's own MLP in a tiny Llama."""

import pytest
import torch

from qlora_fsdp.kernels import lora_swiglu as ls
from qlora_fsdp.lora import fused_mlp
from qlora_fsdp.lora.fused_mlp import patch_lora_swiglu
from qlora_fsdp.kernels import rank_product
from qlora_fsdp.nf4.triton_dequant import triton_interpreting

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernel = pytest.mark.skipif(DEVICE == "cpu" and not triton_interpreting(), reason="no Triton interpreter")


@pytest.fixture(autouse=True)
def _kernels_in_the_interpreter(monkeypatch):
    """Here CPU tensors run the kernels in Triton's interpreter (training on CPU takes the PyTorch references)."""
    monkeypatch.setattr(rank_product, "INTERPRET_ON_CPU", True)


def inputs(t, i, r, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape, std=1.0: (torch.randn(*shape, generator=g) * std).to(DEVICE, dtype)  # noqa: E731
    return [make(t, i), make(t, i), make(t, r), make(t, r), make(i, r, std=0.3), make(i, r, std=0.3)]


def fp64_reference(args, grad):
    xs = [a.detach().double().requires_grad_() for a in args]
    base_g, base_u, hg, hu, wg, wu = xs
    gate, up = base_g + hg @ wg.t(), base_u + hu @ wu.t()
    act = torch.nn.functional.silu(gate) * up
    act.backward(grad.double())
    return act, [x.grad for x in xs]


@needs_kernel
@pytest.mark.parametrize("t, i, r", [(1, 16, 16), (5, 200, 4), (70, 130, 24), (3, 129, 16)])  # partial tiles, r < 16
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_and_gradients_match_fp64(t, i, r, dtype):
    args = [a.requires_grad_() for a in inputs(t, i, r, dtype)]
    act = ls.lora_swiglu(*args)
    grad = torch.randn(t, i, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    act.backward(grad)
    want, want_grads = fp64_reference(args, grad)
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}[dtype]  # a few roundings to dtype
    assert act.dtype == dtype
    torch.testing.assert_close(act.double(), want, rtol=tol, atol=tol)
    for name, a, w in zip(("base_g", "base_u", "hg", "hu", "wg", "wu"), args, want_grads):
        scale = w.abs().max().item() + 1.0
        torch.testing.assert_close(a.grad.double() / scale, w / scale, rtol=tol, atol=tol, msg=name)


@needs_kernel
@pytest.mark.parametrize("t, i, r, rd", [(5, 200, 4, 8), (70, 130, 24, 16), (3, 129, 16, 20)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_down_a_forward_and_gradients_match_fp64(t, i, r, rd, dtype):
    """lora_swiglu_down_a: (act, act @ a_down^T) and the gradients of all seven inputs, with both outputs used (d act
    then carries the rank-r_d term the kernel adds per tile), against fp64 autograd."""
    g = torch.Generator().manual_seed(7)
    args = [a.requires_grad_() for a in inputs(t, i, r, dtype)]
    a_down = (torch.randn(rd, i, generator=g) * 0.3).to(DEVICE, dtype).requires_grad_()
    grad_act, grad_h = (torch.randn(*s, generator=g).to(DEVICE, dtype) for s in ((t, i), (t, rd)))
    act, h = ls.lora_swiglu_down_a(*args, a_down)
    torch.autograd.backward((act, h), (grad_act, grad_h))
    xs = [a.detach().double().requires_grad_() for a in args + [a_down]]
    base_g, base_u, hg, hu, wg, wu, ad = xs
    want_act = torch.nn.functional.silu(base_g + hg @ wg.t()) * (base_u + hu @ wu.t())
    want_h = want_act @ ad.t()
    torch.autograd.backward((want_act, want_h), (grad_act.double(), grad_h.double()))
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(act.double(), want_act, rtol=tol, atol=tol)
    torch.testing.assert_close(h.double() / (want_h.abs().max() + 1), want_h / (want_h.abs().max() + 1), rtol=tol,
                               atol=tol)  # fmt: skip
    for name, a, w in zip(("base_g", "base_u", "hg", "hu", "wg", "wu", "a_down"), args + [a_down], xs):
        scale = w.grad.abs().max().item() + 1.0
        torch.testing.assert_close(a.grad.double() / scale, w.grad / scale, rtol=tol, atol=tol, msg=name)


@needs_kernel
def test_kernels_equal_their_pytorch_references():
    """act, then d gate and d up, of the kernel against the same math in PyTorch, fp32: the dot's summation order is
    the only difference."""
    args = inputs(33, 257, 16, torch.float32)
    torch.testing.assert_close(ls.lora_swiglu_op(*args), ls.lora_swiglu_reference(*args), rtol=1e-6, atol=1e-6)
    grad = torch.randn(33, 257, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    got, want = ls.lora_swiglu_backward_op(*args, grad), ls.lora_swiglu_backward_reference(*args, grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    down = (torch.randn(33, 8).to(DEVICE), torch.randn(257, 8).to(DEVICE))  # d h, a_down^T: d act's rank-8 term
    got, want = ls.lora_swiglu_backward_op(*args, grad, *down), ls.lora_swiglu_backward_reference(*args, grad, *down)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("down_a", [False, True])
def test_direct_launch_equals_the_op(monkeypatch, down_a):
    """The SwiGLU Functions launch their kernel directly in plain eager CUDA code (rank_product.launches_directly),
    forward and backward; both ways on the test's device (forced on CPU, in Triton's interpreter): the same outputs
    and gradients to the bit, the dispatcher reached only without it."""
    results = []
    for direct in (False, True):
        monkeypatch.setattr(rank_product, "launches_directly", lambda t, direct=direct: direct)
        ops = []
        for name in ("lora_swiglu", "lora_swiglu_backward"):
            op = getattr(torch.ops.qlora_fsdp, name)
            monkeypatch.setattr(torch.ops.qlora_fsdp, name, lambda *a, op=op, ops=ops: ops.append(1) or op(*a))
        args = [a.requires_grad_() for a in inputs(37, 130, 24, torch.bfloat16)]
        if down_a:
            a_down = (torch.randn(8, 130, generator=torch.Generator().manual_seed(5)) * 0.3).to(DEVICE, torch.bfloat16)
            a_down.requires_grad_()
            outs = ls.lora_swiglu_down_a(*args, a_down)
            args.append(a_down)
        else:
            outs = (ls.lora_swiglu(*args),)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        assert len(ops) == (0 if direct else 2)
        results.append([*outs, *(a.grad for a in args)])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_shapes_that_do_not_fit_are_one_line_errors():
    args = inputs(4, 32, 8, torch.float32)
    args[4] = args[4][:, :4]
    with pytest.raises(ValueError, match="lora_swiglu: base \\(T, I\\)"):
        ls.lora_swiglu(*args)


def tiny_lora_llama(dropout=0.0, r=8):
    import peft
    import transformers

    from qlora_fsdp.lora.linear import register_rank_scaled_lora

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    lora = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules="all-linear")
    register_rank_scaled_lora(lora)
    model = peft.get_peft_model(transformers.LlamaForCausalLM(config), lora)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2, generator=torch.Generator().manual_seed(len(name)))
    return model


@needs_kernel
@pytest.mark.parametrize("fuse_down_a", [True, False])
def test_patched_mlp_trains_like_peft(monkeypatch, fuse_down_a):
    """A tiny Llama with peft LoRA on all linears: the patched MLPs give peft's loss and LoRA gradients (fp32), with
    the down projection's lora_A inside the fused function or apart."""
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    results = []
    for patch in (False, True):
        model = tiny_lora_llama().to(DEVICE)
        if patch:
            monkeypatch.setattr(rank_product, "FUSE_DEVICES", (DEVICE,))
            assert patch_lora_swiglu(model, fuse_down_a=fuse_down_a) == 2
        calls = []  # the MLPs' down_proj is plain LoRA too: the down-A form serves them where asked
        fn = ls.LoraSwiGLUDownAFunction if fuse_down_a else ls.LoraSwiGLUFunction
        monkeypatch.setattr(fn, "forward", _counting(fn.forward, calls))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert len(calls) == (2 if patch else 0)
        results.append((loss, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (loss, grads), (loss_p, grads_p) = results
    torch.testing.assert_close(loss_p, loss, rtol=1e-5, atol=1e-6)
    for name in grads:
        torch.testing.assert_close(grads_p[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)


def _counting(fn, calls):
    def wrapped(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)

    return staticmethod(wrapped)


def test_patched_mlp_falls_back_where_it_does_not_apply(monkeypatch):
    """LoRA dropout (and CPU tensors by default) take the MLP's own forward: the same output as unpatched."""
    ids = torch.randint(0, 64, (1, 5))
    for dropout, devices in ((0.0, ("cuda",)), (0.1, ("cuda", "cpu"))):
        monkeypatch.setattr(rank_product, "FUSE_DEVICES", devices)  # the projections' own path: the same both times
        model = tiny_lora_llama(dropout).eval()
        want = model(input_ids=ids).logits
        patch_lora_swiglu(model)
        monkeypatch.setattr(fused_mlp, "lora_swiglu", lambda *a: pytest.fail("the fused path ran"))
        monkeypatch.setattr(fused_mlp, "lora_swiglu_down_a", lambda *a: pytest.fail("the fused path ran"))
        assert torch.equal(model(input_ids=ids).logits, want)


def test_a_rank_the_gpu_cannot_fit_takes_the_unfused_path(monkeypatch):
    """On a T4 (faked: every device answers sm75) rank 8 takes the fused kernels; rank 32, which fits their shared
    memory in fp32 there but is past the FMA roofline (rank_product.FMA_MAX_PADDED_RANK), and rank 64, which does not
    fit, take the projections' own path (no error), with the same loss as unpatched."""
    import qlora_fsdp.kernels.lora_add as la

    monkeypatch.setattr(rank_product, "cuda_capability", lambda device: (7, 5))
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    for r, fused in ((8, True), (32, False), (64, False)):
        want = tiny_lora_llama(r=r)(input_ids=ids, labels=ids).loss
        model = tiny_lora_llama(r=r)
        assert patch_lora_swiglu(model) == 2
        calls = []
        for fn in (ls.LoraSwiGLUDownAFunction, la.LoraAddFunction):
            monkeypatch.setattr(fn, "forward", _counting(fn.forward, calls))
        loss = model(input_ids=ids, labels=ids).loss
        assert len(calls) == (2 * 6 if fused else 0), (r, len(calls))  # a layer: its MLP, 4 attention projections, down
        torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)


def test_the_rank_check_traces_into_a_full_graph(monkeypatch):
    """The rank check runs inside compiled layers (fullgraph) on a GPU's tensors: it traces without a break, and it
    never reads the cache eager calls keep (seen twice on an H200: a cache that the op's fake run filled while Dynamo
    traced the layer made Dynamo's second pass take another branch, 'SpeculationLog diverged')."""
    import types

    class NoReads:
        def __contains__(self, key):
            raise AssertionError("compiled code read the eager cache of max_fused_rank")

        __getitem__ = __setitem__ = __contains__

    t4 = types.SimpleNamespace(major=7, minor=5, name="Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: t4)  # a T4 as device 0
    monkeypatch.setattr(rank_product, "_MAX_FUSED_RANK", NoReads())
    gpu = torch.device("cuda", 0)
    torch._dynamo.reset()
    try:
        fits = torch.compile(lambda x, r: x * rank_product.fused_rank_fits(r, x.dtype, gpu), fullgraph=True,
                             backend="eager")  # fmt: skip
        assert fits(torch.ones(2), 32).sum() == 2 and fits(torch.ones(2), 64).sum() == 0  # fp32 on a T4: up to 32
    finally:
        torch._dynamo.reset()
