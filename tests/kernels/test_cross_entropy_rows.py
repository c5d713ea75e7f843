"""cross_entropy_rows.py: the Triton kernel (the interpreter on CPU) against fp64 PyTorch cross-entropy and its
autograd gradient, on odd shapes, ignored rows and every float dtype."""

import pytest
import torch

from qlora_fsdp.kernels.cross_entropy_rows import IGNORE_INDEX, cross_entropy_rows_, cross_entropy_rows_reference_
from qlora_fsdp.nf4.triton_dequant import triton_interpreting

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # -inf - -inf, masked
needs_kernel = pytest.mark.skipif(DEVICE == "cpu" and not triton_interpreting(), reason="no Triton interpreter")


def fp64_reference(logits, targets):
    z = logits.double().requires_grad_()
    loss = torch.nn.functional.cross_entropy(z, targets, ignore_index=IGNORE_INDEX, reduction="none")
    loss.sum().backward()
    return loss, z.grad


@needs_kernel
@pytest.mark.parametrize("n, vocab", [(1, 7), (3, 4096), (5, 4097), (2, 9000)])  # one block, a partial last one
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_matches_fp64_cross_entropy(n, vocab, dtype):
    logits = (torch.randn(n, vocab, device=DEVICE) * 4).to(dtype)
    targets = torch.randint(0, vocab, (n,), device=DEVICE)
    if n > 1:
        targets[1] = IGNORE_INDEX
    want_loss, want_grad = fp64_reference(logits, targets)
    work = logits.clone()
    loss = cross_entropy_rows_(work, targets)
    assert loss.dtype == torch.float32 and work.dtype == dtype
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-5)
    tol = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]  # one rounding of the output
    torch.testing.assert_close(work.double(), want_grad, rtol=tol, atol=tol)
    if n > 1:
        assert loss[1] == 0 and not work[1].any()  # the ignored row: no loss, no gradient


@needs_kernel
def test_kernel_equals_the_pytorch_path_to_rounding():
    """Kernel vs the PyTorch fallback it replaces (fp32 copy, logsumexp, exp): the bf16 gradient differs in at most
    the last bit (on the GPU, only where an fp32 value sits at a rounding boundary; Triton's interpreter truncates
    fp32 -> bf16 casts instead of rounding them)."""
    logits = (torch.randn(6, 5000, device=DEVICE) * 3).bfloat16()
    targets = torch.tensor([0, 4999, IGNORE_INDEX, 17, 2500, 1], device=DEVICE)
    a, b = logits.clone(), logits.clone()
    loss_kernel, loss_torch = cross_entropy_rows_(a, targets), cross_entropy_rows_reference_(b, targets)
    torch.testing.assert_close(loss_kernel, loss_torch, rtol=2e-6, atol=2e-6)
    ulps = (a.view(torch.int16).int() - b.view(torch.int16).int()).abs()
    assert ulps.max() <= 1
    if DEVICE == "cuda":
        assert (ulps > 0).float().mean() < 0.01


def test_bad_shapes_are_one_line_errors():
    with pytest.raises(ValueError, match="logits \\(n, V\\)"):
        cross_entropy_rows_(torch.zeros(2, 3, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="targets"):
        cross_entropy_rows_(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))
