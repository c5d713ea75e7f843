"""FSDP2 on several GPUs, Llama-3.1-8B shape with random weights (nothing downloaded), against one GPU.

    python benchmarks/multi_gpu.py [--gpus 2] [--steps 30] [--seq 2048] [--parts losses,offload,allgather,sft,pipeline]

losses     `--steps` QLoRA steps (r=16 on all 7 projections, activation checkpointing) on 1 GPU and with FSDP2 on
           `--gpus` GPUs, bf16 and fp16, the same global batch (--gpus microbatches of 1 x --seq per step: one a
           rank, or all of them accumulated on one GPU) and seed: per-step losses and their differences; per-GPU
           peak memory and tokens/s (steady state: steps 5 to the end).
offload    the same with CPUOffloadPolicy on `--gpus` GPUs (10 steps): peak memory and tokens/s.
allgather  the bytes one decoder layer's all-gather moves, against its NF4 bytes and its bf16 size.
sft        TRL's SFTTrainer with `shard_for_trainer` on `--gpus` GPUs vs 1 GPU (5 steps, bf16): per-step losses.
pipeline   every pipeline schedule (GPipe, 1F1B, interleaved ZB, ZBV) with `--pp` stages x `--gpus`/`--pp` FSDP2
           replicas, bf16, `--pp-batches` microbatches of 1 x --seq a replica and step (10 steps), against one GPU
           accumulating the same global batch: per-step losses, tokens/s, per-GPU peak memory, and the schedule
           report (step time and idle share of every rank).
Prints a table per part and appends JSON lines to benchmarks/results.jsonl.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_results, copy_task_batches, environment, model_config  # noqa: E402


def _join(rank: int, world: int, port: int) -> str:
    """Join the process group (NCCL + gloo on GPUs, gloo on CPU); this rank's device."""
    import datetime

    import torch.distributed as dist

    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.set_device(rank)
    if world > 1:  # (on one process no torchrun variables: accelerate would take it for a distributed run)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                          WORLD_SIZE=str(world))  # fmt: skip
        dist.init_process_group("cuda:nccl,cpu:gloo" if gpu else "gloo", timeout=datetime.timedelta(minutes=5))
    return f"cuda:{rank}" if gpu else "cpu"


def _peak_gb() -> float:
    return torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else float("nan")


def _train_worker(rank, world, port, args, precision, offload, steps, accum, schedule, out):
    """`steps` steps of `accum` batches a replica; FSDP2 over `world` ranks, or with a pipeline `schedule`,
    args.pp stages x world / args.pp replicas."""
    import json

    from qlora_fsdp.model import random_model
    from qlora_fsdp.training import TrainConfig, make_loop
    from qlora_fsdp.training.batches import FixedBatches

    device = _join(rank, world, port)
    if schedule and schedule.endswith(":torch"):  # torch's own weight pass, one autograd call per parameter group
        import qlora_fsdp.parallel.pipeline as pipeline_module

        pipeline_module.FUSED_WEIGHT_PASS, schedule = False, schedule.removesuffix(":torch")
    config = model_config(args.config)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    model = random_model(config, dtype=dtype, device=device, seed=0)
    pipeline = {"pp": args.pp, "pp_schedule": schedule, "pp_report": True, "nproc": world} if schedule else {}
    replicas = world // args.pp if schedule else world
    cfg = TrainConfig(output_dir=tempfile.mkdtemp(), precision=precision, activation_checkpointing=args.ac, lora_r=16,
                      lora_alpha=32, lr=2e-4, warmup_steps=5, max_steps=steps, grad_accum=accum, batch_size=1,
                      max_length=args.seq, cpu_offload=offload, progress=False, device=device, seed=0, **pipeline)  # fmt: skip
    batches = copy_task_batches(steps * accum * replicas, args.seq, config.vocab_size)
    loop = make_loop(cfg, model=model, train_batches=FixedBatches(batches))
    if device != "cpu":
        torch.cuda.reset_peak_memory_stats()
    records = [r for r in loop.train() if "loss" in r]
    result = {"records": records, "peak_gb": _peak_gb()}
    if schedule and rank == 0:
        result["pp_report"] = json.loads((Path(cfg.output_dir) / "pp_report.json").read_text())
    if args.allgather and world > 1 and precision == "bf16" and not offload:
        result["allgather"] = _layer_allgather_bytes(loop, batches[0])
    torch.save(result, out / f"rank{rank}.pt")
    if world > 1:
        torch.distributed.destroy_process_group()
    os._exit(0)


def _layer_allgather_bytes(loop, batch) -> dict:
    """Bytes of the all-gathers in one forward (recorded at the collective), per decoder layer."""
    import torch.distributed as dist

    from qlora_fsdp.model import decoder_layers
    from qlora_fsdp.nf4.tensor import NF4Tensor

    sizes = []
    patched = {}
    for fn in ("all_gather_into_tensor", "all_gather_single"):
        if hasattr(dist, fn):
            orig = getattr(dist, fn)
            patched[fn] = orig

            def record(output_tensor, input_tensor, *a, _orig=orig, **kw):
                sizes.append(output_tensor.numel() * output_tensor.element_size())
                return _orig(output_tensor, input_tensor, *a, **kw)

            setattr(dist, fn, record)
    try:
        with torch.no_grad(), torch.autocast(loop.device.type, dtype=torch.bfloat16):
            loop.model(input_ids=batch["input_ids"].to(loop.device), use_cache=False)
    finally:
        for fn, orig in patched.items():
            setattr(dist, fn, orig)
    layer = decoder_layers(loop.model)[1]
    nf4 = bf16 = lora = 0
    for p in layer.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        if isinstance(local, NF4Tensor):
            w = local.nf4
            nf4 += sum(t.numel() * t.element_size() for t in (w.data, w.absmax, w.nested_absmax) if t is not None)
            bf16 += p.numel() * 2
        else:
            lora += local.numel() * local.element_size()
    world = dist.get_world_size()
    return {"recorded_per_allgather": sizes[:6], "layer_nf4_bytes": nf4 * world, "layer_lora_bytes": lora * world,
            "layer_linears_bf16_bytes": bf16}  # fmt: skip


def _sft_worker(rank, world, port, args, out):
    import datasets
    import peft
    import transformers
    import trl

    from qlora_fsdp.data import embedded_dataset
    from qlora_fsdp.hf import QLoRASFTTrainer, shard_for_trainer
    from qlora_fsdp.model import embedded_model_dir, random_model

    device = _join(rank, world, port)
    rows = [{"prompt": f"{e['instruction']} {e['input']}\n", "completion": e["output"]}
            for e in embedded_dataset("train[:64]")]  # fmt: skip
    sft_args = trl.SFTConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=4,
                             gradient_accumulation_steps=args.gpus // world, max_steps=5, learning_rate=2e-4,
                             logging_steps=1, report_to=[], bf16=True, seed=0, save_strategy="no", max_length=128,
                             dataloader_drop_last=True, gradient_checkpointing=True,
                             use_cpu=device == "cpu")  # fmt: skip
    model = random_model(model_config(args.config), dtype=torch.bfloat16, device=device, seed=0)
    torch.manual_seed(0)
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                       task_type="CAUSAL_LM"))  # fmt: skip
    shard_for_trainer(model, sft_args)

    class InOrder(QLoRASFTTrainer):
        def _get_train_sampler(self, *a, **kw):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    tok = transformers.AutoTokenizer.from_pretrained(embedded_model_dir())
    trainer = InOrder(model=model, args=sft_args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)
    trainer.train()
    if rank == 0:
        torch.save([h["loss"] for h in trainer.state.log_history if "loss" in h], out / "sft.pt")
    if world > 1:
        torch.distributed.destroy_process_group()
    os._exit(0)


def spawn(fn, world, *args) -> Path:
    out = Path(tempfile.mkdtemp())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if world == 1:  # one process sees one GPU (Trainer would otherwise take several for nn.DataParallel)
        os.environ["CUDA_VISIBLE_DEVICES"] = "0"
    try:
        mp.spawn(fn, args=(world, port, *args, out), nprocs=world, join=True)
    finally:
        if visible is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = visible
    return out


def steady_tokens_per_s(records, skip: int = 5) -> float:
    a, b = records[skip - 1], records[-1]
    return sum(r["tokens"] for r in records[skip:]) / (b["elapsed_s"] - a["elapsed_s"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--parts", default="losses,offload,allgather,sft")
    p.add_argument("--pp", type=int, default=0, help="pipeline stages (part pipeline; default: --gpus)")
    p.add_argument("--pp-batches", type=int, default=8, help="microbatches a replica and step (part pipeline)")
    p.add_argument("--schedules", default="gpipe,1f1b,interleaved_zb,zbv",
                   help="zero-bubble ones with ':torch' use torch's weight pass (one autograd call per group)")
    p.add_argument("--ac", action=argparse.BooleanOptionalAction, default=True, help="activation checkpointing")
    p.add_argument("--config", choices=["llama-3.1-8b", "llama-3.1-70b", "tiny"], default="llama-3.1-8b")
    args = p.parse_args()
    args.pp = args.pp or args.gpus
    parts = set(args.parts.split(","))
    args.allgather = "allgather" in parts
    if torch.cuda.is_available() and torch.cuda.device_count() < args.gpus:
        raise SystemExit(f"multi_gpu.py: --gpus {args.gpus} but {torch.cuda.device_count()} GPU(s) here")
    env = {**environment(), "gpus": args.gpus}
    rows = []
    runs = []
    # (precision, processes, cpu offload, steps, batches a replica and step, pipeline schedule or None)
    if "losses" in parts or "allgather" in parts:
        runs += [(prec, w, False, args.steps, args.gpus // w, None) for prec in ("bf16", "fp16") for w in (1, args.gpus)]
    if "offload" in parts:
        runs.append(("bf16", args.gpus, True, 10, 1, None))
    if "pipeline" in parts:
        dp = args.gpus // args.pp
        runs.append(("bf16", 1, False, 10, args.pp_batches * dp, None))  # the one-GPU reference
        runs += [("bf16", args.gpus, False, 10, args.pp_batches, s) for s in args.schedules.split(",")]
    results = {}
    for prec, world, offload, steps, accum, schedule in runs:
        out = spawn(_train_worker, world, args, prec, offload, steps, accum, schedule)
        ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]
        results[(prec, world, offload, accum, schedule)] = ranks[0]
        row = {"bench": "multi_gpu_train", "precision": prec, "world": world, "cpu_offload": offload,
               "offload": "frozen" if offload else None, "ac": args.ac, "seq": args.seq, "steps": steps, "batches_per_step": accum * (world if schedule is None else world // args.pp),
               "losses": [r["loss"] for r in ranks[0]["records"]], "peak_gb_per_gpu": [r["peak_gb"] for r in ranks],
               "tokens_per_s": steady_tokens_per_s(ranks[0]["records"])}  # fmt: skip
        if schedule:
            row.update(pp=args.pp, pp_schedule=schedule, pp_report=ranks[0]["pp_report"])
        if "allgather" in ranks[0]:
            row["allgather"] = ranks[0]["allgather"]
        rows.append(row)
        append_results([{**env, **row}])  # run by run: a cut-off session keeps what finished
        print(row, flush=True)
    if "sft" in parts:
        sft = {w: torch.load(spawn(_sft_worker, w, args) / "sft.pt") for w in (1, args.gpus)}
        rows.append({"bench": "multi_gpu_sft", "world": args.gpus, "losses_1gpu": sft[1], "losses_ngpu": sft[args.gpus]})
        append_results([{**env, **rows[-1]}])
        print(rows[-1], flush=True)

    print(f"\n{env['gpu']} x {args.gpus}, torch {env['torch']}; Llama-3.1-8B shape, QLoRA r=16, 1 x {args.seq} a microbatch")
    for prec in ("bf16", "fp16"):
        one, many = results.get((prec, 1, False, args.gpus, None)), results.get((prec, args.gpus, False, 1, None))
        if one and many:
            a = torch.tensor([r["loss"] for r in one["records"]])
            b = torch.tensor([r["loss"] for r in many["records"]])
            rel = ((a - b).abs() / a.abs()).max().item()
            print(f"{prec}: loss {a[0]:.4f} -> {a[-1]:.4f} on 1 GPU, {b[0]:.4f} -> {b[-1]:.4f} on {args.gpus}; "
                  f"max relative difference per step {rel:.2e}")  # fmt: skip
    ref = next((r for r in rows if r["world"] == 1 and r.get("batches_per_step") == args.pp_batches * (args.gpus // args.pp)
                and "pipeline" in parts), None)  # fmt: skip
    print(f"{'run':<34}{'tokens/s':>10}{'peak GB / GPU':>16}")
    for r in rows:
        if r["bench"] == "multi_gpu_train" and "pp_schedule" in r:
            rel = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], ref["losses"])) if ref else float("nan")
            name = f"pipeline {r['pp_schedule']} {r['pp']}x{r['world'] // r['pp']}"
            print(f"{name:<34}{r['tokens_per_s']:>10,.0f}{max(r['peak_gb_per_gpu']):>16.1f}   losses vs 1 GPU: max rel {rel:.1e}")
            for k in r["pp_report"]["ranks"]:
                print(f"    rank {k['rank']} stages {k['stages']}: {k['step_ms']:.0f} ms a step, idle {100 * k['idle']:.1f}%, "
                      f"peak {r['peak_gb_per_gpu'][k['rank']]:.1f} GB")  # fmt: skip
        elif r["bench"] == "multi_gpu_train":
            name = f"{r['precision']} {r['world']} GPU" + (" + CPU offload" if r["cpu_offload"] else "")
            name += f" ({r['batches_per_step']} x 1x{args.seq} a step)"
            print(f"{name:<34}{r['tokens_per_s']:>10,.0f}{max(r['peak_gb_per_gpu']):>16.1f}")
            if "allgather" in r:
                ag = r["allgather"]
                print(f"  all-gather of one decoder layer: recorded {ag['recorded_per_allgather'][:3]} bytes; its NF4 bytes "
                      f"{ag['layer_nf4_bytes']:,} + LoRA {ag['layer_lora_bytes']:,}; bf16 linears would be "
                      f"{ag['layer_linears_bf16_bytes']:,}")  # fmt: skip
        else:
            print(f"SFTTrainer losses, 1 GPU: {[round(x, 4) for x in r['losses_1gpu']]}")
            print(f"SFTTrainer losses, {args.gpus} GPUs: {[round(x, 4) for x in r['losses_ngpu']]}")


if __name__ == "__main__":
    main()
