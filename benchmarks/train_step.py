"""One QLoRA training step on the Llama-3.1-8B shape: ours against transformers + peft + bitsandbytes, same run.

    python benchmarks/train_step.py [--shapes 1x2048,4x2048,1x8192] [--systems ours,ours_compiled,hf_peft_bnb,
                                    ours_chunked,ours_compiled_chunked]
                                    [--longest] [--fits N,...] [--config tiny]

A system of ours takes TrainConfig options after slashes: `ours_compiled_chunked/ac_keep_layers=8`,
`ours_compiled_chunked/offload_activations=1` (what `qlora-fsdp train --ac-keep-layers 8` runs).

Both models have the same random weights, quantized to NF4 on the GPU one linear at a time (nothing downloaded,
no 16-bit model materialized); the baseline holds them in bitsandbytes `Linear4bit` modules (the modules
transformers' bitsandbytes integration puts there), bit-identical to ours. Both: LoRA r=16, alpha 32 on all 7
projections (peft), activation checkpointing, SDPA, gradients clipped to norm 1.0 and AdamW without weight decay
(Trainer's defaults), bf16 autocast, labels on every token. Ours is the
`TrainLoop.train_step` a `qlora-fsdp train` run executes (`ours_compiled`: with `--compile`; `*_chunked`: with
`--chunked-loss`); the baseline is `model(input_ids, labels).loss.backward()`, the clip
and `AdamW.step()`, what `Trainer` does per step.

Per system and batch x sequence: tokens/s, peak GPU memory (torch.cuda.max_memory_allocated over the timed steps,
model included), the ratio to the baseline, and model-FLOPs utilisation from the FLOPs a LoRA step needs
(common.lora_step_flops_per_token: no weight gradient for the frozen base):

    FLOPs/token = 4 N + 6 L T q + 6 r (in + out) per LoRA linear     N = parameters of the base matmuls
    MFU         = FLOPs/token * tokens/s / 989 TFLOP/s (H100/H200 dense bf16 peak)
    of dense    = the same over the ~790 TFLOP/s that dense bf16 matmuls reach on an H200 (device notes)

The old figure, 6 N + 6 L T d as for full finetuning, is kept beside it as `mfu_6n` (it overstates a LoRA step).

--longest finds the longest sequence at batch 1 that fits, per system (doubling from --longest-start, then
bisection to 1024, within --longest-budget-s); --fits 399360 tries one step at each given batch-1 length.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_results, environment, lora_step_flops_per_token, parse_shapes  # noqa: E402

from qlora_fsdp.model import quantizable_linears, random_model  # noqa: E402
from qlora_fsdp.parallel.sizing import llama_3_1_8b_config  # noqa: E402

PEAK_FLOPS = 989e12  # H100 / H200 SXM dense bf16
DENSE_MATMUL_FLOPS = 790e12  # what large dense bf16 matmuls reach on an H200 (the device tool's H200 notes)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: a smoke test of the script with --config tiny
# every system's optimizer, Trainer's defaults: AdamW without weight decay, gradients clipped to norm 1.0 (with AdamW
# a clip changes the update from the second step on: it rescales each step's gradient by its own factor)
LR, WEIGHT_DECAY, MAX_GRAD_NORM = 1e-4, 0.0, 1.0


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def peak_gb() -> float:
    return torch.cuda.max_memory_allocated() / 1e9 if DEVICE == "cuda" else float("nan")


def reset_peak():
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


def tiny_config():
    import transformers

    return transformers.LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=65536)  # fmt: skip


def full_finetune_flops_per_token(config, seq: int) -> float:
    """6N + 6LTd: a full finetuning step's FLOPs, which overstate a LoRA step's (kept as `mfu_6n`)."""
    model_params = config.num_hidden_layers * (
        config.hidden_size * (config.hidden_size + 2 * config.num_key_value_heads * config.head_dim)  # q, k, v
        + config.num_attention_heads * config.head_dim * config.hidden_size  # o
        + 3 * config.hidden_size * config.intermediate_size  # gate, up, down
    ) + config.vocab_size * config.hidden_size  # fmt: skip
    return 6 * model_params + 6 * config.num_hidden_layers * seq * config.hidden_size


class Repeat:
    """The loop's batch source: one batch, forever."""

    def __init__(self, batch):
        self.batch = batch

    def __len__(self):
        return 1

    def __iter__(self):
        yield self.batch


def ours(config, args, compile=False, chunked=False, model=None, **options):
    """Our TrainLoop.train_step on an NF4 model (eager, or with compile_model: regional torch.compile): `model`, or a
    random one of `config`; `options`: more TrainConfig fields."""
    from qlora_fsdp.training import TrainConfig, TrainLoop

    if model is None:
        model = random_model(config, dtype=torch.bfloat16, device=DEVICE, seed=0)
    options = {"activation_checkpointing": True, "compile": compile, "chunked_loss": chunked, "device": DEVICE,
               **options}  # fmt: skip
    options = {"weight_decay": WEIGHT_DECAY, "max_grad_norm": MAX_GRAD_NORM, **options}
    cfg = TrainConfig(output_dir=tempfile.mkdtemp(), precision="bf16", lora_r=16, lora_alpha=32, lr=LR,
                      warmup_steps=0, max_steps=10**6, progress=False, **options)  # fmt: skip
    loop = TrainLoop(cfg, model=model, train_batches=Repeat(None))

    def step(batch):
        loop.batches, loop._stream = Repeat(batch), None
        return loop.train_step()["loss"]

    step.loop = loop  # for benchmarks/profile_step.py's memory phases
    return step


def hf_bnb(config, args):
    """transformers + peft + bitsandbytes: the same NF4 bytes in bnb Linear4bit modules."""
    import bitsandbytes as bnb
    import peft

    from qlora_fsdp.nf4.bnb import nf4_to_bnb

    model = random_model(config, dtype=torch.bfloat16, device=DEVICE, seed=0)
    for name, lin in quantizable_linears(model).items():
        packed, qs = nf4_to_bnb(lin.weight.nf4)
        new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.bfloat16,
                                quant_type="nf4", device=DEVICE)  # fmt: skip
        new.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=qs, blocksize=qs.blocksize,
                                       compress_statistics=True, quant_type="nf4", bnb_quantized=True, module=new)  # fmt: skip
        parent, _, attr = name.removesuffix(".weight").rpartition(".")
        setattr(model.get_submodule(parent), attr, new)
    model.is_loaded_in_4bit = True
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(0)
    lora = peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lora)
    model.train()
    return manual_step([p for p in model.parameters() if p.requires_grad],
                       lambda batch: model(input_ids=batch["input_ids"].to(DEVICE), labels=batch["labels"].to(DEVICE),
                                           use_cache=False).loss)  # fmt: skip


def manual_step(params, loss_of, autocast: bool = True, max_grad_norm: float = MAX_GRAD_NORM):
    """A step as Trainer does it: forward (under bf16 autocast), backward, gradients clipped to `max_grad_norm`
    (0: not clipped), AdamW, zero_grad -> `step(batch) -> loss`."""
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)

    def step(batch):
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
            loss = loss_of(batch)
        loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return step


SYSTEMS = {"ours": ours, "ours_compiled": lambda config, args, **o: ours(config, args, compile=True, **o),
           "hf_peft_bnb": hf_bnb, "ours_chunked": lambda config, args, **o: ours(config, args, chunked=True, **o),
           "ours_compiled_chunked": lambda config, args, **o: ours(config, args, compile=True, chunked=True, **o)}  # fmt: skip


def build_system(spec: str, config, args):
    """`name[/field=value...]`: SYSTEMS[name], given TrainConfig fields typed from their defaults."""
    from dataclasses import fields

    from qlora_fsdp.training import TrainConfig

    name, *opts = spec.split("/")
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    options = {}
    for opt in opts:
        key, _, value = opt.partition("=")
        kind = type(defaults[key])
        options[key] = value not in ("0", "false", "False") if kind is bool else kind(value)
    return SYSTEMS[name](config, args, **options)


def make_batch(config, b: int, t: int) -> dict:
    ids = torch.randint(0, config.vocab_size, (b, t), generator=torch.Generator().manual_seed(b * t))
    return {"input_ids": ids, "labels": ids.clone()}


def free_memory(between_systems: bool = False):
    if between_systems:  # the next system's model: its own compiled graphs, not 8 systems' worth per code object
        torch._dynamo.reset()
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def time_shape(step, config, b, t, warmup, iters) -> dict:
    batch = make_batch(config, b, t)
    try:
        first = [step(batch) for _ in range(warmup)][:1]  # the loss before any update: the model's math alone
        sync()
        reset_peak()
        start = time.perf_counter()
        for _ in range(iters):
            loss = step(batch)
        sync()
        seconds = (time.perf_counter() - start) / iters
    except torch.OutOfMemoryError:
        free_memory()
        return {"oom": True}
    tok_s = b * t / seconds
    return {"tokens_per_s": tok_s, "step_s": seconds, "peak_gb": peak_gb(),
            "mfu": lora_step_flops_per_token(config, t) * tok_s / PEAK_FLOPS,
            "of_dense": lora_step_flops_per_token(config, t) * tok_s / DENSE_MATMUL_FLOPS,
            "mfu_6n": full_finetune_flops_per_token(config, t) * tok_s / PEAK_FLOPS, "loss": loss,
            "first_loss": first[0] if first else None}  # fmt: skip


def fits(step, config, t) -> bool:
    start = time.perf_counter()
    try:
        step(make_batch(config, 1, t))
        sync()
        ok = True
    except torch.OutOfMemoryError:
        free_memory()
        ok = False
    if DEVICE == "cuda":  # pinned host blocks of offloaded activations: cached per size, freed between probes
        getattr(torch._C, "_host_emptyCache", lambda: None)()
    print(f"  batch 1 x {t}: {'fits' if ok else 'out of memory'} ({time.perf_counter() - start:.0f} s)", flush=True)
    return ok


def longest(step, config, start: int, cap: int, budget_s: float) -> tuple[int, bool]:
    """(the longest batch-1 sequence found that trains, multiple of 1024 up to cap; whether the search finished):
    doubling from `start`, then bisection to 1024 tokens, within `budget_s` seconds. Not finished: a lower bound."""
    deadline = time.monotonic() + budget_s
    ok, bad = 0, None
    t = start
    while t <= cap and time.monotonic() < deadline:
        if not fits(step, config, t):
            bad = t
            break
        ok, t = t, t * 2
    if bad is None:
        return ok, t > cap
    while bad - ok > 1024 and time.monotonic() < deadline:
        mid = (ok + bad) // 2 // 1024 * 1024
        ok, bad = (mid, bad) if fits(step, config, mid) else (ok, mid)
    return ok, bad - ok <= 1024


def longest_tokens(row: dict) -> str:
    """A longest_seq_batch1 row's value in words, saying where the search's time ran out (a lower bound)."""
    more = "" if row.get("longest_search_finished", True) else " or more (the search ran out of time)"
    return f"{row['longest_seq_batch1']:,} tokens{more}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="1x2048,4x2048,1x8192")
    p.add_argument("--systems", default="ours,hf_peft_bnb")
    p.add_argument("--config", choices=["llama-3.1-8b", "tiny"], default="llama-3.1-8b")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--longest", action="store_true")
    p.add_argument("--longest-start", type=int, default=8192)
    p.add_argument("--longest-cap", type=int, default=262144)
    p.add_argument("--longest-budget-s", type=float, default=150)
    p.add_argument("--fits", default="", help="comma-separated batch-1 lengths: whether one step of each trains")
    args = p.parse_args()
    config = llama_3_1_8b_config() if args.config == "llama-3.1-8b" else tiny_config()
    shapes = parse_shapes(args.shapes)
    env = environment()
    rows = []
    for name in args.systems.split(","):
        free_memory(between_systems=True)
        reset_peak()
        start = time.perf_counter()
        step = build_system(name, config, args)
        label = name
        print(f"{label}: model ready in {time.perf_counter() - start:.0f} s, "
              f"{torch.cuda.memory_allocated() / 1e9 if DEVICE == 'cuda' else float('nan'):.2f} GB", flush=True)  # fmt: skip
        for b, t in shapes:
            r = {"system": label, "batch": b, "seq": t, **time_shape(step, config, b, t, args.warmup, args.iters)}
            print(r, flush=True)
            rows.append(r)
        if args.longest:
            n, finished = longest(step, config, args.longest_start, args.longest_cap, args.longest_budget_s)
            rows.append({"system": label, "longest_seq_batch1": n, "longest_search_finished": finished})
            print(rows[-1], flush=True)
        for t in filter(None, args.fits.split(",")):
            reset_peak()
            start = time.perf_counter()
            ok = fits(step, config, int(t))
            rows.append({"system": label, "fits_seq_batch1": int(t), "fits": ok,
                         "step_s": time.perf_counter() - start, "peak_gb": peak_gb()})  # fmt: skip
            print(rows[-1], flush=True)
        # system by system: a cut-off session keeps what finished
        append_results([{**env, "bench": "train_step", "config": args.config, **r} for r in rows if r["system"] == label])
        del step
    base = {(r["batch"], r["seq"]): r for r in rows if r["system"] == "hf_peft_bnb" and "tokens_per_s" in r}
    print(f"\n{config.num_hidden_layers} layers, hidden {config.hidden_size}, vocab {config.vocab_size}; "
          f"{env['gpu']}, torch {env['torch']}")  # fmt: skip
    width = max([18] + [len(r["system"]) + 2 for r in rows])
    print(f"{'system':<{width}}{'shape':>10}{'tokens/s':>11}{'x base':>8}{'peak GB':>9}{'x base':>8}{'MFU':>7}"
          f"{'of dense':>9}{'6N MFU':>8}")  # fmt: skip
    for r in rows:
        if "batch" not in r:
            continue
        shape = f"{r['batch']}x{r['seq']}"
        if r.get("oom"):
            print(f"{r['system']:<{width}}{shape:>10}{'OOM':>11}")
            continue
        ref = base.get((r["batch"], r["seq"]))
        speed = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}" if ref else "-"
        mem = f"{r['peak_gb'] / ref['peak_gb']:.2f}" if ref else "-"
        print(f"{r['system']:<{width}}{shape:>10}{r['tokens_per_s']:>11,.0f}{speed:>8}{r['peak_gb']:>9.1f}{mem:>8}"
              f"{r['mfu']:>7.1%}{r['of_dense']:>9.1%}{r['mfu_6n']:>8.1%}")  # fmt: skip
    eager = {(r["batch"], r["seq"]): r for r in rows if r["system"] == "ours" and "tokens_per_s" in r}
    for r in rows:
        e = eager.get((r.get("batch"), r.get("seq")))
        if r["system"] == "ours_compiled" and e and "tokens_per_s" in r:
            print(f"compiled / eager, {r['batch']}x{r['seq']}: {r['tokens_per_s'] / e['tokens_per_s']:.2f}x tokens/s, "
                  f"peak {r['peak_gb']:.1f} vs {e['peak_gb']:.1f} GB, loss after the same steps {r['loss']:.4f} vs {e['loss']:.4f}")  # fmt: skip
    for r in rows:
        if "longest_seq_batch1" in r:
            print(f"longest batch-1 sequence, {r['system']}: {longest_tokens(r)}")
        if "fits_seq_batch1" in r:
            print(f"batch 1 x {r['fits_seq_batch1']:,}, {r['system']}: {'fits' if r['fits'] else 'out of memory'}"
                  f" (peak {r['peak_gb']:.1f} GB, {r['step_s']:.0f} s)")  # fmt: skip


if __name__ == "__main__":
    main()
