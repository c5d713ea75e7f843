"""benchmarks/host_timing.py: each Triton launch timed at three nested layers, everything restored afterwards, and
garbage collections timed by generation. On CPU the launcher is a stand-in with Triton's structure (JITFunction.run
calls the launcher object, whose __call__ calls its instance's `launch`); that the installed Triton still has that
structure is checked on its source."""

from __future__ import annotations

import gc
import inspect
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from host_timing import gc_timer, launch_stats, triton_launch_timer  # noqa: E402


class Launcher:
    def __init__(self):
        self.launch = self._c_launch

    def _c_launch(self, *args):
        time.sleep(0.002)
        return sum(args)

    def __call__(self, *args):
        time.sleep(0.001)  # the wrapper's own time: scratch allocation and hooks in Triton's
        return self.launch(*args)


class Jit:
    def __init__(self):
        self.launcher = Launcher()

    def run(self, *args):
        time.sleep(0.001)  # binding and the cache lookup in Triton's
        return self.launcher(*args)


def test_each_launch_is_timed_at_three_nested_layers_and_restored():
    jit = Jit()
    original_call, original_run = Launcher.__call__, Jit.run
    with triton_launch_timer(Launcher, Jit) as times:
        assert [jit.run(1, 2) for _ in range(3)] == [3, 3, 3]
    assert {k: len(v) for k, v in times.items()} == {"jit_run": 3, "launcher": 3, "c_launch": 3}
    for run, call, c in zip(times["jit_run"], times["launcher"], times["c_launch"]):
        assert run >= call + 1_000_000 and call >= c + 1_000_000 and c >= 2_000_000  # nested, each its own sleep
    assert Launcher.__call__ is original_call and Jit.run is original_run
    assert jit.launcher.launch == jit.launcher._c_launch  # the instance's launch unwrapped
    jit.run(1, 2)
    assert len(times["jit_run"]) == 3  # nothing recorded after the block
    stats = launch_stats(times["c_launch"], steps=3)
    assert stats["count"] == 1 and stats["p50_us"] >= 2000 and stats["max_us"] >= stats["p50_us"]


def test_the_installed_triton_launches_the_way_the_timer_expects():
    from triton.backends.nvidia.driver import CudaLauncher
    from triton.runtime.jit import JITFunction

    assert "self.launch(" in inspect.getsource(CudaLauncher.__call__)
    assert callable(JITFunction.run)


def test_collections_are_timed_by_generation():
    with gc_timer() as times:
        gc.collect(0)
        gc.collect(2)
        gc.collect(2)
    assert len(times[0]) >= 1 and len(times[2]) == 2 and all(ns > 0 for ns in times[2])
    n = len(times[2])
    gc.collect(2)
    assert len(times[2]) == n
