"""On a CUDA device: the NF4 base path through the Triton kernel, and a short training run (skipped on CPU)."""

import gc

import pytest
import torch
from torch import nn

from qlora_fsdp.model import embedded_model_dir, load_model
from qlora_fsdp.nf4 import dequantize_reference, quantize_nf4
from qlora_fsdp.nf4.tensor import NF4Tensor
from qlora_fsdp.training import TrainConfig, TrainLoop

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(4096, 4096), (1024, 4096), (96, 200)])
def test_nf4_linear_on_cuda_equals_dense(shape, dtype):
    out_f, in_f = shape
    w = quantize_nf4(torch.randn(out_f, in_f, device="cuda", dtype=dtype) * 0.02)
    lin = nn.Linear(in_f, out_f, bias=False, device="cuda")
    lin.weight = nn.Parameter(NF4Tensor(w, dtype), requires_grad=False)
    x = torch.randn(2, 33, in_f, device="cuda", dtype=dtype, requires_grad=True)
    y = lin(x)
    g = torch.randn_like(y)
    y.backward(g)
    dense = dequantize_reference(w.to("cpu"), dtype).cuda()  # the CPU reference, bit-exact with the kernel
    x2 = x.detach().clone().requires_grad_()
    y2 = x2 @ dense.t()
    y2.backward(g)
    assert torch.equal(y, y2) and torch.equal(x.grad, x2.grad)


def test_training_on_cuda_bf16_falls(tmp_path):
    cfg = TrainConfig(output_dir=str(tmp_path), max_steps=30, lr=3e-3, batch_size=16, precision="bf16",
                      device="cuda", progress=False, activation_checkpointing=True)  # fmt: skip
    loop = TrainLoop(cfg)
    weight = loop.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert isinstance(weight, NF4Tensor) and weight.device.type == "cuda", (type(weight), weight.device)
    records = loop.train()
    losses = [r["loss"] for r in records if "loss" in r]
    assert torch.isfinite(torch.tensor(losses)).all(), losses
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert evals[-1] < 0.7 * evals[0], evals


def test_load_model_quantizes_on_cuda_like_bitsandbytes(tmp_path):
    bnbF = pytest.importorskip("bitsandbytes.functional")
    model = load_model(embedded_model_dir(), device="cuda")
    from safetensors.torch import load_file

    key = "model.layers.2.mlp.down_proj.weight"
    dense = load_file(embedded_model_dir() / "model.safetensors")[key].cuda()
    packed, qs = bnbF.quantize_4bit(dense, blocksize=64, compress_statistics=True, quant_type="nf4")
    w = model.get_parameter(key).nf4
    assert torch.equal(w.data, packed.view(-1)) and torch.equal(w.absmax, qs.absmax)


@pytest.mark.parametrize("precision, rtol", [("fp32", 1e-5), ("bf16", 1e-2)])
def test_compiled_training_on_cuda_equals_eager(tmp_path, precision, rtol):
    """--compile on CUDA (inductor; the Triton dequant traced through its triton_op) against eager: per-step losses
    over 8 steps on a 1024-wide random Llama, and the LoRA gradients of the first step."""
    import transformers

    from qlora_fsdp.compile import compile_counts
    from qlora_fsdp.model import random_model
    from tests.training.test_loop import ListBatches

    config = transformers.LlamaConfig(vocab_size=512, hidden_size=1024, intermediate_size=2048, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=4)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": (ids := torch.randint(0, 512, (2, 256), generator=g)), "labels": ids.clone()} for _ in range(4)]

    def run(compile):
        cfg = TrainConfig(output_dir=str(tmp_path / str(compile)), max_steps=8, lr=1e-3, warmup_steps=0, lora_r=16,
                          precision=precision, device="cuda", progress=False, compile=compile)  # fmt: skip
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        loop = TrainLoop(cfg, model=random_model(config, dtype=dtype, device="cuda"), train_batches=ListBatches(batches))
        loss = loop._forward_loss_sum(loop._to_device(batches[0]))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in loop.model.named_parameters() if p.requires_grad}
        loop.optimizer.zero_grad(set_to_none=True)
        return [r["loss"] for r in loop.train() if "loss" in r], grads

    eager, eager_grads = run(False)
    compiled, compiled_grads = run(True)
    assert compile_counts()["graph_breaks"] == 0
    print("eager", eager, "\ncompiled", compiled)
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=rtol, atol=0)
    for n, ge in eager_grads.items():  # lora_B starts at 0: its gradient is the informative one
        err = (compiled_grads[n] - ge).norm() / (ge.norm() + 1e-12)
        assert err < (1e-4 if precision == "fp32" else 3e-2), (n, float(err))


@pytest.mark.xfail(reason="issue 5, open: on an H100 (torch 2.11) inductor agrees with eager to 2e-7 (fp32) / 7e-5 (bf16) "
                   "on the first step, but the 20-step curve of this tiny model at lr 3e-3 drifts to 3.7e-4 (fp32) and "
                   "9e-2 (bf16)", strict=False)  # fmt: skip
@pytest.mark.parametrize("precision, rtol", [("fp32", 1e-5), ("bf16", 1e-2)])
def test_embedded_default_compiled_with_inductor_on_cuda_equals_eager(tmp_path, precision, rtol):
    """20 steps of the embedded default (lr 3e-3, batch 16) on CUDA: --compile (inductor) against eager."""
    def run(compile):
        cfg = TrainConfig(output_dir=str(tmp_path / str(compile)), max_steps=20, lr=3e-3, batch_size=16, warmup_steps=10,
                          lora_r=16, lora_alpha=32, precision=precision, group_by_length=False, device="cuda",
                          progress=False, eval_every=10, compile=compile)  # fmt: skip
        return torch.tensor([r["loss"] for r in TrainLoop(cfg).train() if "loss" in r])

    eager, compiled = run(False), run(True)
    print(precision, "per-step relative difference", ((compiled - eager).abs() / eager.abs()).tolist())
    torch.testing.assert_close(compiled, eager, rtol=rtol, atol=0)


def test_memory_options_on_cuda(tmp_path, monkeypatch):
    """--embedding-on-cpu frees the embedding's bytes on the GPU; --offload-activations holds the checkpointed
    layers' inputs in host memory between forward and backward (here in 1.5 MiB pieces, the last one short), alone
    and with --mlp-chunk-tokens; all give the same losses."""
    import transformers

    from qlora_fsdp.memory import activation_checkpointing
    from qlora_fsdp.memory.activation_checkpointing import _OFFLOAD
    from qlora_fsdp.memory.cpu_embedding import embedding_on_cpu
    from qlora_fsdp.model import random_model

    monkeypatch.setattr(activation_checkpointing, "HOST_PIECE_BYTES", 3 << 19)  # 6 pieces a layer input

    from tests.training.test_loop import ListBatches

    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                                      num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False)  # fmt: skip
    model = random_model(config, dtype=torch.bfloat16, device="cuda", seed=0)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    embedding_on_cpu(model)
    freed = before - torch.cuda.memory_allocated()  # the caching allocator counts large blocks in 2 MiB steps
    assert 32000 * 512 * 2 <= freed <= 32000 * 512 * 2 + 2**21, freed
    del model
    ids = torch.randint(0, 32000, (2, 4096), generator=torch.Generator().manual_seed(0))
    batches = ListBatches([{"input_ids": ids, "labels": ids.clone()}])
    results = {}
    for name, kw in {"plain": {}, "cpu_embedding": {"embedding_on_cpu": True},
                     "offload": {"offload_activations": True},
                     "offload_mlp_chunks": {"offload_activations": True, "mlp_chunk_tokens": 1000}}.items():  # fmt: skip
        gc.collect()
        torch.cuda.empty_cache()
        cfg = TrainConfig(output_dir=str(tmp_path / name), max_steps=2, precision="bf16", device="cuda",
                          progress=False, activation_checkpointing=True, chunked_loss=True, **kw)  # fmt: skip
        loop = TrainLoop(cfg, model=random_model(config, dtype=torch.bfloat16, device="cuda", seed=0),
                         train_batches=batches)  # fmt: skip
        loop.model.train()  # as train_step does: checkpointing applies in training mode only
        b = loop._to_device(batches.batches[0])
        torch.cuda.synchronize()
        rest = torch.cuda.memory_allocated()
        loss = loop._forward_loss_sum(b)
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - rest
        loss.backward()
        loop.optimizer.zero_grad(set_to_none=True)
        losses = [loop.train_step()["loss"] for _ in range(2)]
        results[name] = (held, losses)
        assert not [r for r in _OFFLOAD.stack if r() is not None]  # every offloaded input came back
        del loop, b, loss
    # the inputs of all 4 layers, (B, T, H) bf16 (layer 0's is no leaf that autograd keeps: input_grad.py)
    layer_inputs = 4 * 2 * 4096 * 512 * 2
    assert results["plain"][0] - results["offload"][0] >= layer_inputs, results
    assert results["offload_mlp_chunks"][0] <= results["offload"][0], results
    for name in ("cpu_embedding", "offload", "offload_mlp_chunks"):  # the same kernels; flash attention's backward may sum in another order
        torch.testing.assert_close(torch.tensor(results[name][1]), torch.tensor(results["plain"][1]), rtol=1e-3, atol=0)
