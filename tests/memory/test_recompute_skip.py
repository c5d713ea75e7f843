"""recompute_skip.py: a recomputation leaves out each checkpointed layer's down-projection matmul, and the
gradients stay those of the full recomputation, bit for bit (eager and compiled); what is and is not marked."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from qlora_fsdp.memory import recompute_skip
from qlora_fsdp.memory.activation_checkpointing import checkpoint_layers
from qlora_fsdp.memory.recompute_skip import OutputFreeInRecomputation
from qlora_fsdp.model import decoder_layers, transformers_model
from qlora_fsdp.nf4.linear import keep_dequantized, nf4_linear, outputs_unused
from qlora_fsdp.nf4.format import quantize_nf4
from qlora_fsdp.nf4.tensor import NF4Tensor

from tests.memory.test_activation_checkpointing import batch, lora_model


def marked(model) -> list[bool]:
    return [isinstance(layer.mlp.down_proj.base_layer, OutputFreeInRecomputation) for layer in decoder_layers(model)]


def loss_and_backward_flops(model, ids):
    """LoRA gradients, and the FLOPs autograd's backward ran (the recomputations included)."""
    logits = model(input_ids=ids, use_cache=False).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    with FlopCounterMode(display=False) as counter:
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return grads, counter.get_total_flops()


@pytest.mark.parametrize("mode", ["reentrant", "offload", "non-reentrant"])
def test_recomputation_leaves_out_the_down_matmul_with_the_same_gradients(mode, monkeypatch):
    options = {"reentrant": mode == "reentrant", "offload": mode == "offload"}
    ids = batch()
    model = lora_model()
    checkpoint_layers(model, **options)
    assert all(marked(model))
    grads, flops = loss_and_backward_flops(model, ids)

    monkeypatch.setattr(recompute_skip, "LAST_PROJECTION_OF", {})  # the full recomputation
    full = lora_model()
    checkpoint_layers(full, **options)
    assert not any(marked(full))
    ref, ref_flops = loss_and_backward_flops(full, ids)

    for name in ref:
        assert ref[name].abs().sum() > 0, name
        torch.testing.assert_close(grads[name], ref[name], rtol=0, atol=0, msg=name)
    cfg = transformers_model(model).config
    down = 2 * ids.numel() * cfg.intermediate_size * cfg.hidden_size  # one layer's down matmul
    assert ref_flops - flops == cfg.num_hidden_layers * down


@pytest.mark.parametrize("outer", [None, "reentrant"])
def test_chunked_mlps_recompute_without_the_down_matmul(outer, monkeypatch):
    """A chunk of a sequence-chunked MLP is recomputed for its own backward, which reads nothing of its output: the
    down matmul runs in the forward alone (not in the layer's recomputation, nor in the chunk's), the same gradients."""
    from qlora_fsdp.memory.chunked_mlp import chunk_mlps

    def run():
        model = lora_model()
        chunk_mlps(model, 4)  # 3 x 11 tokens: chunks of 4, 4, ..., 1
        if outer:
            checkpoint_layers(model, reentrant=True)
        return loss_and_backward_flops(model, ids)

    ids = batch()
    grads, flops = run()
    monkeypatch.setattr(recompute_skip, "LAST_PROJECTION_OF", {})
    ref, ref_flops = run()
    for name in ref:
        torch.testing.assert_close(grads[name], ref[name], rtol=0, atol=0, msg=name)
    cfg = transformers_model(lora_model()).config
    down = 2 * ids.numel() * cfg.intermediate_size * cfg.hidden_size
    assert ref_flops - flops == (2 if outer else 1) * cfg.num_hidden_layers * down


def test_compiled_recomputation_runs_the_forward_graph_without_the_matmul():
    """A compiled layer runs one graph in forward and in its recomputation (the op reads the flag when it runs), so
    the non-reentrant form finds the tensors it saved. In backward each layer's op runs once (the recomputation) and
    multiplies nothing; the gradients are those of eager without checkpointing."""
    from qlora_fsdp.compile import compile_model

    ids = batch()
    ref, _ = loss_and_backward_flops(lora_model(), ids)  # no checkpointing
    torch._dynamo.reset()
    model = lora_model()
    checkpoint_layers(model)  # non-reentrant (FSDP2, the pipelines)
    compile_model(model, backend="aot_eager")
    logits = model(input_ids=ids, use_cache=False).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        loss.backward()
    torch._dynamo.reset()
    ops = [e for e in prof.events() if e.name == "qlora_fsdp::matmul_unless_unused"]
    assert len(ops) == len(decoder_layers(model))
    assert not any(child.name == "aten::mm" for e in ops for child in e.cpu_children)
    for name, g in ref.items():  # (aot_eager rounds apart from eager here: 5e-6 of the largest gradient)
        assert (model.get_parameter(name).grad - g).abs().max() <= 2e-5 * g.abs().max(), name


def test_what_is_marked(monkeypatch):
    """Checkpointed layers only, not the kept last layer; nothing for a model type whose layers do not end in the
    down projection."""
    model = lora_model()
    checkpoint_layers(model, keep_last=1)
    n = len(decoder_layers(model))
    assert marked(model) == [True] * (n - 1) + [False]
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
        with outputs_unused():
            y_free = nf4_linear(x, w, skippable=True)
            y_plain = nf4_linear(x, w)  # the flag alone changes nothing: only skippable calls read it
        torch.testing.assert_close(y_plain, y, rtol=0, atol=0)
        (gx_free,) = torch.autograd.grad(y_free, x, dy)
    finally:
        keep_dequantized(False)
    assert y_free.shape == y.shape and y_free.dtype == y.dtype
    torch.testing.assert_close(gx_free, gx, rtol=0, atol=0)
