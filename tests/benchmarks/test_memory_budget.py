"""benchmarks/memory_budget.py: budgets that plan the same setup at a shape share one GPU run, and its peak is
counted once by --check."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import memory_budget  # noqa: E402


def test_budgets_that_plan_the_same_setup_share_one_run():
    config = memory_budget.model_config("llama-3.1-8b")
    roomy = memory_budget.planned(config, 1, 2048, 80.0)
    assert roomy == memory_budget.planned(config, 1, 2048, 67.4)  # both: no checkpointing, weights kept (30 GB)
    assert roomy != memory_budget.planned(config, 1, 2048, 8.0) != memory_budget.planned(config, 4, 2048, 8.0)
    assert memory_budget.planned(config, 1, 2048, 1.0) is None  # nothing fits: the loop's own error is printed


def test_a_reused_run_is_one_peak_for_the_memory_model():
    row = {"bench": "memory_budget", "system": "ours_budget@unsloth", "batch": 1, "seq": 2048, "budget_gb": 7.0,
           "peak_gb": 6.9, "setup": {"activation_checkpointing": True, "chunked_loss": True}}  # fmt: skip
    reused = {**row, "system": "ours_budget@torchtune", "budget_gb": 7.6, "same_run_as": "ours_budget@unsloth"}
    assert [r for *_, r in memory_budget.measured_setups([row, reused])] == [row]
