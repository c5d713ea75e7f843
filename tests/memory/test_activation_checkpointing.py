"""Activation checkpointing (activation_checkpointing.py) against the same model without it: equal gradients, less
saved for backward, the same parameter names; and through TrainLoop, the same losses."""

import pytest
import torch

from qlora_fsdp.memory.activation_checkpointing import checkpoint_layers, is_checkpointed
from qlora_fsdp.model import decoder_layers, embedded_model_dir, load_model
from qlora_fsdp.training import TrainConfig, TrainError, TrainLoop, add_lora

from tests.training.test_loop import ListBatches, collate, run_loop, synthetic_examples

peft = pytest.importorskip("peft")


def lora_model(dropout=0.0):
    torch.manual_seed(0)
    model = load_model(embedded_model_dir(), dtype=torch.float32, device="cpu")
    model = add_lora(model, TrainConfig(lora_r=4, lora_alpha=8, lora_dropout=dropout))
    for name, p in model.named_parameters():  # LoRA B starts at zero: give it values so every gradient is nonzero
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model.train()


def batch(n=3, t=11):
    ids = torch.randint(4, 100, (n, t), generator=torch.Generator().manual_seed(3))
    return ids


def grads_and_saved_bytes(model, ids, seed=5):
    """LoRA gradients of the summed logits' log-softmax at the labels, and the bytes autograd saved in forward."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    torch.manual_seed(seed)  # the dropout masks
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(input_ids=ids, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return grads, sum(saved)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gradients_equal_the_uncheckpointed_model(dropout):
    """All layers, all but the last, the reentrant form and the offloaded one: the same LoRA gradients; the RNG state
    is replayed, so dropout masks match in the recomputation."""
    ids = batch()
    ref, ref_bytes = grads_and_saved_bytes(lora_model(dropout), ids)
    n_layers = len(decoder_layers(lora_model()))
    assert n_layers >= 2
    saved = {}
    for keep_last, offload, reentrant in [(0, False, False), (1, False, False), (0, False, True), (0, True, False)]:
        model = lora_model(dropout)
        n = checkpoint_layers(model, keep_last=keep_last, offload=offload, reentrant=reentrant)
        assert n == n_layers - keep_last
        assert [is_checkpointed(layer) for layer in decoder_layers(model)] == [True] * (n_layers - keep_last) + [
            False
        ] * keep_last
        grads, saved[keep_last, offload or reentrant] = grads_and_saved_bytes(model, ids)
        assert grads.keys() == ref.keys()
        for name in ref:
            assert ref[name].abs().sum() > 0, name
            torch.testing.assert_close(grads[name], ref[name], rtol=1e-5, atol=1e-7, msg=name)
    # what waits for backward: every layer's activations > all but one layer's > the layer inputs alone
    assert ref_bytes > saved[1, False] > saved[0, False]
    assert saved[0, True] <= saved[0, False]  # reentrant: the layer inputs, saved once


def test_names_and_state_dict_are_unchanged():
    model = lora_model()
    names = [n for n, _ in model.named_parameters()]
    keys = list(model.state_dict())
    checkpoint_layers(model)
    assert [n for n, _ in model.named_parameters()] == names
    assert list(model.state_dict()) == keys
    assert type(decoder_layers(model)[0]).__name__.startswith("Checkpointed")


def test_eval_and_no_grad_run_the_layer_plainly():
    model = lora_model()
    ids = batch()
    ref = model(input_ids=ids).logits
    checkpoint_layers(model, offload=True)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=0, atol=0)
    model.eval()
    torch.testing.assert_close(model(input_ids=ids).logits.detach(), ref.detach(), rtol=0, atol=0)


def test_train_loop_options_give_the_same_losses(tmp_path):
    """bf16 autocast on CPU: the recomputation runs under the forward's autocast, so keeping the last layer's
    activations or offloading the inputs gives the curve of plain checkpointing. (Not bit for bit the curve without
    checkpointing in bf16: checkpointed layers keep the down projection's lora_A out of the fused SwiGLU, which
    rounds its input gradient differently; fp32 is equal, tests/training/test_loop.py.)"""
    batches = [collate(synthetic_examples()[i : i + 4]) for i in range(0, 16, 4)]
    plain, _ = run_loop(tmp_path / "a", batches, 3, precision="bf16", activation_checkpointing=True)
    for i, kw in enumerate([{"ac_keep_layers": 1}, {"offload_activations": True}]):
        cfg = {"activation_checkpointing": True, "precision": "bf16", **kw}
        losses, loop = run_loop(tmp_path / f"b{i}", batches, 3, **cfg)
        assert losses == plain, kw
        assert any(is_checkpointed(layer) for layer in decoder_layers(loop.model))


def test_bad_options():
    with pytest.raises(TrainError, match="add --activation-checkpointing"):
        TrainConfig(offload_activations=True).validate()
    with pytest.raises(TrainError, match="add --activation-checkpointing"):
        TrainConfig(ac_keep_layers=2).validate()
    with pytest.raises(TrainError, match="runs on one GPU"):
        TrainConfig(activation_checkpointing=True, offload_activations=True, nproc=2).validate()
    with pytest.raises(TrainError, match="decoder layers"):
        cfg = TrainConfig(activation_checkpointing=True, ac_keep_layers=99, device="cpu", progress=False)
        TrainLoop(cfg, model=load_model(embedded_model_dir(), dtype=torch.float32, device="cpu"),
                  train_batches=ListBatches([collate(synthetic_examples()[:4])]))  # fmt: skip
    with pytest.raises(ValueError, match="keep_last"):
        checkpoint_layers(lora_model(), keep_last=-1)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_checkpointed_loop_keeps_the_down_lora_a_apart(tmp_path, checkpointing):
    """With checkpointing (memory first), TrainLoop patches the MLPs without lora_swiglu_down_a, whose backward
    holds act through the SwiGLU backward; without it, with."""
    cfg = TrainConfig(output_dir=str(tmp_path), activation_checkpointing=checkpointing, device="cpu", progress=False)
    loop = TrainLoop(cfg, model=load_model(embedded_model_dir(), dtype=torch.float32, device="cpu"),
                     train_batches=ListBatches([collate(synthetic_examples()[:4])]))  # fmt: skip
    mlps = [layer.mlp for layer in decoder_layers(loop.model)]
    assert mlps and all(m.lora_swiglu_fuses_down_a is not checkpointing for m in mlps)


@pytest.mark.parametrize("mode", ["non-reentrant", "reentrant", "offload"])
def test_keep_dequantized_spares_the_backward_dequantization_of_checkpointed_layers(mode, monkeypatch):
    """With every layer checkpointed, a base weight is dequantized in forward, in the recomputation and in backward:
    3 times a step. keep_dequantized keeps the recomputation's dense weight for the layer's backward, which follows
    it at once: 2 times, one layer's dense weights held at a time (the forward keeps nothing: it runs without
    autograd, or its saved tensors are dropped by the checkpoint). The same gradients."""
    from qlora_fsdp.nf4.linear import keep_dequantized
    from qlora_fsdp.nf4.tensor import NF4Tensor

    ids = batch()
    calls = []
    original = NF4Tensor.dequantize
    monkeypatch.setattr(NF4Tensor, "dequantize", lambda self, *a: calls.append(1) or original(self, *a))
    results = {}
    for keep in (False, True):
        model = lora_model()
        checkpoint_layers(model, reentrant=mode == "reentrant", offload=mode == "offload")
        n_weights = sum(isinstance(p, NF4Tensor) for p in model.parameters())
        keep_dequantized(keep)
        try:
            calls.clear()
            grads, _ = grads_and_saved_bytes(model, ids)
        finally:
            keep_dequantized(False)
        results[keep] = (len(calls), grads)
    # non-reentrant: the first layer's input (the frozen embedding's output) needs no gradient, so backward skips
    # the input gradients of q, k and v there; and the recomputation leaves out each layer's down projection
    # (recompute_skip.py), which dequantizes only where it keeps the weight for backward
    plain = 3 * n_weights - (3 if mode == "non-reentrant" else 0) - len(decoder_layers(model))
    assert n_weights > 0 and (results[False][0], results[True][0]) == (plain, 2 * n_weights)
    for name, g in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], g, rtol=1e-5, atol=1e-7, msg=name)
