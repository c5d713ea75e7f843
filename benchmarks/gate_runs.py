"""How the GPU gate runs one path inside a worker process (benchmarks/gpu_gate.py holds the list and the checks).

A path is a dict: {"name", "gpus", "kind", "precision", "options" (TrainConfig fields), "accum" (batches a replica and
step)}; `run_path(path, ctx)` returns {"losses": [per step], "tokens_per_s", "peak_gb", ...} or raises. `ctx` holds
the model config, the sequence length, the number of steps, the device, the rank and world size and a scratch
folder. Kinds:
    loop     make_loop on the random model (FSDP2 over the world when it is 2; a pipeline when options has pp)
    resume   a loop stopped after half the steps with a checkpoint, then a new loop resumed to the end
    trainer  transformers.Trainer, sft: TRL's SFTTrainer; both with shard_for_trainer (QLoRATrainer / QLoRASFTTrainer)
    cli      `qlora-fsdp train` on the embedded default on this GPU, then `generate` and `export --merge` with its
             adapter (subprocesses, as a user runs them)
    generate greedy generation speed of the real model (generate_speed.py): NF4 dequantized once must give the
             tokens of NF4 dequantized per token, within 1.5x of the dense model's time
    t4       the 2x T4 recipe (t4_recipe.py): a checkpoint of ctx["checkpoints"] loaded by load_model under the
             worker's memory cap, trained with --precision auto and activation checkpointing
A path whose "model" is "real" loads ctx["real_model"] (a pretrained checkpoint) instead of a random model.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import copy_task_batches

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _peak_gb(device: str) -> float:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.startswith("cuda") else float("nan")


def _steady_tokens_per_s(records: list[dict]) -> float:
    """Tokens/s from the second step on (the first compiles and warms up)."""
    if len(records) < 2:
        return records[-1]["tokens_per_s"] if records else float("nan")
    tokens = sum(r["tokens"] for r in records[1:])
    return tokens / (records[-1]["elapsed_s"] - records[0]["elapsed_s"])


def _train_config(path: dict, ctx: dict, out: Path, **extra):
    from qlora_fsdp.training import TrainConfig

    return TrainConfig(output_dir=str(out), precision=path["precision"], lora_r=16, lora_alpha=32, lr=2e-4,
                       warmup_steps=2, max_steps=ctx["steps"], grad_accum=path["accum"], batch_size=1,
                       max_length=ctx["seq"], progress=False, device=ctx["device"], seed=0, nproc=ctx["world"],
                       **{**path.get("options", {}), **extra})  # fmt: skip


def _loop(path: dict, ctx: dict, out: Path, **extra):
    from qlora_fsdp.model import random_model
    from qlora_fsdp.training import make_loop
    from qlora_fsdp.training.batches import FixedBatches

    cfg = _train_config(path, ctx, out, **extra)
    replicas = ctx["world"] // cfg.pp
    batches = copy_task_batches(ctx["steps"] * cfg.grad_accum * replicas, ctx["seq"], ctx["config"].vocab_size)
    if path.get("model") == "real":
        from qlora_fsdp.model import load_model

        from qlora_fsdp.training.loop import load_storage

        # as the CLI loads it: into host memory for FSDP2 over GPUs, each unit moved to its GPU as it is sharded
        storage = load_storage(torch.device(ctx["device"]), ctx["world"], cfg.pp)
        model = load_model(ctx["real_model"], dtype=DTYPES[path["precision"]], device=ctx["device"],
                           storage_device=storage)  # fmt: skip
    else:
        model = random_model(ctx["config"], dtype=DTYPES[path["precision"]], device=ctx["device"], seed=0)
    return make_loop(cfg, model=model, train_batches=FixedBatches(batches))


def run_loop(path: dict, ctx: dict) -> dict:
    loop = _loop(path, ctx, ctx["scratch"] / "run")
    records = [r for r in loop.train() if "loss" in r]
    return {"losses": [r["loss"] for r in records], "tokens_per_s": _steady_tokens_per_s(records)}


def run_resume(path: dict, ctx: dict) -> dict:
    """Half the steps with a checkpoint at the stop (as if killed there), then a fresh process state resumes."""
    half = ctx["steps"] // 2
    out = ctx["scratch"] / "run"
    first = _loop(path, ctx, out, save_every=half)
    first.train(stop_at=half)
    del first
    second = _loop(path, ctx, out, save_every=half, resume=True)
    records = [r for r in second.train() if "loss" in r]
    if records[half - 1]["step"] != half or len(records) != ctx["steps"]:
        raise RuntimeError(f"resume: expected the {half} saved steps then {ctx['steps'] - half} more, got steps "
                           f"{[r['step'] for r in records]}")  # fmt: skip
    return {"losses": [r["loss"] for r in records], "tokens_per_s": _steady_tokens_per_s(records[half:])}


def _hf_model(ctx: dict, precision: str):
    import peft

    from qlora_fsdp.model import random_model

    model = random_model(ctx["config"], dtype=DTYPES[precision], device=ctx["device"], seed=0)
    torch.manual_seed(0)
    lora = peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    return peft.get_peft_model(model, lora)


def run_trainer(path: dict, ctx: dict) -> dict:
    """transformers.Trainer (kind trainer) or trl.SFTTrainer (sft) with shard_for_trainer, batches in order."""
    import datasets
    import transformers

    from qlora_fsdp.hf import QLoRASFTTrainer, QLoRATrainer, shard_for_trainer

    common = dict(output_dir=str(ctx["scratch"] / "run"), per_device_train_batch_size=1,
                  gradient_accumulation_steps=path["accum"], max_steps=ctx["steps"], learning_rate=2e-4,
                  warmup_steps=2, logging_steps=1, report_to=[], bf16=path["precision"] == "bf16",
                  fp16=path["precision"] == "fp16", seed=0, save_strategy="no", dataloader_drop_last=True,
                  use_cpu=ctx["device"] == "cpu")  # fmt: skip
    if path["options"].get("gradient_checkpointing"):  # transformers' own, enabled by the Trainer in train()
        common.update(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    if path["kind"] == "sft":
        import trl

        from qlora_fsdp.data import embedded_dataset
        from qlora_fsdp.model import embedded_model_dir

        args = trl.SFTConfig(**{**common, "per_device_train_batch_size": 4}, max_length=128)
        rows = [{"prompt": f"{e['instruction']} {e['input']}\n", "completion": e["output"]}
                for e in embedded_dataset("train[:64]")]  # fmt: skip
        data = {"train_dataset": datasets.Dataset.from_list(rows),
                "processing_class": transformers.AutoTokenizer.from_pretrained(embedded_model_dir())}  # fmt: skip
        base = QLoRASFTTrainer
    else:
        args = transformers.TrainingArguments(**common, remove_unused_columns=False)
        n = ctx["steps"] * path["accum"] * ctx["world"]
        rows = [{k: v[0].tolist() for k, v in b.items()} for b in copy_task_batches(n, ctx["seq"], ctx["config"].vocab_size)]
        data = {"train_dataset": datasets.Dataset.from_list(rows),
                "data_collator": lambda ex: {k: torch.tensor([e[k] for e in ex]) for k in ("input_ids", "labels")}}  # fmt: skip
        base = QLoRATrainer

    class InOrder(base):  # the same batches in the same order on 1 and N processes
        def _get_train_sampler(self, *a, **kw):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    model = _hf_model(ctx, path["precision"])
    if path["options"].get("fuse_lora"):
        from qlora_fsdp import fuse_lora

        if fuse_lora(model, activation_checkpointing=bool(path["options"].get("gradient_checkpointing")))["linears"] == 0:
            raise RuntimeError("fuse_lora changed no LoRA layer")
    shard_for_trainer(model, args)
    if path["options"].get("compile_model"):
        from qlora_fsdp.compile import compile_model

        compile_model(model)
    step_ends = []  # perf_counter at each optimizer step's end (logging_steps=1 syncs on the loss every step)

    class StepTimes(transformers.TrainerCallback):
        def on_step_end(self, *a, **kw):
            step_ends.append(time.perf_counter())

    trainer = InOrder(model=model, args=args, callbacks=[StepTimes()], **data)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    trainer.save_model(str(ctx["scratch"] / "adapter"))
    if ctx["rank"] == 0 and not (ctx["scratch"] / "adapter" / "adapter_model.safetensors").is_file():
        raise RuntimeError("save_model wrote no adapter_model.safetensors")
    if path["kind"] == "sft":  # its rows are padded to their batch's longest, not counted here: no rate to report
        return {"losses": losses, "tokens_per_s": float("nan")}
    tokens = path["accum"] * ctx["world"] * ctx["seq"]  # a step's
    records = [{"tokens": tokens, "elapsed_s": t - start, "tokens_per_s": tokens * len(step_ends) / seconds}
               for t in step_ends]  # fmt: skip
    return {"losses": losses, "tokens_per_s": _steady_tokens_per_s(records)}  # from the second step: compile excluded


def _cli(*args: str, env: dict) -> str:
    """Run `python -m qlora_fsdp ARGS`; its output, or RuntimeError with the last lines."""
    proc = subprocess.run([sys.executable, "-m", "qlora_fsdp", *args], capture_output=True, text=True, env=env,
                          timeout=600)  # fmt: skip
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-5:])
        raise RuntimeError(f"qlora-fsdp {args[0]} exited {proc.returncode}: {tail}")
    return proc.stdout


def run_cli(path: dict, ctx: dict) -> dict:
    """The embedded default trained on this GPU by the CLI (120 of its 300 steps), then generate and export --merge
    with its adapter."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0")}
    out = ctx["scratch"] / "run"
    start = time.perf_counter()
    text = _cli("train", "--precision", path["precision"], "--output-dir", str(out), "--max-steps", "120", env=env)
    seconds = time.perf_counter() - start
    found = re.search(r"train loss: ([\d.]+) .* -> ([\d.]+)", text)
    match = re.search(r"held-out exact match .*: (\d+)% .* -> (\d+)%", text)
    if not found or not match:
        raise RuntimeError(f"train printed no loss or exact match: {text[-300:]}")
    answer = _cli("generate", "--adapter", str(out / "adapter"), "--prompt", "Reverse the word: stone", env=env)
    _cli("export", "--adapter", str(out / "adapter"), "--out", str(ctx["scratch"] / "merged"), "--merge",
         "--dtype", path["precision"], env=env)  # fmt: skip
    import transformers

    merged = transformers.AutoModelForCausalLM.from_pretrained(ctx["scratch"] / "merged")
    logits = merged(input_ids=torch.tensor([[1, 5, 9]])).logits
    if not torch.isfinite(logits).all():
        raise RuntimeError("the merged checkpoint gives non-finite logits")
    return {"losses": [float(found.group(1)), float(found.group(2))], "tokens_per_s": float("nan"),
            "note": f"exact match {match.group(1)}% -> {match.group(2)}%, generate: {answer.strip()[:20]!r}, "
                    f"export --merge loads ({seconds:.0f} s train)"}  # fmt: skip


def run_t4(path: dict, ctx: dict) -> dict:
    """The T4 recipe on one checkpoint: load (timed, host and GPU peaks), then --steps steps of the copy task."""
    from t4_recipe import AnonymousPeak, host_peak_gb

    from qlora_fsdp.model import load_model
    from qlora_fsdp.training import make_loop
    from qlora_fsdp.training.batches import FixedBatches

    start = time.perf_counter()
    with AnonymousPeak() as anon:
        model = load_model(ctx["checkpoints"][path["model"]], device=ctx["device"])  # dtype: fp16 where no bf16
    load_s, host_gb, load_gpu_gb = time.perf_counter() - start, host_peak_gb(), _peak_gb(ctx["device"])
    cfg = _train_config(path, ctx, ctx["scratch"] / "run", activation_checkpointing=True)
    batches = copy_task_batches(ctx["steps"] * cfg.grad_accum * ctx["world"], ctx["seq"], model.config.vocab_size)
    loop = make_loop(cfg, model=model, train_batches=FixedBatches(batches))
    if ctx["device"].startswith("cuda") and cfg.precision != "fp16":
        raise RuntimeError(f"--precision auto chose {cfg.precision} on an emulated T4 (expected fp16)")
    records = [r for r in loop.train() if "loss" in r]
    return {"losses": [r["loss"] for r in records], "tokens_per_s": _steady_tokens_per_s(records),
            "note": f"{cfg.precision}; load {load_s:.0f} s, host peak {anon.gb:.1f} GB anonymous ({host_gb:.1f} GB "
                    f"with mapped files), GPU peak after load {load_gpu_gb:.1f} GB"}  # fmt: skip


def run_generate(path: dict, ctx: dict) -> dict:
    """generate_speed.measure on the real model: NF4 once vs per token (same tokens) and vs dense (within 1.5x)."""
    from generate_speed import measure

    rows = {r["system"]: r for r in measure(ctx["real_model"], ctx["device"], path["precision"], 64,
                                            "The capital of France is")}  # fmt: skip
    once, per_token = rows["nf4, dequantized once"], rows["nf4, dequantized per token"]
    if not once["same_tokens_as_nf4_per_token"] or once["vs_dense"] < 1 / 1.5:
        raise RuntimeError(f"NF4 once at {once['vs_dense']:.2f}x dense (needs >= 0.67x), same tokens as per token: "
                           f"{once['same_tokens_as_nf4_per_token']}")  # fmt: skip
    bnb = rows.get("bitsandbytes nf4 (transformers)")
    note = (f"tokens/s: NF4 once {once['tokens_per_s']:.0f} ({once['vs_dense']:.2f}x dense), per token "
            f"{per_token['tokens_per_s']:.0f}" + (f", bnb {bnb['tokens_per_s']:.0f}" if bnb else ""))  # fmt: skip
    return {"losses": [0.0], "tokens_per_s": once["tokens_per_s"], "note": note}


def run_budget(path: dict, ctx: dict) -> dict:
    """--max-memory halfway between the predicted peaks of checkpointing every layer and of none (so the plan keeps
    some layers' activations): the loop's own check of the first step's peak against the prediction must be within
    10% (on a GPU; on CPU the plan runs unchecked)."""
    from qlora_fsdp.memory.budget import Setup, predict_peak
    from qlora_fsdp.training.loop import PEAK_TOLERANCE

    def peak(**options):
        setup = Setup(chunked_loss=True, **options)
        return predict_peak(ctx["config"], 1, ctx["seq"], setup, compiled=True)["total"]

    budget = (peak(activation_checkpointing=True) + peak()) / 2
    loop = _loop(path, ctx, ctx["scratch"] / "run", max_memory=f"{budget / 1e9:.4f}")
    records = [r for r in loop.train() if "loss" in r]
    result = {"losses": [r["loss"] for r in records], "tokens_per_s": _steady_tokens_per_s(records)}
    checked = next((r for r in records if "predicted_peak_gb" in r), None)
    chosen = f"ac_keep_layers {loop.cfg.ac_keep_layers} of {ctx['config'].num_hidden_layers}"
    if checked is None:
        return {**result, "note": f"{chosen}; predicted {loop.predicted_peak / 1e9:.2f} GB, not checked off a GPU"}
    off = checked["predicted_peak_gb"] / checked["peak_gb"] - 1
    note = f"{chosen}; step 1 peak {checked['peak_gb']:.2f} GB, predicted {checked['predicted_peak_gb']:.2f} ({off:+.1%})"
    if abs(off) > PEAK_TOLERANCE:
        raise RuntimeError(f"--max-memory: the prediction is off by more than {PEAK_TOLERANCE:.0%}: {note}")
    return {**result, "note": note}


RUNNERS = {"loop": run_loop, "resume": run_resume, "trainer": run_trainer, "sft": run_trainer, "cli": run_cli,
           "generate": run_generate, "t4": run_t4, "budget": run_budget}  # fmt: skip


def run_path(path: dict, ctx: dict) -> dict:
    """One path on this worker: the runner's result plus this rank's peak GPU memory; raises on failure."""
    import gc

    import torch._dynamo

    torch._dynamo.reset()  # every path compiles afresh (Dynamo's recompile limit counts per code object)
    if ctx["device"].startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(ctx["device"])
    result = RUNNERS[path["kind"]](path, ctx)
    result["peak_gb"] = _peak_gb(ctx["device"])
    if not result["losses"] or not all(math.isfinite(x) for x in result["losses"]):
        raise RuntimeError(f"non-finite or missing losses: {result['losses']}")
    gc.collect()
    return result
