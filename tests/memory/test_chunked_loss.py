"""The chunked linear + cross-entropy (chunked_loss.py) against the reference: `token_loss_sum` (compile.py) on the
full logits, with torch autograd for the gradient."""

import pytest
import torch

from qlora_fsdp.memory.chunked_loss import causal_lm_loss_sum, linear_cross_entropy_sum
from qlora_fsdp.compile import token_loss_sum


def make_inputs(B=3, T=37, H=48, V=1000, dtype=torch.float32):
    """hidden (B, T, H) requiring grad, a frozen weight (V, H), labels (B, T) with -100 at the start of a row, at
    scattered places, and on the whole of row 1 (when B > 1)."""
    hidden = torch.randn(B, T, H).to(dtype).requires_grad_()
    weight = (torch.randn(V, H) / H**0.5).to(dtype)
    labels = torch.randint(0, V, (B, T))
    labels[0, :5] = -100  # a prompt
    labels[torch.rand(B, T) < 0.2] = -100  # scattered
    if B > 1:
        labels[1] = -100  # a whole row
    return hidden, weight, labels


def loss_and_grad(fn, hidden, *args, **kw):
    """fn(hidden, *args, **kw) and its gradient w.r.t. hidden (a fresh leaf, so calls do not share .grad)."""
    hidden = hidden.detach().requires_grad_()
    loss = fn(hidden, *args, **kw)
    loss.backward()
    return loss.detach(), hidden.grad


def reference(hidden, weight, labels):
    """token_loss_sum on the full logits, in the inputs' dtype (as lm_head would compute them under autocast)."""
    return token_loss_sum(hidden @ weight.T, labels)


@pytest.mark.parametrize("chunk_tokens", [7, 64, 500])  # N = 3 * 37 = 111: none divides it, 500 exceeds it
def test_fp32_matches_reference(chunk_tokens):
    hidden, weight, labels = make_inputs()
    ref_loss, ref_grad = loss_and_grad(reference, hidden, weight, labels)
    loss, grad = loss_and_grad(linear_cross_entropy_sum, hidden, weight, labels, chunk_tokens=chunk_tokens)
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)
    assert grad[:, -1].eq(0).all() and grad[1].eq(0).all()  # the last position and an ignored row: no gradient


def test_loss_alone_without_grad():
    """Under no_grad (evaluation) the same loss, with no gradient computed or saved."""
    hidden, weight, labels = make_inputs()
    with torch.no_grad():
        loss = linear_cross_entropy_sum(hidden, weight, labels, chunk_tokens=64)
        ref_loss = reference(hidden, weight, labels)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)


def test_bf16_matches_reference():
    hidden, weight, labels = make_inputs(dtype=torch.bfloat16)
    ref_loss, ref_grad = loss_and_grad(reference, hidden, weight, labels)
    loss, grad = loss_and_grad(linear_cross_entropy_sum, hidden, weight, labels, chunk_tokens=64)
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref_loss, rtol=1e-2, atol=0)
    # Both sides round (softmax - onehot) to bf16 and sum V products into a bf16 result: an entry may differ by a
    # rounding of that result (2**-8 relative) plus the accumulation-order difference of the matmul, which for
    # entries near zero (cancellation across the V terms) is relative to the terms, not the entry: hence an atol
    # of 1% of the largest gradient next to an rtol of two bf16 ulps.
    torch.testing.assert_close(grad, ref_grad, rtol=2**-7, atol=1e-2 * ref_grad.abs().max().item())


def test_fp32_hidden_bf16_weight_under_autocast_matches_lm_head():
    """Under autocast, the logits are computed in the autocast dtype, as lm_head's would be; the grad stays fp32."""
    hidden, weight, labels = make_inputs()
    weight = weight.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss, ref_grad = loss_and_grad(lambda h: token_loss_sum(torch.nn.functional.linear(h, weight), labels),
                                           hidden)  # fmt: skip
        loss, grad = loss_and_grad(linear_cross_entropy_sum, hidden, weight, labels, chunk_tokens=64)
    assert grad.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=1e-2, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=2**-7, atol=1e-2 * ref_grad.abs().max().item())  # as for bf16


@pytest.mark.parametrize("T", [1, 9])
def test_no_label_gives_zero_loss_and_gradient(T):
    """All labels ignored, or a single position (T == 1: nothing to predict): loss 0, gradient zero."""
    hidden, weight, _ = make_inputs(B=2, T=T)
    labels = torch.full((2, T), -100)
    loss, grad = loss_and_grad(linear_cross_entropy_sum, hidden, weight, labels, chunk_tokens=4)
    assert loss.item() == 0.0
    assert grad.shape == hidden.shape and grad.eq(0).all()


def test_weight_requiring_grad_is_refused():
    hidden, weight, labels = make_inputs(B=1, T=4)
    with pytest.raises(ValueError, match="weight must not require grad"):
        linear_cross_entropy_sum(hidden, weight.requires_grad_(), labels)


def tiny_lora_llama():
    """A random 2-layer Llama (vocab 104, hidden 64) with LoRA on every linear but the head, B random (not zero)."""
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=104, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    model = peft.get_peft_model(LlamaForCausalLM(config), peft.LoraConfig(r=4, target_modules="all-linear",
                                                                          task_type="CAUSAL_LM"))  # fmt: skip
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model


def lora_grads(model, loss):
    """d loss / d LoRA parameters, by name; the model's .grad cleared afterwards."""
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


def test_causal_lm_loss_matches_model_logits_with_lora_and_right_padding():
    model = tiny_lora_llama()
    input_ids = torch.randint(0, 104, (2, 12))
    attention_mask = torch.ones(2, 12, dtype=torch.long)
    attention_mask[1, 8:] = 0  # right padding
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[0, :3] = -100  # a prompt

    ref_loss = token_loss_sum(model(input_ids=input_ids, attention_mask=attention_mask).logits, labels)
    ref_grads = lora_grads(model, ref_loss)
    loss = causal_lm_loss_sum(model, input_ids, labels, attention_mask, chunk_tokens=5)
    grads = lora_grads(model, loss)

    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    assert len(grads) == 2 * 7 * 2 and grads.keys() == ref_grads.keys()  # A and B of 7 linears in 2 layers
    assert all(g.abs().sum() > 0 for g in ref_grads.values())
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_causal_lm_head_with_bias_is_refused():
    model = tiny_lora_llama()
    base = model.get_base_model()
    base.lm_head = torch.nn.Linear(64, 104, bias=True).requires_grad_(False)
    with pytest.raises(ValueError, match="bias-free nn.Linear"):
        causal_lm_loss_sum(model, torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))
