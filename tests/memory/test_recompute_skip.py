"""recompute_skip.py: a reentrant recomputation leaves out each checkpointed layer's down-projection matmul, and the
gradients stay those of the full recomputation, bit for bit (eager and compiled); what is and is not marked."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from qlora_fsdp.memory import recompute_skip
from qlora_fsdp.memory.activation_checkpointing import checkpoint_layers
from qlora_fsdp.memory.recompute_skip import OutputFreeInRecomputation, recomputing
from qlora_fsdp.model import decoder_layers, transformers_model
from qlora_fsdp.nf4.linear import keep_dequantized, nf4_linear
from qlora_fsdp.nf4.format import quantize_nf4
from qlora_fsdp.nf4.tensor import NF4Tensor

from tests.memory.test_activation_checkpointing import batch, lora_model


def marked(model) -> list[bool]:
    return [isinstance(layer.mlp.down_proj.base_layer, OutputFreeInRecomputation) for layer in decoder_layers(model)]


def loss_and_backward_flops(model, ids, compile_backend=None):
    """LoRA gradients, and the FLOPs autograd's backward ran (the recomputations included); compiled, the number of
    aten::mm calls instead (the FLOP counter is a dispatch mode, which Dynamo does not trace)."""
    if compile_backend:
        from qlora_fsdp.compile import compile_model

        compile_model(model, backend=compile_backend)
        # a first step compiles the graphs (its backward the recomputation's); the second is counted
        logits = model(input_ids=ids, use_cache=False).logits
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, use_cache=False).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    if compile_backend:  # the matmuls counted instead (the profiler records compiled graphs' aten ops too)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            loss.backward()
        flops = sum(e.name == "aten::mm" for e in prof.events())
    else:
        with FlopCounterMode(display=False) as counter:
            loss.backward()
        flops = counter.get_total_flops()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return grads, flops


@pytest.mark.parametrize("offload", [False, True])
def test_recomputation_leaves_out_the_down_matmul_with_the_same_gradients(offload, monkeypatch):
    ids = batch()
    model = lora_model()
    checkpoint_layers(model, offload=offload, reentrant=True)
    assert all(marked(model))
    grads, flops = loss_and_backward_flops(model, ids)

    monkeypatch.setattr(recompute_skip, "LAST_PROJECTION_OF", {})  # the full recomputation
    full = lora_model()
    checkpoint_layers(full, offload=offload, reentrant=True)
    assert not any(marked(full))
    ref, ref_flops = loss_and_backward_flops(full, ids)

    for name in ref:
        assert ref[name].abs().sum() > 0, name
        torch.testing.assert_close(grads[name], ref[name], rtol=0, atol=0, msg=name)
    cfg = transformers_model(model).config
    down = 2 * ids.numel() * cfg.intermediate_size * cfg.hidden_size  # one layer's down matmul
    assert ref_flops - flops == cfg.num_hidden_layers * down


def test_compiled_recomputation_gives_the_same_gradients(monkeypatch):
    """A compiled layer reads the flag in its graph: the recomputation compiles without the matmul; the gradients
    equal the compiled full recomputation's (aot_eager: the same ops as eager)."""
    torch._dynamo.reset()
    ids = batch()
    model = lora_model()
    checkpoint_layers(model, reentrant=True)
    grads, mms = loss_and_backward_flops(model, ids, compile_backend="aot_eager")
    torch._dynamo.reset()
    monkeypatch.setattr(recompute_skip, "LAST_PROJECTION_OF", {})
    full = lora_model()
    checkpoint_layers(full, reentrant=True)
    ref, ref_mms = loss_and_backward_flops(full, ids, compile_backend="aot_eager")
    torch._dynamo.reset()
    for name in ref:
        torch.testing.assert_close(grads[name], ref[name], rtol=0, atol=0, msg=name)
    assert ref_mms - mms == len(decoder_layers(model))  # one down matmul a layer


def test_what_is_marked(monkeypatch):
    """Checkpointed layers under reentrant checkpointing only: not the kept last layer, nothing under the
    non-reentrant form, nothing for a model type whose layers do not end in the down projection."""
    model = lora_model()
    checkpoint_layers(model, keep_last=1, reentrant=True)
    n = len(decoder_layers(model))
    assert marked(model) == [True] * (n - 1) + [False]
    model = lora_model()
    checkpoint_layers(model)
    assert not any(marked(model))
    model = lora_model()
    transformers_model(model).config.model_type = "gemma2"  # a post-feedforward norm reads the MLP output
    checkpoint_layers(model, reentrant=True)
    assert not any(marked(model))


@pytest.mark.parametrize("keep", [False, True])
def test_nf4_linear_without_output_has_the_full_backward(keep):
    torch.manual_seed(0)
    w = NF4Tensor(quantize_nf4(torch.randn(24, 64)), torch.float32)
    x = torch.randn(3, 5, 64, requires_grad=True)
    dy = torch.randn(3, 5, 24)
    keep_dequantized(keep)
    try:
        y = nf4_linear(x, w)
        (gx,) = torch.autograd.grad(y, x, dy)
        with recomputing():  # the flag alone changes nothing: only marked modules read it
            y_free = nf4_linear(x, w, output_needed=False)
        (gx_free,) = torch.autograd.grad(y_free, x, dy)
    finally:
        keep_dequantized(False)
    assert y_free.shape == y.shape and y_free.dtype == y.dtype
    torch.testing.assert_close(gx_free, gx, rtol=0, atol=0)
