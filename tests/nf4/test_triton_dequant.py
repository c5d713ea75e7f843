"""The Triton dequantizer: bit-exact with the reference (interpreter on CPU, the real kernel on CUDA),
one launch, and traceable by torch.compile(fullgraph=True) with no graph break."""

import os
import subprocess
import sys

import pytest
import torch

from qlora_fsdp.nf4 import NF4FormatError, dequantize_nf4, dequantize_reference, quantize_nf4
from qlora_fsdp.nf4 import triton_dequant
from tests.conftest import requires_cuda

SHAPES = [(1, 64), (3, 200), (7, 13), (1, 1), (1, 63), (5, 7, 9), (33, 520)]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
on_cpu_interpreter = pytest.mark.skipif(
    torch.cuda.is_available() or not triton_dequant.triton_interpreting(),
    reason="CPU interpreter test (TRITON_INTERPRET=1 without CUDA)",
)


@pytest.fixture
def launches(monkeypatch):
    """Counts kernel launches, so a test cannot pass through the reference by mistake."""
    calls = []
    real = triton_dequant._launch

    def spy(*args, **kwargs):
        calls.append(args[7].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(triton_dequant, "_launch", spy)
    return calls


@on_cpu_interpreter
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("double_quant", [True, False])
def test_interpreted_kernel_matches_reference(shape, double_quant, launches):
    w = quantize_nf4((torch.randn(shape) * 0.02).bfloat16(), double_quant=double_quant)
    for dtype in DTYPES:
        out = dequantize_nf4(w, dtype)
        assert out.dtype == dtype and out.shape == torch.Size(shape) and out.is_contiguous()
        assert torch.equal(out, dequantize_reference(w, dtype))
    assert len(launches) == len(DTYPES)


@on_cpu_interpreter
@pytest.mark.parametrize("blocksize", [32, 128, 256, 1024, 4096])
def test_interpreted_kernel_blocksizes(blocksize, launches):
    for shape in [(3, 4096), (2, 1000)]:
        w = quantize_nf4(torch.randn(shape, dtype=torch.float16), blocksize=blocksize, double_quant=blocksize < 4096)
        for dtype in DTYPES:
            assert torch.equal(dequantize_nf4(w, dtype), dequantize_reference(w, dtype))
    assert len(launches) == 2 * len(DTYPES)


@on_cpu_interpreter
def test_interpreted_kernel_many_programs(launches):
    # several programs with a partial last one, a nested block boundary inside a program, bf16 ties
    w = quantize_nf4(torch.randn(70, 4160, dtype=torch.bfloat16) * 3, nested_blocksize=256)
    assert torch.equal(dequantize_nf4(w, torch.bfloat16), dequantize_reference(w, torch.bfloat16))
    assert launches


def test_cpu_without_interpreter_uses_reference():
    code = (
        "import torch\n"
        "from qlora_fsdp.nf4 import quantize_nf4, dequantize_nf4, dequantize_reference, triton_dequant\n"
        "assert not triton_dequant.triton_interpreting()\n"
        "def boom(*a, **k): raise AssertionError('kernel launched')\n"
        "triton_dequant._launch = boom\n"
        "w = quantize_nf4(torch.randn(3, 200))\n"
        "assert torch.equal(dequantize_nf4(w, torch.bfloat16), dequantize_reference(w, torch.bfloat16))\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def _qlora_like(x, w):
    # a function like the base path of a QLoRA linear: dequantize, matmul
    return x @ dequantize_nf4(w, x.dtype).t()


def test_compiled_caller_has_no_graph_breaks():
    torch._dynamo.reset()
    w = quantize_nf4(torch.randn(96, 128, dtype=torch.bfloat16))
    x = torch.randn(4, 128, dtype=torch.bfloat16)
    explanation = torch._dynamo.explain(_qlora_like)(x, w)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_compiled_caller_matches_eager(backend):
    torch._dynamo.reset()
    w = quantize_nf4(torch.randn(96, 128, dtype=torch.bfloat16))
    x = torch.randn(4, 128, dtype=torch.bfloat16)
    expected = x @ dequantize_reference(w, torch.bfloat16).t()
    compiled = torch.compile(_qlora_like, backend=backend, fullgraph=True)
    assert torch.equal(compiled(x, w), expected)


def test_rejects_bad_output_dtype():
    w = quantize_nf4(torch.randn(4, 64))
    with pytest.raises(NF4FormatError, match="output dtype torch.int32"):
        dequantize_nf4(w, torch.int32)


# ---------------------------------------------------------------------------------------------- GPU


@requires_cuda
@pytest.mark.parametrize("shape", SHAPES + [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)])
@pytest.mark.parametrize("double_quant", [True, False])
def test_cuda_kernel_matches_reference(shape, double_quant):
    w = quantize_nf4((torch.randn(shape) * 0.02).bfloat16().cuda(), double_quant=double_quant)
    for dtype in DTYPES:
        out = dequantize_nf4(w, dtype)
        assert torch.equal(out, dequantize_reference(w, dtype))


@requires_cuda
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 512, 1024, 2048, 4096])
def test_cuda_kernel_blocksizes(blocksize):
    w = quantize_nf4(torch.randn(37, 4096, dtype=torch.float16, device="cuda"), blocksize=blocksize)
    for dtype in DTYPES:
        assert torch.equal(dequantize_nf4(w, dtype), dequantize_reference(w, dtype))


@requires_cuda
def test_cuda_kernel_is_one_launch():
    w = quantize_nf4(torch.randn(1024, 4096, dtype=torch.bfloat16, device="cuda"))
    dequantize_nf4(w)  # compile first
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        dequantize_nf4(w)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    # one kernel; the output allocation is not a launch
    assert len(kernels) == 1, [e.name for e in kernels]


@requires_cuda
def test_cuda_compiled_caller_matches_eager():
    torch._dynamo.reset()
    w = quantize_nf4(torch.randn(1024, 4096, dtype=torch.bfloat16, device="cuda"))
    x = torch.randn(8, 4096, dtype=torch.bfloat16, device="cuda")
    explanation = torch._dynamo.explain(_qlora_like)(x, w)
    assert explanation.graph_break_count == 0
    compiled = torch.compile(_qlora_like, fullgraph=True)
    assert torch.equal(compiled(x, w), _qlora_like(x, w))
