"""Where a training step makes the host wait for the GPU (GPU only): each synchronizing CUDA call of one step, by
Python call site.

    python tools/find_syncs.py [--system ours_compiled_chunked/activation_checkpointing=0] [--shape 1x2048]
                               [--config tiny]

Every such call (a blocking device-to-host copy, `.item()`, a pageable host-to-device copy, an explicit synchronize)
drains the GPU's queue: the GPU then idles until the host has launched the next kernels. The step runs twice to warm
up (compilation), then once under `torch.cuda.set_sync_debug_mode("warn")`; the warnings are grouped by the
innermost frames of our code, transformers, peft and torch.
"""

from __future__ import annotations

import argparse
import collections
import sys
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from train_step import build_system, make_batch, sync, tiny_config  # noqa: E402

from qlora_fsdp.parallel.sizing import llama_3_1_8b_config  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--system", default="ours_compiled_chunked/activation_checkpointing=0")
    p.add_argument("--shape", default="1x2048")
    p.add_argument("--config", choices=["llama-3.1-8b", "tiny"], default="tiny")
    args = p.parse_args()
    config = llama_3_1_8b_config() if args.config == "llama-3.1-8b" else tiny_config()
    step = build_system(args.system, config, args)
    b, t = (int(x) for x in args.shape.split("x"))
    batch = make_batch(config, b, t)
    for _ in range(2):
        step(batch)
    sync()
    sites = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" not in str(message):
            return
        frames = [f for f in traceback.extract_stack()[:-1] if "warnings.py" not in f.filename]
        ours = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames
                if any(k in f.filename for k in ("qlora_fsdp", "transformers", "peft", "torch", "benchmarks"))]
        sites[" < ".join(reversed(ours[-4:]))] += 1

    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        step(batch)
        torch.cuda.set_sync_debug_mode(0)
    total = sum(sites.values())
    print(f"{args.system}, {args.shape} ({args.config}): {total} synchronizing calls in one step")
    for site, n in sites.most_common(30):
        print(f"{n:>5}  {site}")


if __name__ == "__main__":
    main()
