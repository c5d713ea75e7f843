"""The import paths from before the move into training/ (`qlora_fsdp.train.TrainConfig`, `TrainLoop`, ...), kept
for code that holds them. New code imports from qlora_fsdp.training."""

from __future__ import annotations

from .training import COMPILE_MODES, PRECISIONS, TrainConfig, TrainError, add_lora, make_loop
from .training import TrainLoop as _TrainLoop
from .training.loop import memory_gb
from .training.rng import rng_state, seed_everything, set_rng_state


class TrainLoop(_TrainLoop):
    """TrainLoop(cfg, ...) as before the move: with cfg.pp > 1 it returns the pipeline loop (training.make_loop)."""

    def __new__(cls, cfg: TrainConfig, *args, **kwargs):
        if cfg.pp > 1:
            return make_loop(cfg, *args, **kwargs)  # not a TrainLoop of this class: Python skips __init__
        return super().__new__(cls)


__all__ = ["COMPILE_MODES", "PRECISIONS", "TrainConfig", "TrainError", "TrainLoop", "add_lora", "memory_gb",
           "rng_state", "seed_everything", "set_rng_state"]  # fmt: skip
