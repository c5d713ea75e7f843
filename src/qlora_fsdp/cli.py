"""The `qlora-fsdp` command (also `python -m qlora_fsdp`).

    qlora-fsdp train [options]                            QLoRA training; with no options: the embedded default
                                                          (a tiny Llama and a small task shipped in the package)
    qlora-fsdp generate --adapter DIR --prompt TEXT       answer with a trained adapter
    qlora-fsdp export --adapter DIR --out DIR --merge     a merged 16-bit transformers checkpoint
    qlora-fsdp dequant [--rows R --cols C --dtype bf16]   NF4 round trip: quantize, dequantize with the Triton
                                                          kernel (GPU, or the interpreter on CPU), check it
                                                          against the reference and bitsandbytes
"""

from __future__ import annotations

import argparse
import os
import sys
import time

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _dequant(args: argparse.Namespace) -> int:
    if args.rows < 1 or args.cols < 1:
        raise SystemExit(f"qlora-fsdp dequant: --rows and --cols must be positive (got {args.rows}x{args.cols})")
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: run the kernel on CPU
    from .nf4 import dequantize_nf4, dequantize_reference, nf4_to_bnb, quantize_nf4
    from .nf4.triton_dequant import triton_interpreting

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, DTYPES[args.dtype])
    torch.manual_seed(args.seed)
    weight = (torch.randn(args.rows, args.cols, device=device) * 0.02).to(dtype)
    w = quantize_nf4(weight)
    start = time.perf_counter()
    out = dequantize_nf4(w, dtype)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    ref = dequantize_reference(w, dtype)
    how = "Triton kernel" + (" (interpreter)" if triton_interpreting() and device == "cpu" else "")
    print(f"weight {args.rows}x{args.cols} {args.dtype} on {device}: {w.nbytes() / 2**20:.2f} MiB in NF4 "
          f"({weight.numel() * weight.element_size() / w.nbytes():.2f}x smaller)")  # fmt: skip
    print(f"dequantized by the {how} in {seconds * 1e3:.1f} ms; bit-exact with the reference: {torch.equal(out, ref)}")
    err = (out.float() - weight.float()).abs()
    print(f"quantization error: mean {err.mean():.2e}, max {err.max():.2e} (weights ~N(0, 0.02))")
    try:
        import bitsandbytes.functional as bnbF
    except ImportError:
        print("bitsandbytes not installed: skipping the comparison with it")
        return 0 if torch.equal(out, ref) else 1
    packed, qs = bnbF.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    same_bytes = torch.equal(packed.view(-1), w.data) and torch.equal(qs.absmax, w.absmax)
    theirs = nf4_to_bnb(w)
    theirs[1].dtype = dtype
    same_out = torch.equal(bnbF.dequantize_4bit(*theirs), out) if device == "cuda" else None
    print(f"bitsandbytes quantize_4bit gives the same bytes and absmax: {same_bytes}"
          + ("" if same_out is None else f"; its dequantize_4bit the same output: {same_out}"))  # fmt: skip
    return 0 if torch.equal(out, ref) and same_bytes and same_out is not False else 1


# Settings of the embedded default run that differ from the general defaults (a tiny random base learns at a
# higher rate); they apply when the model is the embedded one and the option is not given.
EMBEDDED_DEFAULTS = {"lr": 3e-3, "max_steps": 300, "batch_size": 16, "warmup_steps": 10, "lora_r": 16,
                     "lora_alpha": 32, "precision": "fp32", "group_by_length": False, "eval_every": 50}  # fmt: skip


def _add_config_options(p: argparse.ArgumentParser) -> None:
    """One option per TrainConfig field: --kebab-name, typed from its default, with its help text and choices."""
    from dataclasses import MISSING, fields

    from .training import TrainConfig

    for f in fields(TrainConfig):
        if "help" not in f.metadata:  # not an option (progress, extra)
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        shown = "''" if default == "" else default
        choices = f.metadata["choices"]  # listed, and checked by TrainConfig.validate (a one-line error, not usage)
        listed = f"one of {', '.join(repr(c) if c == '' else c for c in choices)}; " if choices else ""
        text = f"{f.metadata['help']} ({listed}default: {shown})".replace("%", "%%")  # argparse %-formats help
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            kind = type(default) if default is not None and f.name != "target_modules" else str
            p.add_argument(flag, type=kind, default=None, metavar=f.name.upper(), help=text)


def _train(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from .model import EMBEDDED
    from .training import TrainConfig

    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}
    if isinstance(given.get("target_modules"), str) and given["target_modules"] != "all-linear":
        given["target_modules"] = [m.strip() for m in given["target_modules"].split(",") if m.strip()]
    if given.get("model", EMBEDDED) == EMBEDDED:
        held_out = given.get("dataset", EMBEDDED) == EMBEDDED or any(
            given.get(k) for k in ("eval_dataset", "eval_split", "eval_fraction"))
        for k, v in EMBEDDED_DEFAULTS.items():
            if k == "eval_every" and not held_out:  # the embedded model on the user's data without held-out data
                continue
            given.setdefault(k, v)
    cfg = TrainConfig(**given)
    cfg.validate()  # bad options fail here, before any worker starts
    if cfg.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _launch_workers(cfg)
    with _ProcessGroup(cfg):
        _train_and_report(cfg)
    return 0


def _train_and_report(cfg) -> None:
    """Train; rank 0 prints the summary (and, on one process, the held-out exact match where answers exist)."""
    from .training import make_loop

    loop = make_loop(cfg)
    records = loop.train()
    if loop.rank != 0:
        return
    first = next((r for r in records if "eval_loss" in r), None)
    last = next((r for r in reversed(records) if "eval_loss" in r), None)
    train_losses = [r["loss"] for r in records if "loss" in r]
    if train_losses:
        k = max(1, len(train_losses) // 10)
        print(f"train loss: {sum(train_losses[:k]) / k:.4f} (first {k} steps) -> {sum(train_losses[-k:]) / k:.4f} (last {k})")
    if first is not None and last is not None and first is not last:
        print(f"held-out loss: {first['eval_loss']:.4f} (untrained adapter) -> {last['eval_loss']:.4f} (trained)")
    if cfg.compile:
        from .compile import compile_counts

        counts = compile_counts()
        print(f"torch.compile: {counts['graphs']} graphs compiled, {counts['graph_breaks']} graph breaks")
    if loop.world == 1:
        from .training.evaluate import report_exact_match

        report_exact_match(loop)
    print(f"adapter, metrics.jsonl and loss.png in {cfg.output_dir}")


def _launch_workers(cfg) -> int:
    """Start cfg.nproc training processes on this host (one per GPU, or gloo on CPU) and wait for them."""
    import socket

    import torch
    import torch.multiprocessing as mp

    if _on_gpus(cfg) and cfg.nproc > torch.cuda.device_count():
        from .training import TrainError

        raise TrainError(f"--nproc {cfg.nproc} but this machine has {torch.cuda.device_count()} GPU(s): lower --nproc")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # a worker that fails makes spawn stop the others and raise here: no rank is left waiting on it
    try:
        mp.spawn(_worker, args=(cfg, port), nprocs=cfg.nproc, join=True)
    except mp.ProcessRaisedException as e:
        last = [line for line in str(e).strip().splitlines() if line.strip()][-1]
        print(f"qlora-fsdp train: error: a worker failed, the run stopped: {last.strip()}", file=sys.stderr)
        return 2
    except mp.ProcessExitedException as e:
        print(f"qlora-fsdp train: error: a worker died ({e}); the run stopped: resume it with --resume", file=sys.stderr)
        return 2
    return 0


def _worker(rank: int, cfg, port: int) -> None:
    from .quiet import quiet_known_messages

    quiet_known_messages()  # a spawned process starts without the parent's filters
    import threading

    import tqdm

    # tqdm's default lock holds a multiprocessing semaphore, which os._exit below would leave for the parent's
    # resource tracker to report as leaked: a thread lock serves a process that prints its own bars
    tqdm.tqdm.set_lock(threading.RLock())
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(cfg.nproc), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    with _ProcessGroup(cfg):
        _train_and_report(cfg)
    # skip interpreter teardown, where a gloo thread sometimes aborts the process after all work is done and
    # written (torch 2.13, CPU): the run would be reported as failed
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _on_gpus(cfg) -> bool:
    """Whether the ranks of a run use GPUs: where there are any, unless --device cpu asks for the CPU."""
    import torch

    return torch.cuda.is_available() and not str(cfg.device or "").startswith("cpu")


class _ProcessGroup:
    """init_process_group from torchrun-style environment variables (NCCL on GPUs, gloo on CPU); yields the rank."""

    def __init__(self, cfg):
        self.cfg, self.active = cfg, int(os.environ.get("WORLD_SIZE", "1")) > 1

    def __enter__(self) -> int:
        if not self.active:
            return 0
        import datetime

        import torch
        import torch.distributed as dist

        from .parallel.cpu_threads import share_cpu_cores

        local = int(os.environ.get("LOCAL_RANK", "0"))
        share_cpu_cores(int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])))
        gpus = _on_gpus(self.cfg)
        if gpus:
            if not dist.is_nccl_available():
                from .training import TrainError

                raise TrainError("NCCL is not available in this torch build: install a CUDA build of torch")
            torch.cuda.set_device(local)
            self.cfg.device = f"cuda:{local}"
        else:
            self.cfg.device = "cpu"
        # NCCL for GPU tensors, gloo for CPU ones (a CPU tensor reduced on a GPU run goes over gloo)
        backend = "cuda:nccl,cpu:gloo" if gpus else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
        return dist.get_rank()

    def __exit__(self, *exc) -> None:
        if self.active:
            import torch.distributed as dist

            dist.destroy_process_group()


def _generate(args: argparse.Namespace) -> int:
    from .data import resolve_prompt_format, single_turn_prompt_ids, single_turn_text
    from .inference import dense_weights, greedy_answer, load_adapted

    model, tok = load_adapted(args.adapter, args.model, device=args.device)
    fmt = resolve_prompt_format(tok, "chat" if args.chat else "raw" if args.raw else args.prompt_format)
    ids = single_turn_prompt_ids(tok, single_turn_text(args.prompt, args.input or "", fmt), fmt)
    with dense_weights(model, merge=True):
        start = time.perf_counter()
        answer = greedy_answer(model, tok, ids, args.max_new_tokens)
        seconds = time.perf_counter() - start
    print(tok.decode(answer, skip_special_tokens=True))
    print(f"({len(answer)} tokens in {seconds:.2f} s, {len(answer) / seconds:.1f} tokens/s; prompt format {fmt})",
          file=sys.stderr)  # fmt: skip
    return 0


def _export(args: argparse.Namespace) -> int:
    from .training.checkpoint import atomic_dir

    if not args.merge:
        raise SystemExit("qlora-fsdp export: pass --merge (the adapter directory already is the PEFT export)")
    import torch

    from .inference import load_adapted

    model, tok = load_adapted(args.adapter, args.model, dense=True, dtype=args.dtype, device=args.device)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # no TF32 in W + s * B @ A
    try:
        merged = model.merge_and_unload()
    finally:
        torch.set_float32_matmul_precision(precision)
    with atomic_dir(args.out) as tmp:
        merged.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    print(f"merged 16-bit model written to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .data.formats import PROMPT_FORMATS

    parser = argparse.ArgumentParser(prog="qlora-fsdp", description="QLoRA finetuning with an NF4 base, on one GPU or many.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("train", help="train a LoRA adapter on an NF4 base (no options: the embedded default)")
    _add_config_options(p)
    p.set_defaults(func=_train)
    p = sub.add_parser("generate", help="answer a prompt with a trained adapter")
    p.add_argument("--adapter", required=True, help="adapter directory (e.g. runs/qlora/adapter)")
    p.add_argument("--prompt", required=True, help="the instruction (or raw text with --raw)")
    p.add_argument("--input", default="", help="optional input field of the instruction")
    p.add_argument("--model", default=None, help="base model (default: the one the adapter was trained on)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--prompt-format", choices=PROMPT_FORMATS, default="auto", help="as in training: the chat template, "
                   "the Alpaca template or the text as written; auto: chat where the tokenizer has a template")
    p.add_argument("--chat", action="store_true", help="--prompt-format chat: the prompt as a user turn of the chat template")
    p.add_argument("--raw", action="store_true", help="--prompt-format raw: send the prompt as it is")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    p.set_defaults(func=_generate)
    p = sub.add_parser("export", help="merge an adapter into its base and write a 16-bit transformers checkpoint")
    p.add_argument("--adapter", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--model", default=None)
    p.add_argument("--merge", action="store_true")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="dtype of the merged weights")
    p.add_argument("--device", default=None, help="where the base is quantized and merged (default: cuda if present; "
                   "NF4 codes follow bitsandbytes on that device, so use the device the adapter was trained on)")
    p.set_defaults(func=_export)
    p = sub.add_parser("dequant", help="NF4 round trip with the Triton dequantizer, checked against the references")
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--cols", type=int, default=512)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_dequant)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    from .data import DataError
    from .model import ModelLoadError
    from .nf4 import NF4FormatError
    from .training import TrainError

    return DataError, ModelLoadError, NF4FormatError, TrainError


def main(argv: list[str] | None = None) -> int:
    from .quiet import quiet_known_messages

    quiet_known_messages()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except _user_errors() as e:
        print(f"qlora-fsdp {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if type(e).__name__ == "OutOfMemoryError":
            print(f"qlora-fsdp {args.command}: error: out of GPU memory: lower --batch-size or --max-tokens, or pass "
                  "--activation-checkpointing", file=sys.stderr)  # fmt: skip
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
