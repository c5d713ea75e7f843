"""benchmarks/seventy_b.py (issue 24's run) on CPU processes, benchmarks/capped_cli.py's peaks, and the memory model
(benchmarks/memory_report.step_peak) against the peaks measured on GPUs (results.jsonl) and against its own parts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import memory_report  # noqa: E402
from common import model_config  # noqa: E402

from qlora_fsdp.memory import budget  # noqa: E402
from qlora_fsdp.parallel.sizing import bytes_at_rest  # noqa: E402


def test_the_70b_run_trains_a_bnb4_checkpoint_on_two_gloo_ranks(tmp_path):
    """The whole script at the tiny shape: the bnb-4bit checkpoint written and loaded, the CLI under torchrun on 2
    ranks (one capped_cli worker each, peaks written), the loss falling on the repeated copy task; then the reference
    model the same way, and the target from the two runs' tokens/s and FLOPs."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "seventy_b.py"), "--config", "tiny", "--reference",
                           "tiny", "--device", "cpu", "--steps", "4", "--seq", "96", "--dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "70b: PASS" in out
    for role in ("model", "reference"):
        losses = [float(x) for x in out.split("losses: ")[1 if role == "model" else 2].splitlines()[0].split()]
        assert len(losses) == 4 and losses[-1] < losses[0]
        config = json.loads((tmp_path / role / "bnb4" / "config.json").read_text())
        assert config["quantization_config"]["quant_method"] == "bitsandbytes"
        peaks = [json.loads(p.read_text()) for p in sorted((tmp_path / role / "peaks").glob("peaks-*.json"))]
        assert [p["rank"] for p in peaks] == [0, 1]
        assert all(p["rc"] == 0 and p["gpu_peak_gb"] is None and 0 < p["host_anon_gb"] <= p["host_hwm_gb"] for p in peaks)
        assert (tmp_path / role / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert "x, target" in out and "(the FLOP ratio 1.000)" in out  # the same model twice: the target is its tokens/s


def test_the_model_is_within_10_percent_of_every_measured_checkpointing_peak():
    """The 8B shape on 1 and 2 GPUs, with and without CPU offload (benchmarks/multi_gpu.py rows in results.jsonl)."""
    rows = memory_report.measured_rows()
    assert len({(r["world"], r["cpu_offload"]) for r in rows}) >= 3  # 1 GPU, 2 GPUs, 2 GPUs + offload
    config = model_config("llama-3.1-8b")
    for r in rows:
        predicted = memory_report.step_peak(config, r["world"], r["seq"], cpu_offload=r["cpu_offload"],
                                            offload=r.get("offload") or "all")["total"]  # (older rows: everything)
        assert predicted / 1e9 == pytest.approx(max(r["peak_gb_per_gpu"]), rel=0.10), r


def test_the_model_adds_up_its_parts():
    """At rest is sizing's (with offload: LoRA's share alone, or nothing when everything is offloaded), nothing is
    gathered on one rank, a chunk of the loss is smaller than the whole, and one more rank never raises the peak."""
    config = model_config("llama-3.1-70b")
    one = memory_report.step_peak(config, 1, 2048)
    two = memory_report.step_peak(config, 2, 2048)
    offload = memory_report.step_peak(config, 2, 2048, cpu_offload=True)
    offload_all = memory_report.step_peak(config, 2, 2048, cpu_offload=True, offload="all")
    rest = bytes_at_rest(config, 2)
    chunked = memory_report.step_peak(config, 2, 2048, chunked_loss=True)
    assert one["at_rest"] == bytes_at_rest(config, 1)["total"] and two["at_rest"] == bytes_at_rest(config, 2)["total"]
    assert one["gathered"] == 0 < two["gathered"] and offload_all["at_rest"] == 0
    assert offload["at_rest"] == rest["lora"] + rest["grads"] + rest["optimizer"] < 0.1 * rest["base"]
    # the unchunked loss's logits (12 bytes each, eager) are the transient; chunked, a layer's backward and a chunk
    assert two["transient"] == budget.LOGIT_BYTES["eager", False] * 2048 * config.vocab_size > chunked["transient"]
    for term in ("checkpointed_inputs", "kept_layers", "transient"):
        assert one[term] == two[term] == offload[term]
    assert all(t["total"] == pytest.approx(sum(v for k, v in t.items() if k != "total")) for t in (one, two, offload))
    peaks = [memory_report.step_peak(config, n, 2048)["total"] for n in (2, 3, 4, 8)]
    assert peaks == sorted(peaks, reverse=True)
