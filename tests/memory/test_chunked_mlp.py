"""Sequence-chunked MLPs (chunked_mlp.py) against the same model unchunked: equal LoRA gradients (alone and inside
checkpointed layers), equal outputs without grad, only (chunk, I) tensors of the MLP's width alive at a time; through
TrainLoop the same losses, eager and compiled (one graph break a layer)."""

import pytest
import torch

from qlora_fsdp.memory.activation_checkpointing import checkpoint_layers
from qlora_fsdp.memory.chunked_mlp import chunk_mlps, is_chunked
from qlora_fsdp.model import decoder_layers
from qlora_fsdp.training import TrainConfig, TrainError

from .test_activation_checkpointing import batch, grads_and_saved_bytes, lora_model
from tests.training.test_loop import collate, run_loop, synthetic_examples

INTERMEDIATE = 384  # the embedded model's MLP width


def chunked_grads(dropout, chunk, outer=None):
    model = lora_model(dropout)
    assert chunk_mlps(model, chunk) == len(decoder_layers(model))
    if outer:
        checkpoint_layers(model, reentrant=outer == "reentrant")
    return grads_and_saved_bytes(model, batch())[0]


def assert_same(grads, ref, exact=False):
    """Equal LoRA gradients: to the bit where both runs multiply the same blocks of rows, else to fp32 rounding
    relative to each tensor's largest entry (a CPU BLAS may sum a 4-row and a 33-row product in other orders: 2.4e-5
    of the largest entry measured with 16 threads)."""
    assert grads.keys() == ref.keys()
    for name in ref:
        scale = ref[name].abs().max().item()
        assert scale > 0, name
        tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-4, atol=1e-4 * scale)
        torch.testing.assert_close(grads[name], ref[name], **tol, msg=name)


@pytest.mark.parametrize("outer", [None, "non-reentrant", "reentrant"])
def test_gradients_equal_the_unchunked_model(outer):
    """3 x 11 tokens in chunks of 4 (the last one short), alone and inside checkpointed layers."""
    ref, _ = grads_and_saved_bytes(lora_model(), batch())
    assert_same(chunked_grads(0.0, 4, outer), ref)


def test_dropout_masks_are_replayed_in_the_recomputation():
    """Each chunk draws its own dropout masks (so not the unchunked model's); recomputing a chunk in backward, alone
    or inside a recomputed layer, draws the same ones again."""
    ref = chunked_grads(0.1, 4)
    for outer in ("non-reentrant", "reentrant"):
        assert_same(chunked_grads(0.1, 4, outer), ref, exact=True)


def test_only_chunk_rows_of_the_mlp_width_are_saved():
    """What forward keeps for backward: unchunked, (33, 384) tensors of the MLP's width; chunked, none of that width
    (each chunk keeps its input), and recomputation in backward makes them a chunk at a time."""
    ids = batch()

    def saved_widths(model):
        rows = []

        def pack(t):
            rows.append(t.shape[0] if t.dim() == 2 and t.shape[-1] == INTERMEDIATE else 0)  # flattened (N, I)
            if t.dim() == 3 and t.shape[-1] == INTERMEDIATE:
                rows.append(t.shape[0] * t.shape[1])  # (B, T, I)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, use_cache=False).logits.sum().backward()
        return rows

    assert max(saved_widths(lora_model())) == ids.numel()
    model = lora_model()
    chunk_mlps(model, 4)
    assert max(saved_widths(model)) <= 4


def test_no_grad_and_eval_give_the_same_outputs():
    model = lora_model()
    ids = batch()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        chunk_mlps(model, 5)
        torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=1e-4, atol=5e-5)  # CPU matmuls block rows differently
    model.eval()
    torch.testing.assert_close(model(input_ids=ids).logits.detach(), ref, rtol=1e-4, atol=5e-5)  # CPU matmuls block rows differently
    assert all(is_chunked(layer.mlp) for layer in decoder_layers(model))
    names = [n for n, _ in lora_model().named_parameters()]
    assert [n for n, _ in model.named_parameters()] == names


@pytest.mark.timeout(300)
def test_train_loop_same_losses_eager_and_compiled(tmp_path):
    """fp32: chunked the same curve as unchunked; compiled (aot_eager) the same as eager, with one graph break."""
    from torch._dynamo.utils import counters

    from qlora_fsdp.compile import compile_counts

    batches = [collate(synthetic_examples()[i : i + 4]) for i in range(0, 16, 4)]
    plain, _ = run_loop(tmp_path / "a", batches, 3)
    chunked, loop = run_loop(tmp_path / "b", batches, 3, mlp_chunk_tokens=7, activation_checkpointing=True)
    torch.testing.assert_close(torch.tensor(chunked), torch.tensor(plain), rtol=1e-5, atol=0)
    assert all(is_chunked(layer.mlp) for layer in decoder_layers(loop.model))
    torch._dynamo.reset()
    counters.clear()
    try:
        compiled, _ = run_loop(tmp_path / "c", batches, 3, mlp_chunk_tokens=7, compile=True,
                               compile_backend="aot_eager")  # fmt: skip
        counts = compile_counts()
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(plain), rtol=1e-5, atol=0)
    assert counts["graph_breaks"] >= 1, counts  # the chunk loop runs outside the layer's graph


def test_bad_options():
    with pytest.raises(TrainError, match="--mlp-chunk-tokens must be at least 0"):
        TrainConfig(mlp_chunk_tokens=-2).validate()
    with pytest.raises(ValueError, match="chunk_tokens must be at least 1"):
        chunk_mlps(lora_model(), 0)
    with pytest.raises(ValueError, match="no decoder layers"):
        chunk_mlps(torch.nn.Linear(2, 2), 4)
    model = lora_model()
    for layer in decoder_layers(model):  # an MLP that returns (hidden, router logits), as mixture-of-experts blocks do
        layer.mlp.forward = lambda x, f=layer.mlp.forward: (f(x), None)
    chunk_mlps(model, 4)
    with pytest.raises(TypeError, match="returns tuple, not one tensor"):
        model(input_ids=batch())
