"""ScheduleTimer: how long a pipeline rank computes and how long it waits, per schedule step (--pp-report)."""

from __future__ import annotations

import time

import torch


class ScheduleTimer:
    """The bubble a schedule leaves on this rank: per step, the wall time of `schedule.step` and the time this rank
    spent computing (its stages' forward, backward and weight-gradient passes); idle share = 1 - busy / step.

    On CUDA every timed pass is bracketed by synchronisations, so waits for activations or gradients from the
    neighbouring stage count as idle and kernels as busy (this costs the overlap of sends with compute)."""

    METHODS = ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk")

    def __init__(self, stages: list, device: torch.device):
        self.device = torch.device(device)
        self.busy, self.steps = 0.0, []  # steps: (step seconds, busy seconds)
        for st in stages:
            for name in self.METHODS:
                setattr(st, name, self._timed(getattr(st, name)))

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _timed(self, fn):
        def run(*args, **kwargs):
            self._sync()
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._sync()
                self.busy += time.perf_counter() - t

        return run

    def step(self, fn, *args, **kwargs):
        """Run fn (a schedule's step) and record its time and this rank's busy time."""
        self._sync()
        self.busy, t = 0.0, time.perf_counter()
        out = fn(*args, **kwargs)
        self._sync()
        self.steps.append((time.perf_counter() - t, self.busy))
        return out

    def summary(self, skip: int = 1) -> dict:
        """Mean step time (ms) and idle share, without the first `skip` steps (shape inference, warm-up)."""
        steps = self.steps[skip:] or self.steps
        wall, busy = sum(s for s, _ in steps), sum(b for _, b in steps)
        return {"steps": len(steps), "step_ms": 1e3 * wall / max(len(steps), 1),
                "busy_ms": 1e3 * busy / max(len(steps), 1), "idle": 1 - busy / wall if wall else float("nan")}  # fmt: skip
