"""One torchrun worker of `qlora-fsdp train` with its GPU memory capped, writing its memory peaks.

    torchrun --nproc-per-node 2 benchmarks/capped_cli.py --cap-gb 24 --peaks-dir DIR -- train --model ... --nproc 2

Before the CLI starts, the worker caps its GPU (cuda:LOCAL_RANK) at --cap-gb with
torch.cuda.set_per_process_memory_fraction (an allocation past it raises out-of-memory, as on a smaller GPU), and a
thread samples its host memory (RssAnon: what the process holds itself; the page cache of the memory-mapped
checkpoint, shared by the ranks, is not counted). At the end DIR/peaks-<rank>.json holds
{rank, cap_gb, gpu_peak_gb (allocated), gpu_reserved_gb, host_anon_gb, host_hwm_gb (VmHWM, mapped files included),
rc, wall_s (the CLI's whole run: loading, sharding, training, saving)}. On a CPU run (--device cpu, gloo) there is nothing to cap; the host peaks are still written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str] | None = None) -> int:
    import torch

    from common import cap_gpu_memory
    from t4_recipe import AnonymousPeak, host_peak_gb

    from qlora_fsdp.cli import main as cli_main

    argv = sys.argv[1:] if argv is None else argv
    ours, cli_args = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cap-gb", type=float, default=0.0, help="GPU memory cap per process in GB (0: none)")
    p.add_argument("--peaks-dir", required=True, help="where peaks-<rank>.json goes")
    args = p.parse_args(ours)
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device_option = argparse.ArgumentParser(add_help=False)  # the CLI's --device: "cpu" makes a gloo run
    device_option.add_argument("--device", default="cuda")
    on_gpu = torch.cuda.is_available() and not device_option.parse_known_args(cli_args)[0].device.startswith("cpu")
    device = torch.device("cuda", local) if on_gpu else torch.device("cpu")
    cap_gpu_memory(args.cap_gb, device)
    rc, start = 1, time.perf_counter()
    with AnonymousPeak() as anon:
        try:
            rc = cli_main(cli_args)
        finally:
            peaks = {"rank": rank, "cap_gb": args.cap_gb if on_gpu else None, "rc": rc,
                     "gpu_peak_gb": torch.cuda.max_memory_allocated(device) / 1e9 if on_gpu else None,
                     "gpu_reserved_gb": torch.cuda.max_memory_reserved(device) / 1e9 if on_gpu else None}  # fmt: skip
    peaks |= {"host_anon_gb": anon.gb, "host_hwm_gb": host_peak_gb(), "wall_s": time.perf_counter() - start}
    Path(args.peaks_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.peaks_dir) / f"peaks-{rank}.json").write_text(json.dumps(peaks))
    return rc


if __name__ == "__main__":
    sys.exit(main())
