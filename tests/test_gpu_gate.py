"""benchmarks/gpu_gate.py off the GPU: its path list covers what the gate promises, its checks fail where they should,
and a run of a few paths on CPU processes (gloo: 2 ranks, a zero-bubble pipeline, resume) passes them."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gate_workers  # noqa: E402
import gpu_gate  # noqa: E402


def test_the_paths_cover_every_recipe_schedule_and_reference():
    paths = gpu_gate.gate_paths()
    names = [p["name"] for p in paths]
    assert len(names) == len(set(names))
    assert all(p["ref"] in names for p in paths if p["ref"]), "a reference that is not a path"
    for recipe in ("default", "compile", "chunked-loss", "fastest", "leanest", "mlp-chunks", "ac-keep-layers"):
        assert {f"1gpu/{recipe}/bf16", f"1gpu/{recipe}/fp16"} <= set(names), recipe
    for schedule in ("gpipe", "1f1b", "interleaved_zb", "zbv", "1f1b-compile"):
        assert f"pp2/{schedule}/bf16" in names
    assert {"pp2/1f1b/fp16", "pp2/zbv/fp16"} <= set(names)
    two = {p["name"] for p in paths if p["gpus"] == 2}
    assert {"2gpu/cpu-offload/bf16", "2gpu/compile-chunked-ac/bf16", "2gpu/trainer/bf16", "2gpu/sft/bf16",
            "2gpu/trainer-fused/bf16"} <= two
    assert next(p for p in paths if p["name"] == "1gpu/trainer-fused/bf16")["options"] == {"fuse_lora": True}
    compiled = next(p for p in paths if p["name"] == "1gpu/trainer-compiled/bf16")
    assert compiled["options"] == {"fuse_lora": True, "gradient_checkpointing": True, "compile_model": True}
    assert compiled["ref"] == "1gpu/trainer-fused/bf16" and compiled["steps"] == 1
    assert {p["tol"] for p in paths if p["ref"] and p["name"].endswith("fp32")} == {1e-4}
    four = {p["name"]: p for p in paths if p["gpus"] == 4}  # FSDP2 on 4, and 2 stages x 2 replicas per schedule
    assert set(four) == {"4gpu/default/bf16"} | {f"pp2x2/{s}/bf16" for s in ("gpipe", "1f1b", "interleaved_zb", "zbv")}
    for p in four.values():  # the reference's 4 batches a step: accum x data-parallel replicas
        assert p["ref"] == "1gpu/accum4/bf16" and p["accum"] * 4 // p["options"].get("pp", 1) == 4
    real = {p["name"]: p for p in paths if p["model"] == "real"}  # a pretrained model: trained on 1 and 2, generation
    assert real["2gpu/smollm2-real/fp32"]["ref"] == "1gpu/smollm2-real/fp32"
    assert real["1gpu/smollm2-real-generate/bf16"]["kind"] == "generate"


def test_the_one_gpu_paths_go_to_two_workers_on_one_gpu_too():
    """Two workers share a one-GPU machine's GPU (the gate's compiles are host work), one a GPU on two, a single one
    with --phases on one GPU; every path once, in gate order within a worker, the compiled ones split between them."""
    paths = gpu_gate.gate_paths()
    for i, x in enumerate(paths):
        x["index"] = i
    one = [x for x in paths if x["gpus"] == 1]
    for gpus, phases, expect in ((1, False, [0, 0]), (2, False, [0, 1]), (1, True, [0]), (2, True, [0, 1])):
        shares = gpu_gate.one_gpu_shares(one, gpus, phases)
        assert [g for g, _ in shares] == expect
        names = [x["name"] for _, share in shares for x in share]
        assert sorted(names) == sorted(x["name"] for x in one)
        assert all([x["index"] for x in share] == sorted(x["index"] for x in share) for _, share in shares)
        if len(shares) == 2:
            compiled = [sum(bool(x["options"].get("compile")) for x in share) for _, share in shares]
            assert min(compiled) >= 1 and abs(compiled[0] - compiled[1]) <= 2, compiled
    assert gpu_gate.one_gpu_shares(one[:1], 1) == [(0, one[:1])]


def test_a_start_file_read_while_written_is_not_a_timeout(tmp_path):
    """The poller reads <index>.started while ranks write it: a read that is empty or cut short counts as started now
    (as 0 it made an 8-second path "time out after 240 s" in CI), and every rank writes the file without colliding."""
    started = tmp_path / "3.started"
    for text in ("", "."):  # created and not yet written; unparseable
        started.write_text(text)
        assert time.time() - gate_workers.started_at(started) < 1
    started.write_text("100.5")
    assert gate_workers.started_at(started) == 100.5
    procs = [subprocess.Popen([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import gate_workers, "
                               "pathlib, time\nfor _ in range(300): gate_workers.atomic_write_text(pathlib.Path(sys.argv[2]), "
                               "str(time.time()))", str(ROOT / "benchmarks"), str(started)]) for _ in range(4)]  # fmt: skip
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0, 0]
    assert float(started.read_text()) > 100.5 and not list(tmp_path.glob("*.tmp"))


def test_a_loss_off_its_reference_fails():
    path = {"name": "2gpu/default/bf16", "ref": "1gpu/default/bf16", "tol": 1e-3, "steps": 5}
    ref = {"status": "ok", "losses": [2.0, 1.9, 1.8, 1.7, 1.6, 1.5]}
    close = {"status": "ok", "losses": [2.0, 1.9, 1.8001, 1.7, 1.6, 9.0]}  # the 6th step is not compared
    far = {"status": "ok", "losses": [2.0, 1.9, 1.81, 1.7, 1.6, 1.5]}
    assert gpu_gate.verdict(path, {path["name"]: close, path["ref"]: ref})[0]
    assert not gpu_gate.verdict(path, {path["name"]: far, path["ref"]: ref})[0]
    assert not gpu_gate.verdict(path, {path["name"]: close, path["ref"]: {"status": "error", "error": "x"}})[0]


def cpu_env(tmp_path) -> dict:
    """The gate's environment on CPU: one thread a process. It runs 2 one-GPU workers beside a pair of ranks (4
    processes); with torch's default of a thread a core each, 2 cores are oversubscribed 4 times over and the OpenMP
    threads' spin-waits take most of the time (measured: 227 s instead of 34 s for the run below, the same losses)."""
    return {**os.environ, "QLORA_RESULTS": str(tmp_path / "results.jsonl"), "OMP_NUM_THREADS": "1"}


@pytest.mark.timeout(300)
def test_a_cpu_run_passes_its_checks(tmp_path):
    only = ("^(2gpu/default/bf16|pp2/zbv/bf16|1gpu/resume/bf16|2gpu/smollm2-widths/bf16|2gpu/smollm2-real/fp32|"
            "pp2x2/zbv/bf16)$")
    # (and their references); the embedded model stands in for the pretrained one
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_gate.py"), "--cpu", "--config", "tiny",
                           "--layers", "4", "--seq", "64", "--steps", "3", "--only", only, "--real-model", "embedded"],
                          capture_output=True,
                          text=True, env=cpu_env(tmp_path), timeout=280)  # fmt: skip
    assert proc.returncode == 0 and "gate: 10/10 passed" in proc.stdout, (proc.stdout + proc.stderr)[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert {r["path"] for r in rows if "path" in r} == {"1gpu/default/bf16", "1gpu/accum4/bf16", "1gpu/resume/bf16",
                                                        "2gpu/default/bf16", "pp2/zbv/bf16", "1gpu/smollm2-widths/bf16",
                                                        "2gpu/smollm2-widths/bf16", "1gpu/smollm2-real/fp32",
                                                        "2gpu/smollm2-real/fp32", "pp2x2/zbv/bf16"}  # fmt: skip
    assert all(r["passed"] for r in rows if "path" in r)


@pytest.mark.timeout(120)
def test_paths_past_the_deadline_are_not_run_and_the_summary_is_printed(tmp_path):
    """--deadline (a device call's time limit): the workers are stopped, what has no result is NOT RUN, the summary
    still comes, and the exit status says the gate is not green."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_gate.py"), "--cpu", "--config", "tiny",
                           "--layers", "1", "--seq", "32", "--steps", "2", "--only", "^1gpu/accum4/bf16$",
                           "--deadline", "1"], capture_output=True, text=True, env=cpu_env(tmp_path), timeout=100)  # fmt: skip
    assert proc.returncode == 1, (proc.stdout + proc.stderr)[-3000:]
    assert "NOT RUN 1gpu/accum4/bf16" in proc.stdout and "not finished within --deadline 1 s" in proc.stdout
    assert "gate: 0/0 passed, 1 not run (not finished within --deadline 1 s)" in proc.stdout, proc.stdout[-2000:]


@pytest.mark.timeout(300)
def test_the_t4_emulation_runs_on_cpu(tmp_path):
    """--emulate t4 on CPU processes (gloo), a tiny config: it writes the 16-bit and the bnb-4bit checkpoint of one
    random model, loads each through load_model, and 2 ranks on either equal 1 rank on the bnb-4bit one."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_gate.py"), "--cpu", "--emulate", "t4",
                           "--config", "tiny", "--layers", "2", "--seq", "64", "--steps", "3",
                           "--t4-dir", str(tmp_path / "ckpt")], capture_output=True, text=True,
                          env=cpu_env(tmp_path), timeout=280)  # fmt: skip
    assert proc.returncode == 0 and "gate: 3/3 passed" in proc.stdout, (proc.stdout + proc.stderr)[-3000:]
    config = json.loads((tmp_path / "ckpt" / "bnb4" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitsandbytes"
    assert "GB anonymous" in proc.stdout  # the host peak while loading, page cache of mapped files apart
