"""input_grad.py: the embedding output requires grad without becoming a leaf that autograd keeps (peft's
`enable_input_require_grads` makes one), and the LoRA gradients are those of peft's way."""

import weakref

import torch

from qlora_fsdp.memory.activation_checkpointing import checkpoint_layers
from qlora_fsdp.memory.input_grad import embedding_output_requires_grad

from .test_activation_checkpointing import batch, grads_and_saved_bytes, lora_model


def embedding_outputs(model):
    """Weak references to what the embedding returned, after every other hook of it ran."""
    refs = []
    emb = model.get_base_model().get_input_embeddings()
    emb.register_forward_hook(lambda m, a, out: refs.append(weakref.ref(out)))
    return refs


def test_output_requires_grad_and_is_not_kept():
    ids = batch()
    peft_way = lora_model()
    peft_way.enable_input_require_grads()
    refs = embedding_outputs(peft_way)
    checkpoint_layers(peft_way, reentrant=True)
    loss = peft_way(input_ids=ids, use_cache=False).logits.float().logsumexp(-1).sum()
    assert refs[0]().requires_grad and refs[0]().is_leaf
    loss.backward()
    assert refs[0]().grad.shape == (*ids.shape, 128)  # kept, with a gradient nothing reads

    model = lora_model()
    embedding_output_requires_grad(model)
    embedding_output_requires_grad(model)  # idempotent: one hook
    refs = embedding_outputs(model)
    out = model(input_ids=ids, use_cache=False).logits
    assert len(refs) == 1 and refs[0]() is not None and refs[0]().requires_grad and not refs[0]().is_leaf
    assert out.requires_grad
    model = lora_model()
    checkpoint_layers(model, reentrant=True)
    refs = embedding_outputs(model)
    loss = model(input_ids=ids, use_cache=False).logits.float().logsumexp(-1).sum()
    loss.backward()
    assert refs[0]() is None  # freed with the graph, no gradient stored


def test_same_gradients_as_peft_hook():
    ids = batch()
    ref = lora_model()
    ref.enable_input_require_grads()
    checkpoint_layers(ref, reentrant=True)  # peft's hook first: ours sees a tensor that already requires grad
    want, _ = grads_and_saved_bytes(ref, ids)
    model = lora_model()
    checkpoint_layers(model, reentrant=True)
    got, _ = grads_and_saved_bytes(model, ids)
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)
