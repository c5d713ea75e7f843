"""The GPU gate: every user-facing path on GPUs, one PASS/FAIL line each, in one command.

    python benchmarks/gpu_gate.py [--layers 4] [--seq 2048] [--steps 6] [--only REGEX] [--config llama-3.1-8b|tiny]
                                  [--real-model SmolLM2-135M-Instruct.Q4_1.gguf] [--emulate t4] [--deadline S]

The model has the Llama-3.1-8B layer widths (hidden 4,096, MLP 14,336, 32 / 8 heads, vocabulary 128,256: every
kernel runs at its real size) with --layers decoder layers of random NF4 weights; LoRA r=16 on all 7 projections;
batches of 1 x --seq tokens of a copy task (gate_runs.py). Paths:
    1 GPU      every README recipe in bf16 and fp16 (default, --compile, --chunked-loss, fastest, leanest,
               --mlp-chunk-tokens, --ac-keep-layers), resume, the CLI (train, generate, export --merge on the GPU),
               and the references of the 2-GPU paths (fp32, 4 batches a step, Trainer, SFTTrainer)
    widths     SmolLM2-135M's (576 x 576, tied embeddings) on 1 GPU and on 2 (NF4 shards that split quant groups)
    real       with --real-model (a GGUF file or checkpoint of SmolLM2-135M-Instruct, pretrained weights, all 30
               layers, loaded by load_model): training on 1 GPU and on 2, and greedy generation speed, NF4 dequantized
               once against per token and against the dense model (benchmarks/generate_speed.py)
    2 GPUs     --nproc 2: bf16, fp16 and fp32 (FSDP2 mixed precision), CPU offload, checkpointing, 2-step
               accumulation, compile + chunked loss + checkpointing, Trainer and SFTTrainer with shard_for_trainer;
               --nproc 2 --pp 2: every schedule, 1F1B with --compile, 1F1B and ZBV in fp16
    4 GPUs     --nproc 4 (FSDP2) and --nproc 4 --pp 2 (2 stages x 2 FSDP2 replicas) with every schedule, against 1 GPU
               with 4 batches a step
    --emulate t4: instead of all of the above, the 2x T4 recipe on 8B-shape checkpoints under a 15 GB cap per process,
               the package told every GPU is sm75 (t4_recipe.py)
Checks: every loss finite; where a path promises equality, its per-step losses against its reference's: 2 GPUs vs 1
(same global batch) over the first 5 steps within 1e-3 relative in bf16 / fp16 and 1e-4 in fp32, the pipeline
schedules within 1e-3, resume against the uninterrupted run, compiled against eager on the first step within 1e-2.

The 1-GPU paths are spread over two worker processes, one a GPU (both on GPU 0 of a one-GPU machine); the 2-GPU paths
run in one pair of ranks beside them, on the same GPUs (--phases: after them, and one worker on a one-GPU machine, so
that tokens/s are a GPU's alone); the 4-GPU paths run after all of
them. A path that raises, or runs past --path-timeout, is FAIL; its worker is restarted for the paths after it. Paths
that need more GPUs than the machine has are listed as not run (--cpu: 4 gloo processes stand for 4 GPUs). Prints one line per path, then "gate: N/M passed", and
appends the rows to benchmarks/results.jsonl ($QLORA_RESULTS).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_results, environment  # noqa: E402
from gate_workers import WorkerGroup, merge, model_config, run_groups  # noqa: E402

LEAN = {"compile": True, "chunked_loss": True, "activation_checkpointing": True, "offload_activations": True,
        "embedding_on_cpu": True}  # fmt: skip
RECIPES = {  # the README's one-GPU command lines
    "default": {},
    "compile": {"compile": True},
    "chunked-loss": {"chunked_loss": True},
    "fastest": {"compile": True, "chunked_loss": True, "keep_dequantized": True},
    "leanest": LEAN,
    "mlp-chunks": {**LEAN, "mlp_chunk_tokens": 512},
    "ac-keep-layers": {"activation_checkpointing": True, "ac_keep_layers": 1},
}
TOL = {"bf16": 1e-3, "fp16": 1e-3, "fp32": 1e-4}
COMPILED_FIRST_STEP = 1e-2


def gate_paths() -> list[dict]:
    """Every path: name, gpus, kind, precision, options, accum; ref / tol / steps (compared) where it promises
    equality with another path's losses."""
    paths = []

    def add(name, gpus=1, kind="loop", precision="bf16", accum=2, ref=None, tol=None, steps=5, model=None, **options):
        paths.append({"name": name, "gpus": gpus, "kind": kind, "precision": precision, "accum": accum,
                      "options": options, "ref": ref, "tol": tol, "steps": steps, "model": model})  # fmt: skip

    for prec in ("bf16", "fp16"):
        base = f"1gpu/default/{prec}"
        for recipe, options in RECIPES.items():
            compiled = options.get("compile", False)
            ref = None if recipe == "default" else base
            add(f"1gpu/{recipe}/{prec}", precision=prec, ref=ref, tol=COMPILED_FIRST_STEP if compiled else TOL[prec],
                steps=1 if compiled else 5, **options)  # fmt: skip
    add("1gpu/default/fp32", precision="fp32")
    add("1gpu/accum4/bf16", accum=4)
    add("1gpu/accum4/fp16", accum=4, precision="fp16")
    add("1gpu/resume/bf16", kind="resume", ref="1gpu/default/bf16", tol=TOL["bf16"], steps=6)
    add("1gpu/trainer/bf16", kind="trainer")
    # the README's Trainer recipe + qlora_fsdp.fuse_lora: our LoRA layers and fused SwiGLU in place of peft's
    add("1gpu/trainer-fused/bf16", kind="trainer", ref="1gpu/trainer/bf16", tol=TOL["bf16"], fuse_lora=True)
    # ... + the Trainer's own checkpointing and qlora_fsdp.compile_model: the fast Trainer recipe (its step host-bound
    # in eager at 1 x 2048: README)
    add("1gpu/trainer-compiled/bf16", kind="trainer", ref="1gpu/trainer-fused/bf16", tol=COMPILED_FIRST_STEP, steps=1,
        fuse_lora=True, gradient_checkpointing=True, compile_model=True)  # fmt: skip
    add("1gpu/sft/bf16", kind="sft")
    add("1gpu/cli-train-generate-export/bf16", kind="cli")
    add("1gpu/max-memory/bf16", kind="budget", compile=True)  # the planner's prediction within 10% of step 1's peak
    # the recomputation's dense weights kept for the checkpointed layer's backward (what --max-memory picks most)
    add("1gpu/ac-keep-dequantized/bf16", ref="1gpu/default/bf16", tol=COMPILED_FIRST_STEP, steps=1, compile=True,
        chunked_loss=True, activation_checkpointing=True, keep_dequantized=True)  # fmt: skip
    for prec in ("bf16", "fp16", "fp32"):
        add(f"2gpu/default/{prec}", gpus=2, precision=prec, accum=1, ref=f"1gpu/default/{prec}", tol=TOL[prec])
    two = {"gpus": 2, "accum": 1, "ref": "1gpu/default/bf16", "tol": TOL["bf16"]}
    add("2gpu/cpu-offload/bf16", cpu_offload=True, **two)
    add("2gpu/checkpointing/bf16", activation_checkpointing=True, **two)
    add("2gpu/accum2/bf16", **{**two, "accum": 2, "ref": "1gpu/accum4/bf16"})
    add("2gpu/compile-chunked-ac/bf16", compile=True, chunked_loss=True, activation_checkpointing=True,
        **{**two, "tol": COMPILED_FIRST_STEP, "steps": 1})  # fmt: skip
    add("2gpu/trainer/bf16", kind="trainer", **{**two, "ref": "1gpu/trainer/bf16"})
    add("2gpu/trainer-fused/bf16", kind="trainer", fuse_lora=True, **{**two, "ref": "1gpu/trainer-fused/bf16"})
    add("2gpu/sft/bf16", kind="sft", **{**two, "ref": "1gpu/sft/bf16"})
    # SmolLM2-135M's widths (576 x 576 projections, tied embeddings): row chunks that split quant groups, so the NF4
    # shards are windows of whole groups, zero-padded (nf4/sharding.py)
    add("1gpu/smollm2-widths/bf16", accum=2, model="smollm2-widths")
    add("2gpu/smollm2-widths/bf16", model="smollm2-widths", **{**two, "ref": "1gpu/smollm2-widths/bf16"})
    # fp32: a pretrained model's loss moves fast (6.0 -> 3.0 in 6 steps), so bf16 rounding between 1 and 2 GPUs
    # grows to 3e-3 by step 5; fp32 shows the sharding exact
    add("1gpu/smollm2-real/fp32", accum=2, model="real", precision="fp32")
    add("2gpu/smollm2-real/fp32", model="real", precision="fp32", **{**two, "ref": "1gpu/smollm2-real/fp32",
                                                                    "tol": TOL["fp32"]})  # fmt: skip
    add("1gpu/smollm2-real-generate/bf16", kind="generate", model="real")
    pp = {"gpus": 2, "accum": 4, "ref": "1gpu/accum4/bf16", "tol": TOL["bf16"], "pp": 2}
    for schedule in ("gpipe", "1f1b", "interleaved_zb", "zbv"):
        add(f"pp2/{schedule}/bf16", pp_schedule=schedule, **pp)
    add("pp2/1f1b-compile/bf16", pp_schedule="1f1b", compile=True, **{**pp, "tol": COMPILED_FIRST_STEP, "steps": 1})
    for schedule in ("1f1b", "zbv"):  # fp16: the loss scaled through the schedule, found-inf shared by the stages
        add(f"pp2/{schedule}/fp16", pp_schedule=schedule, precision="fp16", **{**pp, "ref": "1gpu/accum4/fp16"})
    four = {"gpus": 4, "ref": "1gpu/accum4/bf16", "tol": TOL["bf16"]}  # the same 4 batches a step as the reference
    add("4gpu/default/bf16", accum=1, **four)
    for schedule in ("gpipe", "1f1b", "interleaved_zb", "zbv"):  # 2 stages x 2 replicas, 2 microbatches a replica
        add(f"pp2x2/{schedule}/bf16", accum=2, pp=2, pp_schedule=schedule, **four)
    return paths


# -- the checks and the report --------------------------------------------------------------------------------------
def max_rel_diff(a: list[float], b: list[float], steps: int) -> float:
    n = min(steps, len(a), len(b))
    if n == 0:
        return float("inf")
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a[:n], b[:n]))


def verdict(path: dict, results: dict) -> tuple[bool, str]:
    """(passed, the check's words) of one path from all results (rank 0's losses; peaks over ranks)."""
    r = results[path["name"]]
    if r["status"] != "ok":
        return False, r["error"]
    if path["ref"] is None:
        return True, ""
    ref = results.get(path["ref"])
    if ref is None or ref["status"] != "ok":
        return False, f"reference {path['ref']} did not run"
    diff = max_rel_diff(r["losses"], ref["losses"], path["steps"])
    ok = diff <= path["tol"]
    return ok, f"vs {path['ref']} ({path['steps']} step{'s' * (path['steps'] > 1)}): max rel {diff:.1e} {'<=' if ok else '>'} {path['tol']:.0e}"


def one_gpu_shares(one: list[dict], gpus: int, phases: bool = False) -> list[tuple[int, list[dict]]]:
    """The 1-GPU paths as (GPU, paths in gate order) for two worker processes, heaviest paths first onto the lighter
    one (a compile, the CLI or generation weighs 3). On a one-GPU machine both share GPU 0: a path's compiles are host
    work, so two halve the gate's time, and its losses and peak memory stay its own (its tokens/s shares the GPU);
    with `phases` (tokens/s of a GPU alone) one worker there."""
    workers = max(1, min(1 if phases and gpus == 1 else 2, len(one)))
    weight = lambda x: 3 if x["options"].get("compile") or x["kind"] in ("cli", "generate", "t4") else 1  # noqa: E731
    shares: list[list[dict]] = [[] for _ in range(workers)]
    for x in sorted(one, key=weight, reverse=True):
        min(shares, key=lambda s: sum(map(weight, s))).append(x)
    return [(g % gpus, sorted(s, key=lambda x: x["index"])) for g, s in enumerate(shares) if s]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 4; 32 with --emulate t4)")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=None, help="steps a path (default 6; 20 with --emulate t4)")
    p.add_argument("--emulate", choices=["t4"], default=None, help="run the 2x T4 recipe emulated (t4_recipe.py)")
    p.add_argument("--t4-dir", default=str(Path(tempfile.gettempdir()) / "qlora_t4_checkpoints"),
                   help="where --emulate t4 writes its two checkpoints (about 22 GB at 32 layers)")
    p.add_argument("--only", default="", help="run the paths whose names match this regular expression (and their refs)")
    p.add_argument("--config", choices=["llama-3.1-8b", "llama-3.1-70b", "tiny"], default="llama-3.1-8b")
    p.add_argument("--cpu", action="store_true", help="a smoke test of the script on CPU processes (gloo)")
    p.add_argument("--real-model", default=os.environ.get("QLORA_GATE_REAL_MODEL", ""),
                   help="SmolLM2-135M-Instruct as a GGUF file or checkpoint directory: runs the real-model paths")
    p.add_argument("--path-timeout", type=float, default=240.0)
    p.add_argument("--deadline", type=float, default=None, help="seconds for all paths: those without a result then "
                   "are NOT RUN, the summary is still printed and the exit status is 1 (a device call's time limit)")
    p.add_argument("--phases", action="store_true", help="the 2-GPU paths after the 1-GPU ones (tokens/s of a GPU "
                   "alone; about 9 minutes on 2 H200s instead of 5-6)")  # fmt: skip
    args = p.parse_args()
    args.layers = args.layers or (32 if args.emulate else 4)
    args.steps = args.steps or (20 if args.emulate else 6)
    gpus = torch.cuda.device_count() if not args.cpu else 4
    checkpoints = None
    if args.emulate == "t4":
        from t4_recipe import CAPABILITY, t4_paths, write_checkpoints

        os.environ["QLORA_FSDP_CUDA_CAPABILITY"] = CAPABILITY  # the spawned workers import the package with it
        start = time.perf_counter()
        checkpoints = write_checkpoints(model_config(args.config, args.layers), Path(args.t4_dir),
                                        device="cpu" if args.cpu else "cuda:0")  # fmt: skip
        print(f"[gate] T4 checkpoints in {args.t4_dir} ({time.perf_counter() - start:.0f} s)", flush=True)
        paths = t4_paths()
    else:
        paths = gate_paths()
    for i, path in enumerate(paths):
        path["index"] = i
    if args.only:
        wanted = {x["name"] for x in paths if re.search(args.only, x["name"])}
        while refs := {x["ref"] for x in paths if x["name"] in wanted and x["ref"]} - wanted:  # refs of refs too
            wanted |= refs
        paths = [x for x in paths if x["name"] in wanted]
    elif args.cpu and not args.emulate:  # what runs fast on CPU processes
        paths = [x for x in paths if x["kind"] in ("loop", "resume") and not x["options"].get("compile")
                 and x["precision"] != "fp16"]  # fmt: skip
    real = ""
    if args.real_model:  # converted (a GGUF) once here, before the workers load it
        from qlora_fsdp.model import resolve_model_dir

        real = str(resolve_model_dir(args.real_model))
    skipped = {x["name"]: f"needs {x['gpus']} GPUs" for x in paths if x["gpus"] > gpus}
    skipped |= {x["name"]: "needs --real-model" for x in paths if x["model"] == "real" and not real}
    runnable = [x for x in paths if x["name"] not in skipped]
    out = Path(tempfile.mkdtemp(prefix="gpu_gate-"))
    wargs = {"config": args.config, "layers": args.layers, "seq": args.seq, "steps": args.steps, "cpu": args.cpu,
             "real_model": real, "emulate": args.emulate, "checkpoints": checkpoints}  # fmt: skip
    start = time.perf_counter()
    deadline = time.monotonic() + args.deadline if args.deadline else None
    one = [x for x in runnable if x["gpus"] == 1]
    groups = [WorkerGroup(1, gpu, share, wargs, out, args.path_timeout)
              for gpu, share in one_gpu_shares(one, gpus, args.phases)]  # fmt: skip
    two = [x for x in runnable if x["gpus"] == 2]
    cut = []
    if two and args.phases:  # the 2-GPU paths after the 1-GPU ones: no path shares a GPU with another
        cut = run_groups(groups, deadline)
        groups = []
    if two and cut:
        cut += two
    elif two:  # by default beside the 1-GPU workers, on the same GPUs: each path's losses and peak memory are its own,
        groups.append(WorkerGroup(2, 0, two, wargs, out, args.path_timeout))  # its tokens/s shares the GPU
    cut += run_groups(groups, deadline)
    four = [x for x in runnable if x["gpus"] == 4]
    if four and cut:
        cut += four
    elif four:  # after the others: ranks on GPUs 0-3, which the 1- and 2-GPU workers used
        cut += run_groups([WorkerGroup(4, 0, four, wargs, out, args.path_timeout)], deadline)
    seconds = time.perf_counter() - start
    skipped |= {x["name"]: f"not finished within --deadline {args.deadline:.0f} s" for x in cut}
    runnable = [x for x in runnable if x["name"] not in skipped]

    results = {x["name"]: merge(x, out, x["gpus"]) for x in runnable}
    env = {**environment(), "gpus": gpus, "bench": "gpu_gate", "layers": args.layers, "seq": args.seq,
           "config": args.config, "emulated_capability": os.environ.get("QLORA_FSDP_CUDA_CAPABILITY")}  # fmt: skip
    rows, passed = [], 0
    emulated = f" (emulating sm{env['emulated_capability']})" if env["emulated_capability"] else ""
    print(f"\n{env['gpu']} x {gpus}{emulated}, torch {env['torch']}, triton {env['triton']}, commit {env['commit']}; "
          f"Llama-3.1-8B widths, {args.layers} layers, 1 x {args.seq} a batch, {args.steps} steps, r=16")  # fmt: skip
    for path in paths:
        if path["name"] in skipped:
            print(f"NOT RUN {path['name']:<40} {skipped[path['name']]}")
            continue
        ok, check = verdict(path, results)
        passed += ok
        r = results[path["name"]]
        losses = r.get("losses") or [float("nan")]
        print(f"{'PASS' if ok else 'FAIL'}  {path['name']:<40} loss {losses[0]:7.4f} -> {losses[-1]:7.4f}  "
              f"{r.get('tokens_per_s', float('nan')):>8,.0f} tok/s  {r.get('peak_gb', float('nan')):6.1f} GB  "
              f"{r.get('seconds', float('nan')):5.0f} s  {check} {r.get('note', '')}".rstrip(), flush=True)  # fmt: skip
        rows.append({**env, "path": path["name"], "passed": ok, "check": check, "losses": r.get("losses"),
                     "tokens_per_s": r.get("tokens_per_s"), "peak_gb": r.get("peak_gb"), "seconds": r.get("seconds")})  # fmt: skip
    not_run = len(paths) - len(runnable)
    why = ", ".join(sorted(set(skipped.values())))
    summary = f"gate: {passed}/{len(runnable)} passed" + (f", {not_run} not run ({why})" if not_run else "")
    print(f"{summary} in {seconds:.0f} s")
    append_results([*rows, {**env, "summary": summary, "seconds": seconds}])
    return 0 if passed == len(runnable) and not cut else 1


if __name__ == "__main__":
    sys.exit(main())
