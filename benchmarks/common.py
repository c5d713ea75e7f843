"""Shared benchmark helpers: timing (host-visible and GPU-only), environment record, results file."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("results.jsonl")


def _git_commit() -> str | None:
    """HEAD's short hash, with "-dirty" where the tracked code differs from it (a device machine's copy of a working
    tree can carry another branch's .git: 2026-12-07 a gate-pending tree reported main's commit)."""
    root = Path(__file__).parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=root)
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "../src", "."],
                                 capture_output=True, text=True, cwd=root)  # fmt: skip
    except OSError:
        return None
    if head.returncode != 0 or not head.stdout.strip():
        return None
    return head.stdout.strip() + ("-dirty" if changed.stdout.strip() else "")


def environment() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    commit = os.environ.get("QLORA_GIT_COMMIT") or _git_commit()
    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": commit or None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def append_results(rows: list[dict], path: Path | str | None = None) -> Path:
    """Append rows to `path`, $QLORA_RESULTS or benchmarks/results.jsonl; a run without a GPU (a CPU smoke test of a
    script) goes to a temporary file instead, so that results.jsonl holds GPU measurements only."""
    path = path or os.environ.get("QLORA_RESULTS")
    if path is None and not torch.cuda.is_available():
        import tempfile

        path = Path(tempfile.gettempdir()) / "qlora_fsdp_cpu_results.jsonl"
    path = Path(path or RESULTS)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def host_time_us(fn, iters: int, warmup: int = 5) -> float:
    """Mean wall time per call in us as a Python caller sees it: launches, host overhead and the GPU work,
    for back-to-back calls (the caller waits once at the end)."""
    for i in range(warmup):
        fn(i)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(iters):
        fn(i)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters * 1e6


def gpu_time_us(fn, iters: int, warmup: int = 3) -> tuple[float, int]:
    """(GPU time per call in us summed over the kernels the call launches, kernels per call), from the
    profiler's device-side kernel durations (no launch gaps, no host overhead)."""
    for i in range(warmup):
        fn(i)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for i in range(iters):
            fn(i)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.device_time for e in kernels)
    return total / iters, round(len(kernels) / iters)


def copy_bandwidth_tbs(nbytes: int = 2 << 30, iters: int = 20) -> float:
    """Device-to-device copy bandwidth in TB/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e-3)
    times.sort()
    return 2 * nbytes / times[len(times) // 2] / 1e12


def copy_task_batches(n: int, seq: int, vocab: int, seed: int = 0) -> list[dict]:
    """n batches of 1 x seq: a random first half, the second half repeating it (labelled): a task LoRA can learn."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        half = torch.randint(0, vocab, (1, seq // 2), generator=g)
        ids = torch.cat([half, half], 1)
        labels = ids.clone()
        labels[:, : seq // 2] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def lora_step_flops_per_token(config, seq: int, lora_r: int = 16) -> float:
    """Model FLOPs of one QLoRA training token (no weight gradient for the frozen base; recomputation not counted):

        4 N              N = parameters of the base matmuls (decoder linears + lm_head): 2N forward, 2N for the
                         input gradients
        6 L T q          attention scores and values: 4 T q a layer forward, twice that backward, halved by the
                         causal mask (T = seq, q = heads x head dim)
        6 r (in + out)   per LoRA linear: forward, input gradient and weight gradient of A and B
    """
    d, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    q = config.num_attention_heads * head_dim
    linears = [(d, q), (d, kv), (d, kv), (q, d), (d, inter), (d, inter), (inter, d)]  # (in, out) of each layer
    n_base = layers * sum(i * o for i, o in linears) + d * config.vocab_size
    lora = layers * sum(6 * lora_r * (i + o) for i, o in linears)
    return 4 * n_base + 6 * layers * seq * q + lora


def cap_gpu_memory(gb: float, device) -> float | None:
    """Let this process allocate at most `gb` GB on CUDA `device` (past it an allocation raises out-of-memory, as
    on a GPU of that size: torch.cuda.set_per_process_memory_fraction); the fraction set, None where there is
    nothing to cap (no cap asked, or a CPU device)."""
    device = torch.device(device)
    if not gb or device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()  # "cuda" alone is refused
    fraction = min(1.0, gb * 1e9 / torch.cuda.get_device_properties(index).total_memory)
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    return fraction


def parse_shapes(spec: str) -> list[tuple[int, int]]:
    """[(batch, seq)] of "1x2048,4x2048" (a --shapes argument)."""
    return [tuple(int(x) for x in s.split("x")) for s in filter(None, spec.split(","))]


def model_config(name: str, layers: int | None = None):
    """A benchmark model's transformers config by name, optionally cut to `layers` decoder layers:
    "llama-3.1-8b" and "llama-3.1-70b" (the real models' shapes: random weights, plain RoPE), or "tiny" (CPU
    smoke tests; every width divisible for 2-way NF4 sharding)."""
    import transformers

    from qlora_fsdp.parallel.sizing import llama_3_1_8b_config

    if name == "llama-3.1-8b":
        config = llama_3_1_8b_config()
    elif name == "llama-3.1-70b":
        config = transformers.LlamaConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                                          num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                                          max_position_embeddings=131072, tie_word_embeddings=False)  # fmt: skip
    elif name == "tiny":
        config = transformers.LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                          num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    else:
        raise ValueError(f"unknown model config '{name}': llama-3.1-8b, llama-3.1-70b or tiny")
    if layers is not None:
        config.num_hidden_layers = layers
    return config
