"""Known harmless third-party messages, silenced where they are made, so that a normal run prints only its own.

- bitsandbytes (imported by peft whenever it is installed) logs on CPU machines with AVX512-BF16 that it could not
  fetch an optional kernel from the Hub ("Failed to load CPU gemm_4bit_forward from kernels-community"): we never
  call that kernel.
- transformers 5.x warns that `is_gradient_checkpointing` is deprecated when peft reads it.
Only these exact messages are dropped; everything else still shows.
"""

from __future__ import annotations

import logging
import warnings

BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_CPU_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"
DEPRECATIONS = ("`is_gradient_checkpointing` is deprecated",)


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_known_messages() -> None:
    """Install the filters (idempotent): a logging filter on bitsandbytes' CPU backend, warnings filters."""
    logger = logging.getLogger(BNB_CPU_LOGGER)
    if not any(isinstance(f, _DropMessage) for f in logger.filters):
        logger.addFilter(_DropMessage(BNB_CPU_MESSAGE))
    for message in DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
