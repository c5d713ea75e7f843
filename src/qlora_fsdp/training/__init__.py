"""Training: the config, the one place that applies it to a model (setup.py), and the loops that run it.

    loop = make_loop(TrainConfig(...))   # TrainLoop (one process or FSDP2), or PipelineTrainLoop for cfg.pp > 1
    records = loop.train()               # per-step metrics; adapter, metrics.jsonl and loss.png in output_dir
"""

from __future__ import annotations

from .config import COMPILE_MODES, PRECISIONS, TrainConfig, TrainError
from .loop import TrainLoop
from .pipeline_loop import PipelineTrainLoop
from .rng import seed_everything
from .setup import Prepared, add_lora, prepare


def make_loop(cfg: TrainConfig, *args, **kwargs) -> TrainLoop:
    """The loop for cfg: the pipeline loop for cfg.pp > 1, else the single-process / FSDP2 one; the arguments after
    cfg are TrainLoop's (model, tokenizer, train_batches, eval_batches)."""
    loop_class = PipelineTrainLoop if cfg.pp > 1 else TrainLoop
    return loop_class(cfg, *args, **kwargs)


__all__ = ["COMPILE_MODES", "PRECISIONS", "Prepared", "PipelineTrainLoop", "TrainConfig", "TrainError", "TrainLoop",
           "add_lora", "make_loop", "prepare", "seed_everything"]  # fmt: skip
