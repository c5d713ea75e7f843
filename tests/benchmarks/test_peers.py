"""benchmarks/peers.py on CPU: the bnb-4bit checkpoint written once, HF + peft + bitsandbytes and ours trained on it
side by side with agreeing losses, and a system that cannot be imported reported with its error, not a crash."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_peers_run_side_by_side_and_a_missing_one_is_named(tmp_path):
    env = {**os.environ, "QLORA_RESULTS": str(tmp_path / "results.jsonl")}
    env.pop("QLORA_PEERS_SITE_UNSLOTH", None)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "peers.py"), "--config", "tiny", "--systems",
                           "hf_peft_bnb,ours_ac,unsloth", "--shapes", "1x48", "--warmup", "1", "--iters", "1",
                           "--compile-backend", "eager", "--checkpoints", str(tmp_path / "ckpt")],
                          capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    timed = {r["system"]: r for r in rows if "tokens_per_s" in r}
    assert set(timed) == {"hf_peft_bnb", "ours_ac"}
    assert all(r["bench"] == "peers" and r["batch"] == 1 and r["seq"] == 48 for r in timed.values())
    # the same checkpoint, LoRA and batch: the same loss after the same steps (bnb's and our NF4 bytes are equal)
    assert abs(timed["ours_ac"]["loss"] - timed["hf_peft_bnb"]["loss"]) <= 1e-3 * timed["hf_peft_bnb"]["loss"]
    if "unsloth" not in sys.modules and not any((Path(p) / "unsloth").exists() for p in sys.path if p):
        failed = [r for r in rows if r["system"] == "unsloth"]
        assert failed and "import failed" in failed[0]["error"] and "unsloth" in failed[0]["error"]
        assert "unsloth               not run: import failed" in proc.stdout
    config = json.loads((tmp_path / "ckpt" / "bnb4" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitsandbytes"
