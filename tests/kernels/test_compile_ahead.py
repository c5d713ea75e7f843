"""Every Triton kernel of the package compiled ahead of time for the GPUs it supports, sm75 (T4) and sm90 (H100), with
the dtypes, tiles, constexprs and warps its launch code passes (`triton.compile` with a `GPUTarget`: no GPU needed),
and its shared memory per block against the GPU's limit and against rank_product's table of the fused LoRA kernels
(`fused_shared_bytes`, which decides the largest rank a GPU accepts: `max_fused_rank`, `check_fused_rank`).

Under pytest the kernels are Triton's interpreter functions (conftest.py sets TRITON_INTERPRET=1 before triton is
imported), which triton.compile cannot lower; so the compiles run in two worker processes with TRITON_INTERPRET=0
(this file run as a script), fed one compile at a time, largest first, by a module-scoped fixture. The worker records
what each module's `_launch` passes to a stand-in kernel (meta tensors: nothing runs) and compiles exactly that.

LoRA ranks: 8, 16, 64, 128 and the largest each GPU accepts (rank_product.max_fused_rank), those it accepts, in
the 16-bit dtype it trains in (fp16 on a T4, which has no bf16 arithmetic; bf16 on an H100), and the other 16-bit
dtype at rank 16 alone: the two take the same bytes (measured equal at ranks 16 to 256 on both targets), and their
largest ranks would add 30 s of compiling. fp32 at rank 16, and on sm75 at its largest (32) too: on sm90 its largest
(128) would add 20 s; its 163,840 bytes were measured by hand, and its 1,280 bytes a padded rank are measured here.
bf16 on sm75 must compile too, as it does with Triton 3.9 (tl.dot runs on the FMA units below sm80, bf16 upcast to
fp32): a run that asks for bf16 on a T4 sends it there. Ranks 8 and 16 pad to one tile (RP 16): one compile. With a
cold Triton cache (~/.triton/cache or TRITON_CACHE_DIR) the file takes about 93 s of CPU time, about 50 s on 2 cores;
15 s warm.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from qlora_fsdp.kernels import rank_product
from qlora_fsdp.kernels.rank_product import SHARED_PER_BLOCK, fused_shared_bytes, max_fused_rank

TARGETS = {"sm75": (7, 5), "sm90": (9, 0)}  # the GPUs the package supports: (major, minor)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
LORA_KERNELS = ("lora_add", "lora_swiglu_forward", "lora_swiglu_backward", "lora_swiglu_backward_down_a")
SWEPT = {("sm75", "fp16"), ("sm90", "bf16")}  # (target, 16-bit dtype) compiled at every rank (see the docstring)
# the NF4 dequantization's launches: (blocksize, double quant, full programs): the QLoRA default with and without a
# partial last program, the smallest blocksize (64 quant blocks a program) and the largest (1)
NF4_VARIANTS = ((64, True, False), (64, True, True), (32, False, True), (4096, False, False))


def lora_ranks(target: str, dtype: str) -> list[int]:
    """The LoRA ranks compiled for (target, dtype) (see the module docstring), all of them accepted there."""
    top = max_fused_rank(DTYPES[dtype], TARGETS[target])
    if (target, dtype) in SWEPT:
        ranks = (8, 16, 64, 128, top)
    else:
        ranks = (16, top) if (target, dtype) == ("sm75", "fp32") else (16,)
    return sorted({r for r in ranks if r <= top})


def _cases() -> list[dict]:
    cases = []
    for target in TARGETS:
        cases.append(dict(kernel="rcp_approx", target=target, dtype="fp32"))
        for dtype in DTYPES:
            cases.append(dict(kernel="cross_entropy_rows", target=target, dtype=dtype))
            for blocksize, double_quant, full in NF4_VARIANTS:
                cases.append(dict(kernel="nf4_dequant", target=target, dtype=dtype, blocksize=blocksize,
                                  double_quant=double_quant, full=full))  # fmt: skip
            for kernel in LORA_KERNELS:
                for r in lora_ranks(target, dtype):
                    cases.append(dict(kernel=kernel, target=target, dtype=dtype, rank=r))
    return cases


def _case_id(case: dict) -> str:
    extra = [f"r{case['rank']}"] if "rank" in case else []
    if "blocksize" in case:
        extra = [f"bs{case['blocksize']}", "dq" if case["double_quant"] else "plain"]
        extra.append("full" if case["full"] else "tail")
    return "-".join([case["kernel"], case["target"], case["dtype"], *extra])


def _compile_key(case: dict) -> str:
    """Cases that compile the same kernel (ranks 8 and 16: RP 16) share one compile."""
    case = dict(case)
    if "rank" in case:
        case["rank"] = rank_product.padded_rank(case.pop("rank"))
    return json.dumps(case, sort_keys=True)


CASES = _cases()


# ---- the worker: runs with TRITON_INTERPRET=0, so the kernels are JITFunctions ----


class _StandIn:
    """Takes a kernel's place in a `_launch`: kernel[grid](*args, **kwargs) records the call instead of launching."""

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.args, self.kwargs = args, kwargs

        return record


def _launch_call(case: dict):
    """(JITFunction, args, kwargs) that the package's launch code passes for `case`, on meta tensors."""
    from qlora_fsdp.kernels import cross_entropy_rows as ce
    from qlora_fsdp.kernels import lora_add, lora_swiglu
    from qlora_fsdp.nf4 import fast_math, triton_dequant

    dtype, kernel = DTYPES[case["dtype"]], case["kernel"]
    empty = lambda *shape, dt=dtype: torch.empty(*shape, dtype=dt, device="meta")  # noqa: E731
    stand_in = _StandIn()
    if kernel == "lora_add":
        t, n, r = 512, 4096, case["rank"]
        lora_add._launch(stand_in, empty(t, n), empty(t, r), empty(n, r))
        return lora_add._lora_add_kernel, stand_in.args, stand_in.kwargs
    if kernel.startswith("lora_swiglu"):
        t, i, r = 512, 14336, case["rank"]
        args = [empty(t, i), empty(t, i), empty(t, r), empty(t, r), empty(i, r), empty(i, r)]
        if kernel != "lora_swiglu_forward":
            args.append(empty(t, i))  # d act
        if kernel == "lora_swiglu_backward_down_a":
            args += [empty(t, r), empty(i, r)]  # d h, a_down^T: the down projection at the same rank
        lora_swiglu._launch(stand_in, *args)
        return lora_swiglu._lora_swiglu_kernel, stand_in.args, stand_in.kwargs
    if kernel == "nf4_dequant":
        blocksize, nested = case["blocksize"], 256
        n = 4096 * 4096 + (0 if case["full"] else 32)  # a partial last program (and quant block) unless full
        n_blocks = -(-n // blocksize)
        f32, u8 = torch.float32, torch.uint8
        absmax = empty(n_blocks, dt=u8 if case["double_quant"] else f32)
        extra = [empty(-(-n_blocks // nested), dt=f32), empty(256, dt=f32), empty((), dt=f32)]
        nested_args = extra if case["double_quant"] else [None] * 3
        triton_dequant._launch(stand_in, empty(-(-n // 2), dt=u8), absmax, empty(16, dt=f32), *nested_args, empty(n),
                               blocksize, nested)  # fmt: skip
        assert stand_in.kwargs["FULL"] == case["full"], "the launch's FULL is not the case's"
        return triton_dequant._nf4_dequant_kernel, stand_in.args, stand_in.kwargs
    if kernel == "cross_entropy_rows":  # cross_entropy_rows_ launches it directly, for CUDA logits only
        rows, vocab = 8, 128256
        args = (empty(rows, vocab), empty(rows, dt=torch.int64), empty(rows, dt=torch.float32), vocab, vocab)
        return ce._cross_entropy_rows_kernel, args, dict(IGNORE=ce.IGNORE_INDEX, BLOCK=ce.BLOCK, num_warps=8)
    if kernel == "rcp_approx":  # approx_reciprocal's launch (default warps)
        x = empty(4096, dt=torch.float32)
        return fast_math._rcp_approx_kernel, (x, torch.empty_like(x), x.numel()), dict(BLOCK=fast_math.BLOCK)
    raise ValueError(kernel)


_TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.uint8: "u8",
                 torch.int64: "i64", torch.int32: "i32"}  # fmt: skip


def _compile(case: dict) -> dict:
    """{"shared": bytes} of `case` compiled for its target, or {"error": one line}."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    try:
        fn, args, kwargs = _launch_call(case)
        kwargs = dict(kwargs)
        options = {"num_warps": kwargs.pop("num_warps", 4)}
        values = dict(zip(fn.arg_names, args)) | kwargs
        signature, constexprs, attrs = {}, {}, {}
        for param in fn.params:  # what JITFunction.run would specialize: pointers 16-byte aligned, 32-bit ints
            value = values[param.name]
            if param.is_constexpr:
                signature[param.name], constexprs[param.name] = "constexpr", value
            elif isinstance(value, torch.Tensor):
                signature[param.name] = "*" + _TRITON_TYPES[value.dtype]
                attrs[(param.num,)] = [["tt.divisibility", 16]]
            else:
                signature[param.name] = "i32" if abs(value) < 2**31 else "i64"
        major, minor = TARGETS[case["target"]]
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                                  target=GPUTarget("cuda", 10 * major + minor, 32), options=options)  # fmt: skip
        return {"shared": compiled.metadata.shared}
    except Exception as e:  # noqa: BLE001 - reported by the test of this case
        return {"error": f"{type(e).__name__}: " + " | ".join(str(e).strip().splitlines()[-3:])}


def _serve() -> None:
    """Worker loop: one JSON case a line in, one JSON result a line out."""
    for line in sys.stdin:
        print(json.dumps(_compile(json.loads(line))), flush=True)


# ---- the tests ----


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    """Compile key -> {"shared": bytes} or {"error": ...}: every distinct compile of CASES, on two workers."""
    todo = {_compile_key(c): c for c in CASES}
    order = sorted(todo, key=lambda k: -todo[k].get("rank", 0) * (3 if "sm75" in k or "fp32" in k else 1))
    results, lock = {}, threading.Lock()
    env = dict(os.environ, TRITON_INTERPRET="0")
    logs = tmp_path_factory.mktemp("compile_ahead")

    def drive(worker: int):
        with open(logs / f"worker{worker}.log", "w") as log:
            proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=log, text=True, env=env, cwd=Path(__file__).parents[2])  # fmt: skip
            while True:
                with lock:
                    if not order:
                        break
                    key = order.pop(0)
                proc.stdin.write(key + "\n")
                proc.stdin.flush()
                line = proc.stdout.readline()
                if not line:  # the worker died: this case and the rest of its queue fail with its log
                    results[key] = {"error": f"worker exited: see {logs / f'worker{worker}.log'}"}
                    break
                results[key] = json.loads(line)
            proc.stdin.close()
            proc.wait()

    threads = [threading.Thread(target=drive, args=(w,)) for w in range(min(2, os.cpu_count() or 1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def _result(compiled: dict, case: dict) -> dict:
    result = compiled.get(_compile_key(case), {"error": "not compiled (a worker died first)"})
    assert "error" not in result, f"{_case_id(case)} does not compile for {case['target']}: {result['error']}"
    return result


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_compiles_and_fits_the_gpu(compiled, case):
    """The kernel compiles for the target, in a block's shared memory there (for the LoRA kernels: at a rank the
    launch check accepts, and within rank_product's table, which sets the largest rank)."""
    shared = _result(compiled, case)["shared"]
    capability = TARGETS[case["target"]]
    limit = SHARED_PER_BLOCK[capability]
    assert shared <= limit, f"{_case_id(case)}: {shared:,} bytes of shared memory, {case['target']} has {limit:,}"
    if "rank" in case:
        dtype = DTYPES[case["dtype"]]
        rank_product.check_fused_rank_for(case["rank"], dtype, capability)  # accepted
        assert shared <= fused_shared_bytes(case["rank"], dtype, capability), (
            f"{_case_id(case)}: {shared:,} bytes, more than rank_product.fused_shared_bytes: update its table")


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_the_first_rank_above_the_largest_is_refused_in_one_line(target, dtype):
    capability, top = TARGETS[target], max_fused_rank(DTYPES[dtype], TARGETS[target])
    rank_product.check_fused_rank_for(top, DTYPES[dtype], capability)
    with pytest.raises(ValueError, match=f"use --lora-r {top} or less") as err:
        rank_product.check_fused_rank_for(top + 1, DTYPES[dtype], capability)
    assert "\n" not in str(err.value) and f"this GPU ({target}) has {SHARED_PER_BLOCK[capability]:,}" in str(err.value)


def test_max_fused_rank_per_gpu():
    """The issue's case (rank > 128 in fp16 exceeds a T4's 64 KB) and the other compute capabilities: 16-bit, fp32."""
    want = {(7, 5): (128, 32), (8, 0): (256, 128), (8, 6): (128, 64), (8, 9): (128, 64), (9, 0): (256, 128),
            (10, 0): (256, 128), (12, 0): (128, 64)}  # fmt: skip
    for capability, (half, single) in want.items():
        got = [max_fused_rank(d, capability) for d in (torch.float16, torch.bfloat16, torch.float32)]
        assert got == [half, half, single], capability
    msg = "LoRA rank 256 in float16 needs 131,072 bytes of shared memory per block in the fused LoRA kernels; "
    with pytest.raises(ValueError, match=msg + "this GPU \\(sm75\\) has 65,536: use --lora-r 128 or less"):
        rank_product.check_fused_rank_for(256, torch.float16, (7, 5))


@pytest.mark.parametrize("r", [1, 8, 16, 17, 64, 100, 128, 129, 256])
def test_padded_rank_is_the_launch_tile(r):
    assert rank_product.padded_rank(r) == rank_product.dot_options(r, torch.float16)["RP"]


def test_cpu_and_meta_tensors_check_nothing():
    for device in ("cpu", "meta"):
        rank_product.check_fused_rank(4096, torch.float16, device)
        assert rank_product.fused_rank_fits(4096, torch.float16, device)


@pytest.fixture
def t4(monkeypatch):
    """Every CUDA capability read answers a T4's, for any device (no GPU here)."""
    monkeypatch.setattr(rank_product, "cuda_capability", lambda device: (7, 5))


def _lora_launches(dtype: torch.dtype, r: int) -> dict:
    """Each fused LoRA launch at rank r, on CPU tensors (T 4, N 32), as a function of the kernel it is given: lora_add,
    the SwiGLU forward and backward at rank r, and the backward with gate and up at 16, the down projection at r."""
    from qlora_fsdp.kernels import lora_add, lora_swiglu

    t, n = 4, 32
    e = lambda *shape: torch.empty(*shape, dtype=dtype)  # noqa: E731
    gate_up = lambda rank: [e(t, n), e(t, n), e(t, rank), e(t, rank), e(n, rank), e(n, rank)]  # noqa: E731
    return {
        "lora_add": lambda kernel: lora_add._launch(kernel, e(t, n), e(t, r), e(n, r)),
        "swiglu_forward": lambda kernel: lora_swiglu._launch(kernel, *gate_up(r)),
        "swiglu_backward": lambda kernel: lora_swiglu._launch(kernel, *gate_up(r), e(t, n)),
        "swiglu_backward_down_a": lambda kernel: lora_swiglu._launch(kernel, *gate_up(16), e(t, n), e(t, r), e(n, r)),
    }


@pytest.mark.parametrize("launch", ["lora_add", "swiglu_forward", "swiglu_backward", "swiglu_backward_down_a"])
@pytest.mark.parametrize("dtype, top", [(torch.float16, 128), (torch.float32, 32)])
def test_launches_refuse_a_rank_the_gpu_cannot_run(t4, launch, dtype, top):
    """The fused LoRA launches check the rank (the down projection's too) before launching: on a T4 the largest
    that fits launches, one more is a one-line ValueError and launches nothing."""
    assert rank_product.fused_rank_fits(top, dtype, "cuda") and not rank_product.fused_rank_fits(top + 1, dtype, "cuda")
    stand_in = _StandIn()
    _lora_launches(dtype, top)[launch](stand_in)
    assert top in (stand_in.kwargs["RP"], stand_in.kwargs.get("RPD"))
    stand_in = _StandIn()
    with pytest.raises(ValueError, match=f"^LoRA rank {top + 1} in .*: use --lora-r {top} or less$"):
        _lora_launches(dtype, top + 1)[launch](stand_in)
    assert not hasattr(stand_in, "args")


if __name__ == "__main__":
    _serve()
