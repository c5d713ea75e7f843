"""benchmarks/fsdp_profile.py: its timeline arithmetic against a brute-force clock, its byte counter against the
collective's own sizes (a one-rank gloo group), and the script itself on CPU processes."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import fsdp_profile as fp  # noqa: E402


def _ticks(intervals):
    """The set of integer instants covered: a brute-force reference for intervals on an integer grid."""
    return {t for a, b in intervals for t in range(a, b)}


def test_union_length_and_minus_match_a_brute_force_clock():
    rng = random.Random(0)
    for _ in range(200):
        a = [(s, s + rng.randint(1, 30)) for s in (rng.randint(0, 200) for _ in range(rng.randint(0, 12)))]
        b = [(s, s + rng.randint(1, 30)) for s in (rng.randint(0, 200) for _ in range(rng.randint(0, 12)))]
        assert fp.length(a) == len(_ticks(a))
        assert fp.minus(a, b) == len(_ticks(a) - _ticks(b))
        merged = fp.union(a)
        assert all(x2 < y for (_, x2), (y, _) in zip(merged, merged[1:]))  # disjoint and sorted


def test_timeline_summary_splits_compute_comm_copies_and_idle():
    kernels = [("ampere_bf16_gemm", 0, 40), ("triton_nf4_dequant", 30, 50),  # compute 0-50
               ("ncclDevKernel_AllGather_RING_LL", 45, 70),  # 20 exposed (50-70)
               ("Memcpy HtoD (Pinned -> Device)", 80, 90), ("ncclDevKernel_ReduceScatter", 85, 95)]  # fmt: skip
    s = fp.timeline_summary(kernels, wall_us=200.0, steps=2)
    assert s["compute_ms"] == pytest.approx(50 * 1e-3 / 2)
    assert s["comm_ms"] == pytest.approx(35 * 1e-3 / 2)
    assert s["exposed_comm_ms"] == pytest.approx(30 * 1e-3 / 2)  # 50-70 and 85-95 are not under compute
    assert s["copy_ms"] == pytest.approx(10 * 1e-3 / 2)
    assert s["idle_ms"] == pytest.approx((200 - 85) * 1e-3 / 2)  # busy 0-70 and 80-95
    assert s["kernels_per_step"] == 2.5


def test_collective_bytes_counts_what_the_collective_moves(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with fp.CollectiveBytes() as coll:
            out = torch.empty(100, dtype=torch.uint8)
            dist.all_gather_single(out, torch.ones(100, dtype=torch.uint8))
            dist.reduce_scatter_single(output=torch.empty(7), input=torch.ones(7))
        assert coll.bytes == {"all_gather": 100, "reduce_scatter": 28}
        # restored on exit: a later call is not counted
        dist.all_gather_single(out, torch.ones(100, dtype=torch.uint8))
        assert coll.bytes["all_gather"] == 100
    finally:
        dist.destroy_process_group()


def test_t4_projection_from_stated_rates():
    from qlora_fsdp.parallel.sizing import llama_3_1_8b_config

    from common import lora_step_flops_per_token

    config = llama_3_1_8b_config()
    two = {"world": 2, "allgather_bytes": 8e9, "reduce_scatter_bytes": 0.4e9}
    p = fp.t4_projection({}, two, config, 2048, pcie_gbs=10.0, t4_tflops=25.0)
    c = 1.5 * lora_step_flops_per_token(config, 2048) * 2048 / 25e12  # the forward twice under checkpointing
    assert p["t4_compute_s_per_microbatch"] == pytest.approx(c)
    assert p["received_gb_per_step"] == pytest.approx(4.2)  # half of what a rank's gathers and scatters hold
    assert p["speedup_serial"] == pytest.approx(2 * c / (c + 0.42))
    # 4N alone for the 8B shape: 7.0e9 linear + 0.53e9 lm_head parameters
    f = lora_step_flops_per_token(config, 2048)
    assert f - lora_step_flops_per_token(config, 1024) == 6 * 32 * 1024 * 4096  # causal attention: 6 L T q
    assert 4 * 7.5e9 < f - 6 * 32 * 2048 * 4096 < 4 * 7.6e9 + 1e9  # + LoRA: 6 r (in + out) a linear, 0.25 GFLOP


def test_the_script_runs_on_cpu_processes(tmp_path):
    """The 2-rank variant end to end on gloo (its losses against one process: tests/parallel)."""
    # one thread a rank (the script's ranks keep torch's default, a thread a core: 2 ranks oversubscribe 2 cores)
    env = {**os.environ, "QLORA_RESULTS": str(tmp_path / "results.jsonl"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fsdp_profile.py"), "--cpu", "--config", "tiny",
                           "--seq", "32", "--warmup", "1", "--timed-steps", "1", "--steps", "1", "--variants", "2gpu"],
                          capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["variant"] for r in rows] == ["2gpu"]
    ranks = rows[0]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["losses"] == ranks[1]["losses"]
    assert ranks[0]["allgather_bytes"] > 0 and ranks[0]["reduce_scatter_bytes"] > 0  # FSDP2's collectives, counted
    assert len(ranks[0]["losses"]) == 3  # warmup, timed, profiled
    assert ranks[0]["wall_ms"] > 0 and ranks[0]["profiled_wall_ms"] > 0 and ranks[0]["kernels_per_step"] == 0  # no device
