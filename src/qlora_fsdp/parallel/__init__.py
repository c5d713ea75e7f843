"""Parallelism applied from outside the model (torchtitan style), by training/setup.py:

    fsdp.py             FSDP2 on every decoder layer and the root, the NF4 base sharded (its bytes, not a copy)
    pipeline.py         pipeline stages and schedules (GPipe, 1F1B, interleaved zero-bubble, ZBV), FSDP2 inside
    schedule_timer.py   per-rank compute and idle time of a schedule (--pp-report)
    sizing.py           bytes per rank at rest, from a model's shapes (no weights loaded)
    cpu_threads.py      the host's cores shared among the ranks of a machine
"""

from .fsdp import apply_fsdp

__all__ = ["apply_fsdp"]
