"""The GPU gate's worker processes (benchmarks/gpu_gate.py holds the paths, the checks and the report): a
WorkerGroup runs a list of paths on `world` ranks (one process a GPU, or gloo processes on CPU), each rank writing
<index>.started and <index>-rank<r>.json per path into a shared folder that the parent polls; a rank that fails or
runs past the path timeout is restarted for the paths after it.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp

import common
from qlora_fsdp.training.checkpoint import atomic_write_text  # a temporary file of its own per call: ranks write one
# <index>.started at once, and the poller reads every file it sees (a plain write_text was seen half done in CI)


def model_config(name: str, layers: int, real_model: str = ""):
    """common.model_config's shapes, the pretrained model ("real", all of its layers) and SmolLM2-135M's widths."""
    import transformers

    if name == "real":
        return transformers.AutoConfig.from_pretrained(real_model)
    if name == "smollm2-widths":  # HuggingFaceTB/SmolLM2-135M's shapes, random weights
        return transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                                        num_key_value_heads=3, num_hidden_layers=layers, tie_word_embeddings=True)  # fmt: skip
    return common.model_config(name, layers)


# -- workers --------------------------------------------------------------------------------------------------------
def _worker(rank: int, world: int, port: int, gpu: int, paths: list[dict], args: dict, out: str) -> None:
    """Run `paths` in order on this rank; write <index>.started and <index>-rank<r>.json per path. Exit 1 at the first
    failure (the parent restarts the worker for the rest)."""
    from gate_runs import run_path

    out = Path(out)
    if world == 1 and not args["cpu"]:  # before CUDA starts: one process sees one GPU (a Trainer would otherwise
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)  # spread over all of them with nn.DataParallel)
        gpu = 0
    on_gpu = torch.cuda.is_available() and not args["cpu"]
    if on_gpu:
        torch.cuda.set_device(gpu + rank)
    device = f"cuda:{gpu + rank}" if on_gpu else "cpu"
    if on_gpu and args.get("emulate") == "t4":
        from t4_recipe import cap_memory

        cap_memory(device)
    if world > 1:
        import datetime

        import torch.distributed as dist

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                          WORLD_SIZE=str(world))  # fmt: skip
        dist.init_process_group("cuda:nccl,cpu:gloo" if on_gpu else "gloo", timeout=datetime.timedelta(seconds=300))
    ctx = {"seq": args["seq"], "steps": args["steps"], "device": device, "rank": rank, "world": world,
           "checkpoints": args.get("checkpoints")}  # fmt: skip
    for path in paths:
        idx = path["index"]
        atomic_write_text(out / f"{idx}.started", str(time.time()))
        shape = None if path["kind"] == "t4" else path["model"]  # a t4 path's "model" is its checkpoint's format
        ctx["config"] = model_config(shape or args["config"], args["layers"], args["real_model"])
        ctx["real_model"] = args["real_model"]
        ctx["scratch"] = Path(tempfile.mkdtemp(prefix=f"gate{idx}-"))
        start = time.perf_counter()
        try:
            result = {"status": "ok", **run_path(path, ctx)}
        except BaseException as e:  # noqa: BLE001 - report everything, then exit for a fresh process
            first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")  # the message's first line:
            result = {"status": "error", "error": f"{type(e).__name__}: {first}"[:400],  # Dynamo's last is boilerplate
                      "traceback": traceback.format_exc()[-4000:]}  # fmt: skip
        result["seconds"] = time.perf_counter() - start
        atomic_write_text(out / f"{idx}-rank{rank}.json", json.dumps(result))
        if result["status"] != "ok":
            print(f"[gate] {path['name']} rank {rank}: {result['traceback']}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(1)
    if world > 1:
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerGroup:
    """`world` processes (ranks) on GPUs gpu..gpu+world-1 running a list of paths; restarted after a failure."""

    def __init__(self, world: int, gpu: int, paths: list[dict], args: dict, out: Path, timeout: float):
        self.world, self.gpu, self.todo, self.args, self.out, self.timeout = world, gpu, list(paths), args, out, timeout
        self.procs: list = []
        self.restarts = 0  # restarts in a row that ran nothing
        self._start()

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        port = _free_port()
        self.procs = [ctx.Process(target=_worker, args=(r, self.world, port, self.gpu, self.todo, self.args, str(self.out)))
                      for r in range(self.world)]  # fmt: skip
        for p in self.procs:
            p.start()

    def _done(self, path: dict) -> bool:
        return all((self.out / f"{path['index']}-rank{r}.json").is_file() for r in range(self.world))

    def poll(self) -> bool:
        """Advance; False once every path has a result."""
        while self.todo and self._done(self.todo[0]):
            self._report(self.todo.pop(0))
        if not self.todo:
            self._stop()
            return False
        head = self.todo[0]
        started = self.out / f"{head['index']}.started"
        late = started.is_file() and time.time() - started_at(started) > self.timeout
        dead = all(p.exitcode is not None for p in self.procs) or any(p.exitcode not in (None, 0) for p in self.procs)
        if late or dead:
            self._stop()
            self.restarts = 0 if started.is_file() else self.restarts + 1
            if started.is_file() or self.restarts > 2:  # the path it was running fails (one not yet started runs in
                for r in range(self.world):  # the new workers, unless they keep dying before it): what a rank did
                    f = self.out / f"{head['index']}-rank{r}.json"  # not write itself
                    if not f.is_file():
                        why = (f"timed out after {self.timeout:.0f} s" if late else "its worker died (another rank "
                               "failed?)" if started.is_file() else "its workers died before starting it")  # fmt: skip
                        atomic_write_text(f, json.dumps({"status": "error", "error": why}))
                self._report(self.todo.pop(0))
            if self.todo:
                self._start()
        return bool(self.todo)

    def _report(self, path: dict) -> None:
        """A progress line as each path ends (what a run cut short still shows)."""
        r = merge(path, self.out, self.world)
        print(f"\n[gate] {path['name']}: {r['status']} in {r.get('seconds', float('nan')):.0f} s "
              f"{r.get('error', '')}".rstrip(), flush=True)  # fmt: skip

    def abandon(self) -> list[dict]:
        """Stop the workers; the paths left without a result (the running one included), which are no longer
        this group's."""
        self._stop()
        left, self.todo = self.todo, []
        return left

    def _stop(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
            p.join(5)


def run_groups(groups: list[WorkerGroup], deadline: float | None = None) -> list[dict]:
    """Run the groups until every path has a result, or until `deadline` (time.monotonic()): then their workers are
    stopped and the paths without a result returned (the one running among them included)."""
    while any([g.poll() for g in groups]):
        if deadline is not None and time.monotonic() > deadline:
            return [path for g in groups for path in g.abandon()]
        time.sleep(0.5)
    return []


def started_at(path: Path) -> float:
    """When a path started (time.time()), from its .started file; now if the file cannot be read whole (an empty
    read once counted as a start at 0, so a path 8 s old "timed out after 240 s" on a loaded CI machine)."""
    try:
        return float(path.read_text())
    except (OSError, ValueError):
        return time.time()


def merge(path: dict, out: Path, world: int) -> dict:
    ranks = []
    for r in range(world):
        f = out / f"{path['index']}-rank{r}.json"
        ranks.append(json.loads(f.read_text()) if f.is_file() else {"status": "error", "error": "no result"})
    bad = next((x for x in ranks if x["status"] != "ok"), None)
    if bad is not None:
        return {"status": "error", "error": bad.get("error", "failed")}
    first = ranks[0]
    return {**first, "peak_gb": max(x.get("peak_gb", float("nan")) for x in ranks)}
