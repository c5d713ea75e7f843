"""On a CUDA device: the NF4 base path through the Triton kernel, and a short training run (skipped on CPU)."""

import pytest
import torch
from torch import nn

from qlora_fsdp.model import embedded_model_dir, load_model
from qlora_fsdp.nf4 import dequantize_reference, quantize_nf4
from qlora_fsdp.nf4.tensor import NF4Tensor
from qlora_fsdp.train import TrainConfig, TrainLoop

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
