"""lora/fuse.py: the README's Trainer recipe (load_model + peft.get_peft_model) given our fused LoRA layers in place
trains like peft's own layers (loss and every LoRA gradient, fp32), through the fused autograd Functions (their
PyTorch references on CPU, the GPU's autograd graph), and writes the same adapter files."""

import peft
import pytest
import torch

from qlora_fsdp import fuse_lora, load_model
from qlora_fsdp.kernels import lora_add, lora_swiglu
from qlora_fsdp.lora.linear import RankScaledLoraLinear
from qlora_fsdp.model import embedded_model_dir

LAYERS = 4  # the embedded model's


def recipe_model(dropout: float = 0.0):
    """What the README tells a Trainer user to build, with every LoRA B nonzero (so the LoRA path is exercised)."""
    model = load_model(embedded_model_dir(), dtype=torch.float32, device="cpu")
    torch.manual_seed(0)
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout,
                                                       target_modules="all-linear", task_type="CAUSAL_LM"))  # fmt: skip
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(len(name)))
    return model


def counting(monkeypatch, cls, calls: list):
    forward = cls.forward
    monkeypatch.setattr(cls, "forward", staticmethod(lambda ctx, *a: calls.append(cls.__name__) or forward(ctx, *a)))


@pytest.mark.parametrize("activation_checkpointing", [False, True])
def test_the_trainer_recipe_fused_trains_like_peft(monkeypatch, tmp_path, activation_checkpointing):
    ids = torch.randint(4, 100, (2, 17), generator=torch.Generator().manual_seed(1))
    calls = []
    for cls in (lora_add.LoraAddFunction, lora_swiglu.LoraSwiGLUFunction, lora_swiglu.LoraSwiGLUDownAFunction):
        counting(monkeypatch, cls, calls)
    results = []
    for fused in (False, True):
        model = recipe_model()
        if activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if fused:
            assert fuse_lora(model, activation_checkpointing=activation_checkpointing) == {"linears": 7 * LAYERS,
                                                                                            "mlps": LAYERS}  # fmt: skip
            assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj, RankScaledLoraLinear)
        model.train()
        calls.clear()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        # fused: q, k, v, o through lora_add, the MLP through the SwiGLU function (its down_proj's lora_A inside it
        # without checkpointing; with it, the down projection through lora_add); peft's layers: none
        down_a = "LoraSwiGLUFunction" if activation_checkpointing else "LoraSwiGLUDownAFunction"
        recomputed = 2 if activation_checkpointing else 1  # a checkpointed layer's forward runs again in backward
        expected = sorted((["LoraAddFunction"] * 5 + [down_a]) * LAYERS * recomputed)
        assert sorted(calls) == (expected if fused else []), sorted(calls)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.save_pretrained(tmp_path / f"fused{fused}")
        results.append((loss.detach(), grads))
    (loss, grads), (loss_f, grads_f) = results
    torch.testing.assert_close(loss_f, loss, rtol=1e-5, atol=0)
    assert grads.keys() == grads_f.keys() and len(grads) == 2 * 7 * LAYERS
    for name in grads:  # fp32 sums in another order: up to 1.4e-5 apart by norm when written
        assert grads[name].abs().sum() > 0, name
        assert (grads_f[name] - grads[name]).norm() <= 1e-4 * grads[name].norm(), name
    from safetensors.torch import load_file

    saved = [load_file(tmp_path / f"fused{f}" / "adapter_model.safetensors") for f in (False, True)]
    assert saved[0].keys() == saved[1].keys() and all(torch.equal(saved[0][k], saved[1][k]) for k in saved[0])


def test_what_is_not_a_plain_peft_linear_is_left_alone():
    """Layers already ours (a second call, or our loop's model): nothing to swap, the MLPs still routed; a model
    without LoRA: nothing at all."""
    model = recipe_model()
    assert fuse_lora(model)["linears"] == 7 * LAYERS
    assert fuse_lora(model) == {"linears": 0, "mlps": LAYERS}
    assert fuse_lora(load_model(embedded_model_dir(), dtype=torch.float32, device="cpu")) == {"linears": 0, "mlps": 0}


@pytest.mark.timeout(600)
def test_the_trainer_recipe_compiled_trains_like_eager():
    """The Trainer recipe with transformers' checkpointing, fuse_lora and compile_model (every decoder layer, one graph,
    fullgraph): transformers 5 calls the checkpoint inside the compiled forward, where a side effect of the `kernels`
    hub would stop Dynamo; the loss and every LoRA gradient equal eager's (aot_eager: the same ops)."""
    from torch._dynamo.utils import counters

    from qlora_fsdp.compile import compile_counts, compile_model

    ids = torch.randint(4, 100, (2, 17), generator=torch.Generator().manual_seed(2))
    results = []
    torch._dynamo.reset()
    counters.clear()
    try:
        for compiled in (False, True):
            model = recipe_model()
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            fuse_lora(model, activation_checkpointing=True)
            if compiled:
                compile_model(model, backend="aot_eager")
            model.train()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
        counts = compile_counts()
    finally:
        torch._dynamo.reset()
    assert counts["graph_breaks"] == 0 and counts["graphs"] >= 1, counts
    (loss, grads), (loss_c, grads_c) = results
    torch.testing.assert_close(loss_c, loss, rtol=1e-6, atol=0)
    for name in grads:
        assert grads[name].abs().sum() > 0, name
        torch.testing.assert_close(grads_c[name], grads[name], rtol=1e-5, atol=1e-7)
