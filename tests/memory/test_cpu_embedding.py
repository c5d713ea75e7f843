"""--embedding-on-cpu (cpu_embedding.py): the same logits, gradients and losses as the embedding on the device; tied
embeddings refused. The GPU memory it saves is measured in tests/test_gpu_training.py."""

import pytest
import torch

from qlora_fsdp.memory.cpu_embedding import embedding_on_cpu
from qlora_fsdp.training import TrainConfig, TrainError

from .test_activation_checkpointing import batch, grads_and_saved_bytes, lora_model
from tests.training.test_loop import collate, run_loop, synthetic_examples


def test_same_logits_and_gradients():
    ids = batch()
    ref, _ = grads_and_saved_bytes(lora_model(), ids)
    model = lora_model()
    model.enable_input_require_grads()  # peft's hook on the embedding output: ours must run before it
    emb = embedding_on_cpu(model)
    assert emb.weight.device.type == "cpu"
    grads, _ = grads_and_saved_bytes(model, ids)
    for name in ref:
        torch.testing.assert_close(grads[name], ref[name], rtol=0, atol=0, msg=name)


def test_refusals():
    model = lora_model()
    base = model.get_base_model()
    base.lm_head.weight = base.get_input_embeddings().weight
    with pytest.raises(ValueError, match="tied embeddings"):
        embedding_on_cpu(model)
    model = lora_model()
    model.get_base_model().get_input_embeddings().weight.requires_grad_(True)
    with pytest.raises(ValueError, match="trainable"):
        embedding_on_cpu(model)
    with pytest.raises(TrainError, match="runs on one GPU"):
        TrainConfig(embedding_on_cpu=True, nproc=2).validate()


def test_train_loop_same_losses(tmp_path):
    batches = [collate(synthetic_examples()[i : i + 4]) for i in range(0, 16, 4)]
    plain, _ = run_loop(tmp_path / "a", batches, 3)
    losses, _ = run_loop(tmp_path / "b", batches, 3, embedding_on_cpu=True, compile=True, compile_backend="aot_eager")
    assert losses == plain
