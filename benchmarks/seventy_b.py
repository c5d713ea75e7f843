"""70B QLoRA on two 24 GB GPUs (issue 24): a Llama-3.1-70B-shape bnb-4bit checkpoint, trained by `qlora-fsdp train`
on --gpus ranks, each process capped at --cap-gb of GPU memory.

    python benchmarks/seventy_b.py                     # nvidia-h200-x2: 70B shape, 2 ranks x 24 GB, 10 steps of 1 x 2048
    python benchmarks/seventy_b.py --config tiny --reference tiny --device cpu --steps 3 --seq 128   # CPU (gloo ranks)

1. Writes the model's bnb-4bit checkpoint with random weights to --dir, one tensor at a time on the GPU and one 4 GB
   shard at a time on the host (t4_recipe.write_checkpoints; about 40 GB at 70B, kept for the next run), with the
   embedded model's tokenizer beside it.
2. Writes a copy task (prompt: a random string, completion: the same string) of 2 examples a rank, which the steps
   repeat: the loss falls as the adapter learns them.
3. Runs the train command (train_command: the README's line) under torchrun, one benchmarks/capped_cli.py worker a
   rank: its GPU capped, its host memory sampled.
4. Reports each rank's GPU peak, host peaks (anonymous, and with the mapped checkpoint), the losses, tokens/s (all
   ranks, from the second step) and the memory model's prediction (memory_report.step_peak) for N = 2, 4, 8.
5. Runs the --reference model (the 8B shape) the same way, its weights on the GPUs (no offload), under the same cap:
   the target is its tokens/s x its FLOPs a token / the 70B's (about 1/8). Appends "seventy_b" rows to results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_results, environment, lora_step_flops_per_token, model_config  # noqa: E402
from memory_report import step_peak  # noqa: E402

HERE = Path(__file__).resolve().parent


def train_command(model_dir: str, data: str, out: str, *, gpus: int, steps: int, seq: int, device: str,
                  offload: bool = True) -> list[str]:  # fmt: skip
    """The CLI's arguments: FSDP2 over `gpus` ranks, with CPU offload on GPUs where `offload` (70B's NF4 base is
    18.4 GB a rank at N = 2, its predicted peak with the weights on the GPU 29 GB), checkpointing, the chunked loss,
    1 x seq a rank and step."""
    cmd = ["train", "--model", model_dir, "--dataset", data, "--nproc", str(gpus), "--max-steps", str(steps),
           "--max-length", str(seq), "--batch-size", "1", "--activation-checkpointing", "--chunked-loss",
           "--lr", "2e-4", "--warmup-steps", "1", "--prompt-format", "raw", "--output-dir", out]  # fmt: skip
    return cmd + (["--device", "cpu"] if device == "cpu" else ["--cpu-offload"] if offload else [])


def write_copy_task(path: Path, examples: int, seq: int, seed: int = 0) -> Path:
    """`examples` prompt/completion pairs whose completion repeats the prompt, each about seq tokens (the embedded
    tokenizer: a token a character), cut to seq by --max-length."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(examples):
            text = "".join(rng.choice(string.ascii_lowercase) for _ in range(seq // 2 + 8))
            f.write(json.dumps({"prompt": text, "completion": text}) + "\n")
    return path


def write_model(config_name: str, root: Path, device: str, layers: int | None) -> tuple[str, float]:
    """The bnb-4bit checkpoint (written once per root) with a tokenizer; its directory and the seconds writing took."""
    from t4_recipe import write_checkpoints

    from qlora_fsdp.model import embedded_model_dir

    start = time.perf_counter()
    model_dir = Path(write_checkpoints(model_config(config_name, layers), root, device, formats=("bnb4",))["bnb4"])
    for f in embedded_model_dir().glob("*token*"):
        if f.is_file() and not (model_dir / f.name).exists():
            shutil.copy(f, model_dir / f.name)
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()  # what writing cached on GPU 0 goes back before rank 0 starts there
    return str(model_dir), time.perf_counter() - start


def run_workers(args, model_dir: str, work: Path, offload: bool) -> tuple[int, list[dict], list[dict], str]:
    """torchrun over --gpus capped_cli.py workers; (rc, metrics.jsonl records, per-rank peaks, output tail)."""
    out, peaks_dir = work / "run", work / "peaks"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(peaks_dir, ignore_errors=True)
    data = write_copy_task(work / "copy_task.jsonl", 2 * args.gpus, args.seq)
    cli = train_command(model_dir, str(data), str(out), gpus=args.gpus, steps=args.steps, seq=args.seq,
                        device=args.device, offload=offload)  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.gpus}",
           str(HERE / "capped_cli.py"), "--cap-gb", str(args.cap_gb), "--peaks-dir", str(peaks_dir), "--", *cli]  # fmt: skip
    print("[70b] qlora-fsdp " + " ".join(cli), flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    tail = (proc.stdout + proc.stderr)[-4000:]
    metrics = out / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    peaks = [json.loads(p.read_text()) for p in sorted(peaks_dir.glob("peaks-*.json"))]
    return proc.returncode, [r for r in records if "loss" in r], peaks, tail


def steady_tokens_per_s(records: list[dict], ranks: int) -> float:
    """All ranks' tokens/s from the second step on (the first warms up); a record's tokens are its rank's."""
    if len(records) < 2:
        return float("nan")
    tokens = ranks * sum(r["tokens"] for r in records[1:])
    return tokens / (records[-1]["elapsed_s"] - records[0]["elapsed_s"])


def run_model(args, name: str, offload: bool, role: str) -> dict:
    """Write `name`'s checkpoint under --dir/role, train it on args.gpus capped ranks, print the report; its row."""
    work = Path(args.dir) / role
    model_dir, write_s = write_model(name, work, "cuda:0" if args.device == "cuda" else "cpu", args.layers)
    disk_gb = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors")) / 1e9
    print(f"[70b] {name} bnb-4bit checkpoint: {disk_gb:.1f} GB in {model_dir} ({write_s:.0f} s)", flush=True)
    rc, records, peaks, tail = run_workers(args, model_dir, work, offload)
    config = model_config(name, args.layers)
    losses = [r["loss"] for r in records]
    tokens_per_s = steady_tokens_per_s(records, args.gpus)
    print(f"\n{name} ({config.num_hidden_layers} layers), {args.gpus} ranks, 1 x {args.seq} a rank and step, "
          + (f"cap {args.cap_gb:g} GB a GPU" if args.device == "cuda" else "gloo on CPU") + f": rc {rc}")  # fmt: skip
    if rc != 0:
        print(tail)
    print("losses: " + " ".join(f"{x:.4f}" for x in losses))
    for pk in peaks:
        gpu = "-" if pk["gpu_peak_gb"] is None else f"{pk['gpu_peak_gb']:.2f} GB (reserved {pk['gpu_reserved_gb']:.2f})"
        print(f"rank {pk['rank']}: GPU peak {gpu}, host peak {pk['host_anon_gb']:.1f} GB anonymous "
              f"({pk['host_hwm_gb']:.1f} GB with mapped files)")  # fmt: skip
    if records and peaks:  # the rest of a worker's run: loading, sharding, the first (warm-up) step's set-up, saving
        print(f"wall {max(pk['wall_s'] for pk in peaks):.0f} s a rank, of which {records[-1]['elapsed_s']:.0f} s the "
              f"{len(records)} steps")  # fmt: skip
    flops = lora_step_flops_per_token(config, args.seq)
    print(f"tokens/s (all ranks, steps 2-{len(records)}): {tokens_per_s:.0f}  ({tokens_per_s * flops / 1e12:.0f} "
          f"TFLOP/s of 4N + attention + LoRA over {args.gpus} ranks)")  # fmt: skip
    predicted = {(n, o): step_peak(config, n, args.seq, cpu_offload=o, chunked_loss=True)["total"] / 1e9
                 for n in (2, 4, 8) for o in (True, False)}  # fmt: skip
    print("memory model (memory_report.step_peak), GB a rank: " + ", ".join(
        f"N={n}{' offload' if o else ''} {gb:.2f}" for (n, o), gb in predicted.items()))  # fmt: skip
    return {"config": name, "layers": config.num_hidden_layers, "ranks": args.gpus, "cap_gb": args.cap_gb,
            "seq": args.seq, "steps": args.steps, "rc": rc, "losses": losses, "tokens_per_s": tokens_per_s,
            "flops_per_token": flops, "peaks": peaks, "checkpoint_gb": disk_gb, "write_s": write_s,
            "loss_fell": len(losses) >= 2 and losses[-1] < losses[0],
            "predicted_gb": {f"{n}{'_offload' if o else ''}": gb for (n, o), gb in predicted.items()},
            "command": "qlora-fsdp " + " ".join(train_command("MODEL", "DATA", "OUT", gpus=args.gpus, steps=args.steps,
                                                              seq=args.seq, device=args.device, offload=offload))}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="llama-3.1-70b", choices=["llama-3.1-70b", "llama-3.1-8b", "tiny"])
    p.add_argument("--reference", default="llama-3.1-8b", choices=["llama-3.1-8b", "tiny", "none"],
                   help="the model whose tokens/s the target scales by the FLOP ratio, run the same way but with its "
                        "weights on the GPUs (none: skip)")  # fmt: skip
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: all of the config's)")
    p.add_argument("--gpus", type=int, default=2, help="ranks (GPUs, or gloo processes with --device cpu)")
    p.add_argument("--cap-gb", type=float, default=24.0, help="GPU memory a process may use")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seq", type=int, default=2048, help="tokens a rank and step (batch 1)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "qlora_70b"), help="checkpoint and run folder")
    p.add_argument("--timeout", type=float, default=3600, help="seconds each training may take")
    args = p.parse_args()
    env = environment()
    row = run_model(args, args.config, offload=True, role="model")
    ok = row["rc"] == 0 and row["loss_fell"] and len(row["peaks"]) == args.gpus
    rows = [{**env, "bench": "seventy_b", **row}]
    if args.reference != "none":  # the target: tokens/s at least the reference's x its FLOPs / ours per token
        ref = run_model(args, args.reference, offload=False, role="reference")
        rows.append({**env, "bench": "seventy_b", "role": "reference", **ref})
        target = ref["tokens_per_s"] * ref["flops_per_token"] / row["flops_per_token"]
        rows[0] |= {"reference_tokens_per_s": ref["tokens_per_s"], "target_tokens_per_s": target}
        print(f"\n{args.config} {row['tokens_per_s']:.0f} tokens/s against {args.reference} {ref['tokens_per_s']:.0f}: "
              f"{row['tokens_per_s'] / ref['tokens_per_s']:.3f}x, target {target:.0f} (the FLOP ratio "
              f"{ref['flops_per_token'] / row['flops_per_token']:.3f}): {'met' if row['tokens_per_s'] >= target else 'NOT met'}")  # fmt: skip
        ok = ok and ref["rc"] == 0
    append_results(rows)
    print(f"70b: {'PASS' if ok else 'FAIL'}" + ("" if row["loss_fell"] else " (the loss did not fall)"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
