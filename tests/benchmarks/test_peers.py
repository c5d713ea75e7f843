"""benchmarks/peers.py on CPU: the bnb-4bit checkpoint written once, HF + peft + bitsandbytes and ours trained on it
side by side with agreeing losses, and a system that cannot be imported reported with its error, not a crash."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_peers(tmp_path, systems: str, env: dict, *extra: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """peers.py on the tiny model, 1 x 48 tokens, eager: the process and the rows it wrote."""
    env = {**env, "QLORA_RESULTS": str(tmp_path / "results.jsonl")}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "peers.py"), "--config", "tiny", "--systems",
                           systems, "--shapes", "1x48", "--warmup", "1", "--iters", "1", "--compile-backend", "eager",
                           "--checkpoints", str(tmp_path / "ckpt"), *extra], capture_output=True, text=True,
                          timeout=300, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]


def test_peers_run_side_by_side_and_a_missing_one_is_named(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "QLORA_PEERS_SITE_UNSLOTH"}
    proc, rows = run_peers(tmp_path, "hf_peft_bnb,ours_ac,ours_fsdp2,ours_in_hf,ours_in_hf_compiled,unsloth", env,
                           "--longest", "--longest-start", "64", "--longest-cap", "128")  # fmt: skip
    timed = {r["system"]: r for r in rows if "tokens_per_s" in r}
    assert set(timed) == {"hf_peft_bnb", "ours_ac", "ours_fsdp2", "ours_in_hf", "ours_in_hf_compiled"}
    # --longest probes past the timed shapes (64, then 128: everything fits on the host), one process systems only
    longest = {r["system"]: r["longest_seq_batch1"] for r in rows if "longest_seq_batch1" in r}
    assert longest == {"hf_peft_bnb": 128, "ours_ac": 128, "ours_in_hf": 128, "ours_in_hf_compiled": 128}
    # they reached the cap: the search finished, the value is not a lower bound cut by --longest-budget-s
    assert all(r["longest_search_finished"] for r in rows if "longest_seq_batch1" in r)
    # the Trainer users' recipe: HF's math on our NF4 layers, the same bytes as bnb's: HF's losses (2.2e-5 and
    # 6.5e-5 apart when written: bf16 matmuls in another order)
    for system in ("ours_in_hf", "ours_in_hf_compiled"):  # + fuse_lora and compile_model (Dynamo, eager backend)
        inhf = timed.pop(system)
        for key in ("first_loss", "loss"):
            assert abs(inhf[key] - timed["hf_peft_bnb"][key]) <= 1e-3 * timed["hf_peft_bnb"][key], (system, key)
    assert "ours_ac               longest batch-1 sequence 128 tokens" in proc.stdout
    # FSDP2 on 2 gloo ranks, each the same batch: one process's losses; tokens/s counts both ranks
    two = timed.pop("ours_fsdp2")
    assert two["gpus"] == 2 and two["tokens_per_s"] == 2 * two["tokens_per_s_per_gpu"]
    for key in ("first_loss", "loss"):
        assert abs(two[key] - timed["ours_ac"][key]) <= 1e-5 * timed["ours_ac"][key], key
    assert all(r["bench"] == "peers" and r["batch"] == 1 and r["seq"] == 48 for r in timed.values())
    # the same checkpoint, LoRA and batch: the same loss after the same steps (bnb's and our NF4 bytes are equal)
    assert abs(timed["ours_ac"]["loss"] - timed["hf_peft_bnb"]["loss"]) <= 1e-3 * timed["hf_peft_bnb"]["loss"]
    # torchtune's copy: the bnb-4bit checkpoint's weights dequantized (torchao requantizes them), the rest as stored
    import torch
    from safetensors import safe_open

    from qlora_fsdp.model import load_model

    model = load_model(tmp_path / "ckpt" / "bnb4", dtype=torch.bfloat16, device="cpu")
    index = json.loads((tmp_path / "ckpt" / "nf4grid16" / "model.safetensors.index.json").read_text())
    for name, file in index["weight_map"].items():
        with safe_open(str(tmp_path / "ckpt" / "nf4grid16" / file), "pt") as f:
            stored, p = f.get_tensor(name), model.get_parameter(name)
        assert torch.equal(stored, p.dequantize() if hasattr(p, "nf4") else p), name
    # and before any update (the first warmup step), where a disagreement is the model's math, not the optimizer's
    first = [timed[s]["first_loss"] for s in ("ours_ac", "hf_peft_bnb")]
    assert abs(first[0] - first[1]) <= 1e-3 * first[1] and first != [timed[s]["loss"] for s in ("ours_ac", "hf_peft_bnb")]
    if "unsloth" not in sys.modules and not any((Path(p) / "unsloth").exists() for p in sys.path if p):
        failed = [r for r in rows if r["system"] == "unsloth"]
        assert failed and "import failed" in failed[0]["error"] and "unsloth" in failed[0]["error"]
        assert "unsloth               not run: import failed" in proc.stdout
    config = json.loads((tmp_path / "ckpt" / "bnb4" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitsandbytes"


def test_a_system_past_its_timeout_is_killed_with_the_processes_it_started():
    """A child that started a worker of its own (as Inductor's compile workers are) holding the same pipes: the
    timeout returns at once and the worker is killed too."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import subprocess as sp
    import time

    import peers

    child = ("import subprocess, sys, time; w = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
             " print(w.pid, flush=True); time.sleep(60)")  # fmt: skip
    start = time.perf_counter()
    with pytest.raises(sp.TimeoutExpired):
        peers.run_killable([sys.executable, "-c", child], dict(os.environ), timeout=3)
    assert time.perf_counter() - start < 20
    assert peers.run_killable([sys.executable, "-c", "print('PEERS_JSON []')"], dict(os.environ), 30)[:2] == (
        0, "PEERS_JSON []\n")


def test_torchtune_with_fsdp2_on_two_ranks_starts_where_one_process_does(tmp_path):
    """torchtune's distributed setup (meta device, layers sharded, the checkpoint loaded into the shards, NF4
    quantized per shard) gives the loss of its one-device setup before any update (where torchtune is installed,
    e.g. from the peers' wheels; QLORA_PEERS_SITE_TORCHTUNE names its folder)."""
    site = os.environ.get("QLORA_PEERS_SITE_TORCHTUNE")
    probe = subprocess.run([sys.executable, "-c", "import torchtune, torchao"], capture_output=True,
                           env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [site, os.environ.get("PYTHONPATH")]))})  # fmt: skip
    if probe.returncode != 0:
        pytest.skip("torchtune is not installed here")
    env = {**os.environ, **({"QLORA_PEERS_SITE_TORCHTUNE_FSDP2": site} if site else {})}
    _, rows = run_peers(tmp_path, "torchtune,torchtune_fsdp2", env, "--longest", "--longest-start", "64",
                        "--longest-cap", "128")  # fmt: skip
    timed = {r["system"]: r for r in rows if "tokens_per_s" in r}
    assert timed["torchtune_fsdp2"]["gpus"] == 2
    # probes past the timed 48 tokens: its RoPE cache built for --longest-cap (built for 48, the probe of 64 failed)
    assert [r["longest_seq_batch1"] for r in rows if "longest_seq_batch1" in r] == [128]
    one, two = timed["torchtune"]["first_loss"], timed["torchtune_fsdp2"]["first_loss"]
    assert abs(one - two) <= 1e-5 * one


def test_the_longest_search_builds_for_its_cap_and_a_cap_applies_to_cuda_only():
    """A system built for the timed shapes alone fails a longer probe on its position tables (torchtune's RoPE
    cache), not on memory: --longest builds it for --longest-cap. The memory cap is a CUDA allocator setting."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import argparse

    import peers
    from common import cap_gpu_memory

    args = argparse.Namespace(shapes="1x2048,1x8192", longest=True, longest_cap=65536)
    assert peers.longest_seq_needed(args) == 65536
    assert peers.longest_seq_needed(argparse.Namespace(**{**vars(args), "longest": False})) == 8192
    assert peers.longest_seq_needed(argparse.Namespace(**{**vars(args), "shapes": ""})) == 65536
    assert cap_gpu_memory(16.0, "cpu") is None and cap_gpu_memory(0.0, "cpu") is None
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "peers.py"), "--shapes", ""],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == (
        "peers.py: nothing to run: give --shapes, --longest or both")


def test_profile_step_profiles_a_peer_with_python_time_and_gc_frozen(tmp_path):
    """profile_step.py --peer: a peers.py system (HF's forward on our NF4 layers) profiled on peers' checkpoints, its
    step timed with the garbage collector frozen too, the Python functions with the most self time listed, and the
    Triton launches and collections timed (--launch-timing)."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_step.py"), "--peer", "ours_in_hf",
                           "--config", "tiny", "--shapes", "1x32", "--steps", "1", "--python-profile", "12",
                           "--launch-timing", "--checkpoints", str(tmp_path / "ckpt")], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    head = next(line for line in proc.stdout.splitlines() if line.startswith("ours_in_hf, 1x32: step"))
    assert "with gc frozen" in head
    table = proc.stdout.split("python function (self time, cProfile)")[1].splitlines()[1:13]
    assert len(table) == 12 and all(float(row.split()[-1]) >= 0 for row in table)
    # every decoder linear dequantizes its NF4 weight (on CPU through the PyTorch reference): ours, among the top
    assert any("dequantize_nf4_reference" in row for row in table), table
    # --launch-timing: the three launch layers (no Triton launch on CPU: the reference) and the collections
    launches = proc.stdout.split("Triton launches in the step")[1].splitlines()
    assert [row.split()[:2] for row in launches[2:5]] == [["jit_run", "0"], ["launcher", "0"], ["c_launch", "0"]]
    assert launches[5].startswith("garbage collections a step: generation 0:")
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_step.py"), "--peer", "nope", "--config",
                          "tiny"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert bad.returncode != 0 and "unknown --peer nope" in bad.stderr


def test_the_longest_search_says_when_time_cut_it_short(monkeypatch):
    """train_step.longest: doubling then bisection to 1,024 tokens; a search the time budget stops is marked
    unfinished (its value a lower bound), one that reached the cap or narrowed to 1,024 tokens finished."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import train_step

    monkeypatch.setattr(train_step, "fits", lambda step, config, t: t <= 5000)
    assert train_step.longest(None, None, 2048, 65536, 60.0) == (4096, True)  # 8192 fails, 6144 and 5120 too
    assert train_step.longest(None, None, 1024, 4096, 60.0) == (4096, True)  # the cap reached
    assert train_step.longest(None, None, 2048, 65536, 0.0) == (0, False)  # no time for a single probe
