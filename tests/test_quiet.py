"""A normal run prints only its own lines: no third-party warnings (quiet.py), checked in fresh processes as a user
runs them (pytest would capture warnings in-process)."""

import subprocess
import sys


def run(*args):
    proc = subprocess.run([sys.executable, "-m", "qlora_fsdp", *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stderr


def test_train_generate_and_export_print_no_third_party_warnings(tmp_path):
    out = tmp_path / "run"
    logs = [run("train", "--max-steps", "2", "--device", "cpu", "--output-dir", str(out), "--no-group-by-length"),
            run("generate", "--adapter", str(out / "adapter"), "--prompt", "Reverse: abc", "--device", "cpu"),
            run("export", "--adapter", str(out / "adapter"), "--out", str(tmp_path / "merged"), "--merge", "--device",
                "cpu")]  # fmt: skip
    for log in logs:
        noise = [line for line in log.splitlines() if any(w in line for w in ("Warning", "Failed to load", "deprecated"))]
        assert not noise, noise
