"""Side by side with what users pick instead: one device run, every system on the same checkpoint, LoRA and batches.

    python benchmarks/peers.py [--systems hf_peft_bnb,hf_peft_bnb_noac,...] [--shapes 1x2048,4x2048,1x8192]
                               [--longest] [--memory-cap-gb 16] [--check-imports] [--config tiny]

The model: Llama-3.1-8B's shape with random weights, written once as a bnb-4bit checkpoint, and as the same NF4
weights dequantized to 16 bits for torchtune, which quantizes its base itself (t4_recipe.write_checkpoints'
nf4grid16: from the original 16-bit weights, torchao's NF4 is another model, its first loss 2.3e-2 off ours at 4
layers of the 8B widths on CPU, 0.39e-2 at 1 layer). Every system: LoRA r=16, alpha 32, dropout 0 on
all 7 projections, gradients clipped to norm 1.0 and AdamW lr 1e-4 without weight decay (Trainer's defaults, which
ours uses: a system that clipped differently would train another trajectory), bf16, labels on every token, the same
random batch per shape; each run the way its documentation recommends for speed:

    hf_peft_bnb         transformers + peft + bitsandbytes (the bnb-4bit checkpoint through from_pretrained),
                        non-reentrant activation checkpointing, SDPA
    hf_peft_bnb_noac    the same without checkpointing
    hf_peft_bnb_liger   hf_peft_bnb + Liger-Kernel (`apply_liger_kernel_to_llama`: RoPE, RMSNorm, SwiGLU, fused
                        linear cross-entropy)
    unsloth             Unsloth's FastLanguageModel on the bnb-4bit checkpoint, use_gradient_checkpointing="unsloth"
    torchtune           torchtune's qlora_llama3_1_8b (torchao NF4 from nf4grid16), activation
                        checkpointing, chunked cross-entropy, torch.compile (its QLoRA recipe's speed settings)
    torchtune_eager     the same without torch.compile: what separates compiled code from the model's math when
                        torchtune's loss disagrees (3.0e-2 below HF's after 7 steps on an H200, b8d3905; within 6e-4
                        relative on CPU at 16 layers of width 512 with the 8B vocabulary, 8 steps, compiled)
    ours_fastest        load_model + the loop: --compile --chunked-loss --keep-dequantized, no checkpointing
    ours_ac             --compile --chunked-loss --activation-checkpointing
    ours_ac_keep        ours_ac + --keep-dequantized (one recomputed layer's dense weights held through its
                        backward: a dequantization a layer and step fewer)
    ours_leanest        ours_ac + --offload-activations --embedding-on-cpu
    ours_longest        ours_leanest + --mlp-chunk-tokens 16384 (the MLPs 16k tokens at a time: for --longest)
    ours_in_hf          the README's recipe for Trainer users (load_model + peft.get_peft_model) run as hf_peft_bnb
                        is: transformers' forward, loss and checkpointing; only the NF4 layers are ours
    ours_in_hf_fused    ours_in_hf + qlora_fsdp.fuse_lora(model): our LoRA layers and fused SwiGLU in place of peft's
    torchtune_fsdp2     torchtune's QLoRA with FSDP2 on 2 GPUs (its lora_finetune_distributed model setup: meta
                        device, compiled, checkpointed, each layer sharded, the checkpoint loaded into the shards)
    ours_fsdp2          ours with FSDP2 on 2 GPUs, loaded as the CLI does (--nproc 2): compiled, chunked loss,
                        checkpointing (torchtune_fsdp2's setup); ours_fsdp2_noac without checkpointing

The 2-GPU systems run each rank on the same batch, so their loss is one GPU's and checked as the others are; their
tokens/s counts both ranks' tokens (a row's tokens_per_s_per_gpu is one rank's), their peak is the larger rank's.

Each system runs in its own process (Unsloth and Liger patch transformers for the whole process). A system that
cannot be imported or run is reported with its exact error, and the others go on. Per system and shape: tokens/s,
peak GPU memory, and the loss after the same steps (and of the first step, before any update): losses that
disagree by more than --loss-tol with hf_peft_bnb's void the comparison (different math is not a speedup).
--longest: the longest batch-1 sequence (train_step.longest; `--shapes ""` for that alone). --memory-cap-gb: each
system's process allocates at most that much of its GPU, as on a smaller GPU (16: a T4), and its rows say so
(memory_cap_gb): the longest sequence on an H200's 141 GB takes minutes a step, on 16 or 24 GB it is the question
users ask. Rows go to results.jsonl (bench "peers"); benchmarks/pareto.py draws them.

A system's extra packages (carried as wheels: unsloth needs other transformers/trl/datasets versions than the rest)
come first on its PYTHONPATH from $QLORA_PEERS_SITE_<SYSTEM> (e.g. QLORA_PEERS_SITE_UNSLOTH=/tmp/site_unsloth).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import cap_gpu_memory, parse_shapes  # noqa: E402
from peer_systems import DEVICE, IMPORTS, WORLD, build  # noqa: E402
from train_step import MAX_GRAD_NORM, longest_tokens  # noqa: E402


# -- one system, in its own process ------------------------------------------------------------------------------
def run_one(args) -> list[dict]:
    """System args.one's rows; a multi-rank system (WORLD) on its ranks, each timing the same batch: rank 0's rows
    with tokens/s of all ranks together and the largest rank's peak memory."""
    world = WORLD.get(args.one, 1)
    if world == 1:
        return _time_system(args, DEVICE)
    from multi_gpu import spawn

    if DEVICE == "cuda" and torch.cuda.device_count() < world:
        raise RuntimeError(f"{args.one} needs {world} GPUs, this machine has {torch.cuda.device_count()}")
    out = spawn(_rank_worker, world, args)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    rows = ranks[0]
    for i, row in enumerate(rows):
        if "tokens_per_s" in row:
            row.update(gpus=world, tokens_per_s_per_gpu=row["tokens_per_s"], tokens_per_s=row["tokens_per_s"] * world,
                       peak_gb=max(rank[i]["peak_gb"] for rank in ranks))  # fmt: skip
    return rows


def _rank_worker(rank: int, world: int, port: int, args, out: Path) -> None:
    import torch.distributed as dist
    from multi_gpu import _join

    device = _join(rank, world, port)
    try:
        rows = _time_system(args, device)
        (out / f"rank{rank}.json").write_text(json.dumps(rows))
    finally:
        dist.destroy_process_group()


def _time_system(args, device: str) -> list[dict]:
    from train_step import free_memory, longest, time_shape

    config = model_config(args.config)
    shapes = parse_shapes(args.shapes)
    capped = {"memory_cap_gb": args.memory_cap_gb} if cap_gpu_memory(args.memory_cap_gb, device) else {}
    start = time.perf_counter()
    step = build(args.one, json.loads(args.dirs), config, longest_seq_needed(args), args.compile_backend, device,
                 args.max_grad_norm)  # fmt: skip
    rows = [{"system": args.one, "setup_s": time.perf_counter() - start}]
    for b, t in shapes:
        rows.append({"system": args.one, "batch": b, "seq": t, **capped,
                     **time_shape(step, config, b, t, args.warmup, args.iters)})  # fmt: skip
        free_memory()
    if args.longest and WORLD.get(args.one, 1) == 1:  # (ranks probing lengths apart could wait on each other)
        seq, finished = longest(step, config, args.longest_start, args.longest_cap, args.longest_budget_s)
        rows.append({"system": args.one, **capped, "longest_seq_batch1": seq, "longest_search_finished": finished})
    return rows


def longest_seq_needed(args) -> int:
    """The longest sequence a system is built for: its position tables (torchtune's RoPE cache, Unsloth's
    max_seq_length) must reach --longest-cap when --longest probes up to it, or a probe fails on a shape, not on
    memory."""
    return max([t for _, t in parse_shapes(args.shapes)] + ([args.longest_cap] if args.longest else []))


def model_config(name: str):
    from qlora_fsdp.parallel.sizing import llama_3_1_8b_config
    from train_step import tiny_config

    return llama_3_1_8b_config() if name == "llama-3.1-8b" else tiny_config()


def check_imports(names: list[str]) -> dict[str, str]:
    """system -> "ok" or the first import error, each in a fresh process with the system's PYTHONPATH; the
    processes run at once, one per distinct (imports, PYTHONPATH): the import checks took 18 s of a CPU test run one
    after another."""
    envs = {name: system_env(name) for name in names}
    keys = {name: ("; ".join(f"import {m}" for m in IMPORTS[name]) or "pass", env.get("PYTHONPATH", ""))
            for name, env in envs.items()}  # fmt: skip
    procs = {}
    for name, (code, path) in keys.items():
        if (code, path) not in procs:
            procs[code, path] = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL,
                                                 stderr=subprocess.PIPE, text=True, env=envs[name])  # fmt: skip
    results = {}
    for key, proc in procs.items():
        stderr = proc.communicate()[1]
        results[key] = "ok" if proc.returncode == 0 else (stderr.strip().splitlines() or ["?"])[-1]
    return {name: results[key] for name, key in keys.items()}


def system_env(name: str) -> dict:
    env = dict(os.environ)
    site = os.environ.get(f"QLORA_PEERS_SITE_{name.upper()}")
    if site:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [site, env.get("PYTHONPATH", "")]))
    return env


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--systems", default=",".join(IMPORTS))
    p.add_argument("--shapes", default="1x2048,4x2048,1x8192")
    p.add_argument("--config", choices=["llama-3.1-8b", "tiny"], default="llama-3.1-8b")
    p.add_argument("--checkpoints", default=str(Path(tempfile.gettempdir()) / "qlora_peers_checkpoints"))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--max-grad-norm", type=float, default=MAX_GRAD_NORM,
                   help="every system's gradient clip before AdamW (Trainer's default; 0: none)")
    p.add_argument("--loss-tol", type=float, default=1e-2, help="relative; against hf_peft_bnb at the same shape")
    p.add_argument("--longest", action="store_true")
    p.add_argument("--longest-start", type=int, default=8192)
    p.add_argument("--longest-cap", type=int, default=262144)
    p.add_argument("--longest-budget-s", type=float, default=120)
    p.add_argument("--memory-cap-gb", type=float, default=0.0,
                   help="each system's process may allocate at most this on its GPU (a smaller GPU's memory: 16 for a "
                        "T4); with --longest, the longest sequence that trains on such a GPU")  # fmt: skip
    p.add_argument("--timeout", type=float, default=900, help="seconds per system")
    p.add_argument("--compile-backend", default="inductor", help="ours' (eager: a quick CPU smoke test)")
    p.add_argument("--check-imports", action="store_true", help="only say which systems import here")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one system, print JSON rows
    p.add_argument("--dirs", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        try:
            rows = run_one(args)
        except Exception as e:  # noqa: BLE001 - reported as the system's result
            rows = [{"system": args.one, "error": f"{type(e).__name__}: {e}"[:2000], "trace": traceback.format_exc()[-4000:]}]
        print("PEERS_JSON " + json.dumps(rows), flush=True)
        return
    if not parse_shapes(args.shapes) and not args.longest:
        raise SystemExit("peers.py: nothing to run: give --shapes, --longest or both")
    names = args.systems.split(",")
    unknown = [n for n in names if n not in IMPORTS]
    if unknown:
        raise SystemExit(f"peers.py: unknown system(s) {unknown}; known: {', '.join(IMPORTS)}")
    imports = check_imports(names)
    for name, status in imports.items():
        print(f"import {name}: {status}", flush=True)
    if args.check_imports:
        return
    from common import append_results, environment

    config = model_config(args.config)
    start = time.perf_counter()
    dirs = peer_checkpoints(config, Path(args.checkpoints))
    print(f"checkpoints in {args.checkpoints} ({time.perf_counter() - start:.0f} s)", flush=True)
    env = environment()
    results = []
    for name in names:
        if imports[name] != "ok":
            rows = [{"system": name, "error": f"import failed: {imports[name]}"}]
        else:
            rows = _run_system(name, args, dirs)
        for r in rows:
            print(r if "trace" not in r else {k: v for k, v in r.items() if k != "trace"}, flush=True)
        append_results([{**env, "bench": "peers", "config": args.config, **r} for r in rows])
        results += rows
    print_table(results, args.loss_tol)


def _run_system(name: str, args, dirs: dict) -> list[dict]:
    cmd = [sys.executable, __file__, "--one", name, "--dirs", json.dumps(dirs), "--config", args.config, "--shapes",
           args.shapes, "--warmup", str(args.warmup), "--iters", str(args.iters), "--compile-backend",
           args.compile_backend, "--max-grad-norm", str(args.max_grad_norm), "--memory-cap-gb",
           str(args.memory_cap_gb)]  # fmt: skip
    if args.longest:
        cmd += ["--longest", "--longest-start", str(args.longest_start), "--longest-cap", str(args.longest_cap),
                "--longest-budget-s", str(args.longest_budget_s)]  # fmt: skip
    try:
        code, out, err = run_killable(cmd, system_env(name), args.timeout)
    except subprocess.TimeoutExpired:
        return [{"system": name, "error": f"no result within --timeout {args.timeout:.0f} s"}]
    for line in out.splitlines():
        if line.startswith("PEERS_JSON "):
            return json.loads(line.removeprefix("PEERS_JSON "))
    return [{"system": name, "error": f"exit {code}: {(err.strip().splitlines() or ['?'])[-1]}",
             "trace": err[-4000:]}]  # fmt: skip


def run_killable(cmd: list[str], env: dict, timeout: float) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of cmd run in a process group of its own; past `timeout` seconds, or when this
    process is terminated, the whole group is killed (TimeoutExpired). subprocess.run's timeout kills the child
    alone, then waits for its pipes, which Inductor's compile workers keep open: seen on an H200, a system past its
    timeout hung the run and went on using the GPU after it was killed."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)  # fmt: skip

    def kill(*_):
        with contextlib.suppress(ProcessLookupError):  # the whole group may have exited already
            os.killpg(proc.pid, signal.SIGKILL)

    previous = signal.signal(signal.SIGTERM, lambda *a: (kill(), sys.exit(143)))
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err
    except subprocess.TimeoutExpired:
        kill()
        proc.communicate()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def peer_checkpoints(config, root: Path) -> dict[str, str]:
    """The systems' checkpoints of `config` under `root` (written once): bnb-4bit, and nf4grid16 for torchtune,
    each with the embedded model's tokenizer beside it."""
    from t4_recipe import write_checkpoints

    dirs = write_checkpoints(config, root, device=DEVICE, formats=("bnb4", "nf4grid16"))
    _tokenizer_into(dirs)
    return dirs


def _tokenizer_into(dirs: dict) -> None:
    """The embedded model's tokenizer files beside each checkpoint (systems that load one with the model)."""
    import shutil

    from qlora_fsdp.model import embedded_model_dir

    for d in dirs.values():
        for f in embedded_model_dir().glob("*token*"):
            if f.is_file() and not (Path(d) / f.name).exists():
                shutil.copy(f, Path(d) / f.name)


def print_table(rows: list[dict], tol: float) -> None:
    ref = {(r["batch"], r["seq"]): r for r in rows if r["system"] == "hf_peft_bnb" and "tokens_per_s" in r}
    print(f"\n{'system':<20}{'shape':>9}{'tokens/s':>10}{'peak GB':>9}{'loss':>9}  vs hf_peft_bnb")
    for r in rows:
        if "error" in r:
            print(f"{r['system']:<20}  not run: {r['error'][:150]}")
        elif "batch" in r:
            shape = f"{r['batch']}x{r['seq']}"
            if r.get("oom"):
                print(f"{r['system']:<20}{shape:>9}{'OOM':>10}")
                continue
            base = ref.get((r["batch"], r["seq"]))
            note = ""
            if base:
                rel = abs(r["loss"] - base["loss"]) / abs(base["loss"])
                note = (f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x tokens/s at {r['peak_gb'] / base['peak_gb']:.2f}x "
                        f"memory; loss {'agrees' if rel <= tol else 'DISAGREES'} ({rel:.1e})")  # fmt: skip
                if rel > tol and r.get("first_loss") is not None and base.get("first_loss") is not None:
                    first = abs(r["first_loss"] - base["first_loss"]) / abs(base["first_loss"])
                    note += f", before any update {first:.1e}"  # the model's math, or the optimizer's?
            print(f"{r['system']:<20}{shape:>9}{r['tokens_per_s']:>10,.0f}{r['peak_gb']:>9.1f}{r['loss']:>9.4f}  {note}")
        elif "longest_seq_batch1" in r:
            cap = f" in {r['memory_cap_gb']:g} GB" if r.get("memory_cap_gb") else ""
            print(f"{r['system']:<20}  longest batch-1 sequence{cap} {longest_tokens(r)}")


if __name__ == "__main__":
    main()
