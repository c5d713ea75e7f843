"""Parallelism applied from outside the model (torchtitan style): FSDP2 today."""

from .fsdp import apply_fsdp

__all__ = ["apply_fsdp"]
