"""Test session setup.

Without a GPU, Triton kernels run in Triton's CPU interpreter: TRITON_INTERPRET must be set before triton is
first imported (it decides at decoration time), so it is set here, before any qlora_fsdp import.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_compile_counters():
    """Dynamo's counters are process-wide: a test that counts graph breaks sees only its own compilations."""
    from torch._dynamo.utils import counters, guard_failures

    counters.clear()
    guard_failures.clear()


@pytest.fixture(autouse=True)
def _restore_intra_op_threads():
    """torch's intra-op threads are process-wide: a test that runs the CLI in-process as a torchrun rank (WORLD_SIZE
    set) shares the host's cores among the ranks (parallel/cpu_threads.py), which left every later test of the
    suite on one of CI's two cores (a fresh clone's suite: 901 s before this and two cuts of 27-31 s and ~10 s,
    802 s after; the fix's own share was not measured apart)."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
