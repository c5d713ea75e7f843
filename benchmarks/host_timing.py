"""Where a host-bound step's host time goes: every Triton kernel launch made in a block of code, timed layer by
layer, and every garbage collection.

    with triton_launch_timer() as times, gc_timer() as collections:   # layer -> [ns, ...]; generation -> [ns, ...]
        step(batch)
    print_launch_times(times, steps=2); print_gc_times(collections, steps=2)

Three nested layers of one launch, each timed on its own:
    jit_run    JITFunction.run: binding and specializing the arguments, the cache lookup, then the launcher
    launcher   the backend's launcher object (Triton's CudaLauncher.__call__): scratch allocation, hooks
    c_launch   the launcher's C function: argument extraction and cuLaunchKernel (blocks while the launch queue
               is full, so a bimodal spread here means the GPU was behind, not the host slow)
A uniform cost across launches points at per-call overhead; a few long ones at blocking or garbage collection.
"""

from __future__ import annotations

import gc
import time
from contextlib import contextmanager


def _timed(fn, sink: list):
    def timed(*args, **kwargs):
        start = time.perf_counter_ns()
        try:
            return fn(*args, **kwargs)
        finally:
            sink.append(time.perf_counter_ns() - start)

    timed.__wrapped__ = fn
    return timed


@contextmanager
def triton_launch_timer(launcher_cls=None, jit_cls=None):
    """Patch `jit_cls.run` (default triton's JITFunction), `launcher_cls.__call__` (default Triton's CudaLauncher)
    and each launcher instance's `launch` for the block; yields {"jit_run", "launcher", "c_launch"} -> ns lists.
    Everything is restored on exit."""
    if launcher_cls is None:
        from triton.backends.nvidia.driver import CudaLauncher as launcher_cls
    if jit_cls is None:
        from triton.runtime.jit import JITFunction as jit_cls
    times = {"jit_run": [], "launcher": [], "c_launch": []}
    original_call, original_run = launcher_cls.__call__, jit_cls.run
    patched_instances = []

    def timed_call(self, *args, **kwargs):
        launch = self.__dict__.get("launch")
        if launch is not None and not hasattr(launch, "__wrapped__"):
            self.launch = _timed(launch, times["c_launch"])
            patched_instances.append(self)
        start = time.perf_counter_ns()
        try:
            return original_call(self, *args, **kwargs)
        finally:
            times["launcher"].append(time.perf_counter_ns() - start)

    launcher_cls.__call__ = timed_call
    jit_cls.run = _timed(original_run, times["jit_run"])
    try:
        yield times
    finally:
        launcher_cls.__call__, jit_cls.run = original_call, original_run
        for launcher in patched_instances:
            launcher.launch = launcher.launch.__wrapped__


def launch_stats(ns: list[int], steps: int) -> dict:
    """count a step, mean / p50 / p90 / p99 / max in us, and ms a step."""
    if not ns:
        return {"count": 0}
    s = sorted(ns)

    def pct(q):
        return s[min(len(s) - 1, int(q * len(s)))] / 1e3

    return {"count": len(s) // steps, "mean_us": sum(s) / len(s) / 1e3, "p50_us": pct(0.5), "p90_us": pct(0.9),
            "p99_us": pct(0.99), "max_us": s[-1] / 1e3, "ms_per_step": sum(s) / steps / 1e6}  # fmt: skip


def print_launch_times(times: dict, steps: int, title: str = "Triton launches") -> None:
    print(f"\n{title}: host time a launch by layer (jit_run contains launcher contains c_launch)")
    print(f"{'layer':<12}{'a step':>8}{'mean us':>9}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>9}{'ms/step':>9}")
    for layer, ns in times.items():
        st = launch_stats(ns, steps)
        if not st["count"]:
            print(f"{layer:<12}{0:>8}")
            continue
        print(f"{layer:<12}{st['count']:>8}{st['mean_us']:>9.1f}{st['p50_us']:>8.1f}{st['p90_us']:>8.1f}"
              f"{st['p99_us']:>8.1f}{st['max_us']:>9.1f}{st['ms_per_step']:>9.2f}")  # fmt: skip


def back_to_back_dequant_times(calls: int = 500, shape: tuple[int, int] = (4096, 4096)) -> dict:
    """The NF4 dequantizer launched `calls` times back to back in this process, under the timer: the per-launch
    host cost without the step around it (compare with the step's, same process, same garbage collector state)."""
    import torch

    from qlora_fsdp.nf4 import dequantize_nf4, quantize_nf4

    w = quantize_nf4(torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * 0.02)
    for _ in range(20):
        dequantize_nf4(w, torch.bfloat16)
    torch.cuda.synchronize()
    with triton_launch_timer() as times:
        for _ in range(calls):
            dequantize_nf4(w, torch.bfloat16)
        torch.cuda.synchronize()
    return times


@contextmanager
def gc_timer():
    """Times every garbage collection in the block through gc.callbacks; yields generation -> [ns, ...]."""
    times, started = {0: [], 1: [], 2: []}, {}

    def callback(phase, info):
        if phase == "start":
            started["t"] = time.perf_counter_ns()
        elif "t" in started:
            times[info["generation"]].append(time.perf_counter_ns() - started.pop("t"))

    gc.callbacks.append(callback)
    try:
        yield times
    finally:
        gc.callbacks.remove(callback)


def print_gc_times(times: dict, steps: int) -> None:
    print("garbage collections a step: " + ", ".join(
        f"generation {g}: {len(ns) / steps:.1f} ({sum(ns) / steps / 1e6:.2f} ms)" for g, ns in times.items()))
