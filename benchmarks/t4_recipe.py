"""The 2x T4 recipe emulated on bigger GPUs: `python benchmarks/gpu_gate.py --emulate t4`.

Emulated: QLORA_FSDP_CUDA_CAPABILITY=7.5 in every worker (the package takes a T4's paths: `--precision auto` picks
fp16, the fused LoRA kernels stop at rank 16), each process capped at CAP_GB of GPU memory
(torch.cuda.set_per_process_memory_fraction), fp16. Not emulated: a T4's speed, PCIe between the GPUs.

The model: Llama-3.1-8B's shape (--layers of its 32 decoder layers; all 32 by default in this mode) with random
weights, written to disk twice before the workers start (write_checkpoints):
    16bit/  bf16 safetensors shards, as `meta-llama/Llama-3.1-8B` ships (load_model quantizes to NF4 as it streams)
    bnb4/   the same weights as a bitsandbytes 4-bit checkpoint (`unsloth/...-bnb-4bit`'s format): the NF4 bytes
            quantize_nf4 gives on the GPU, so both load to the same NF4 model and train to the same losses
Paths (gate_runs.run_t4): t4/1gpu/bnb4 (the reference: 2 batches a step), t4/2gpu/bnb4 and t4/2gpu/16bit (FSDP2, a
batch per rank and step), --steps steps of 1 x --seq tokens, activation checkpointing, LoRA r=16 on all 7
projections. Each reports its per-GPU peak memory and the host's peak memory (RSS) while loading.
"""

from __future__ import annotations

import json
import resource
from pathlib import Path

import torch

CAP_GB = 15.0  # of a T4's 16 GB, what a process can use
CAPABILITY = "7.5"
SHARD_BYTES = 4 << 30


def t4_paths() -> list[dict]:
    """The emulation's paths, in the gate's path format (gpu_gate.gate_paths)."""
    common = {"kind": "t4", "precision": "auto", "steps": 5, "tol": 1e-3}  # auto: fp16 on an (emulated) T4
    return [
        {**common, "name": "t4/1gpu/bnb4", "gpus": 1, "accum": 2, "ref": None, "model": "bnb4", "options": {}},
        {**common, "name": "t4/2gpu/bnb4", "gpus": 2, "accum": 1, "ref": "t4/1gpu/bnb4", "model": "bnb4", "options": {}},
        {**common, "name": "t4/2gpu/16bit", "gpus": 2, "accum": 1, "ref": "t4/1gpu/bnb4", "model": "16bit",
         "options": {}},
    ]  # fmt: skip


def cap_memory(device: str) -> None:
    """Let this process use at most CAP_GB of the GPU (allocations past it raise out-of-memory, as on a T4)."""
    from common import cap_gpu_memory

    cap_gpu_memory(CAP_GB, device)


class AnonymousPeak:
    """The peak of this process's anonymous resident memory (RssAnon: what it holds itself, page cache of mapped
    checkpoint files excluded) while the block runs, sampled every `every` seconds by a thread; `.gb` after it."""

    def __init__(self, every: float = 0.02):
        import threading

        self.every, self.gb, self._stop = every, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def _rss_anon_gb() -> float:
        gb = proc_status_gb("RssAnon")
        return float("nan") if gb is None else gb

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.gb = max(self.gb, self._rss_anon_gb())
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.gb = max(self.gb, self._rss_anon_gb())


def host_peak_gb() -> float:
    """This process's peak resident memory so far: VmHWM of /proc/self/status (the pages of memory-mapped checkpoint
    files it touched included). Not ru_maxrss: a spawned process inherits its parent's (the gate's, which wrote the
    checkpoints) across fork and exec."""
    gb = proc_status_gb("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9 if gb is None else gb  # None: not Linux


def proc_status_gb(key: str) -> float | None:
    """A memory figure of this process from /proc/self/status (`key`, e.g. RssAnon or VmHWM, in kB there) in GB;
    None where the file or the key is missing (not Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return None


def _tensors(config, device: str):
    """(name, bf16 tensor on `device`) for every weight of a random Llama of `config`, one at a time (seeded by
    position, so both checkpoints hold the same values)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    for i, (name, p) in enumerate(meta.state_dict().items()):
        g = torch.Generator(device).manual_seed(i)
        if name.endswith("norm.weight"):
            yield name, torch.ones(p.shape, dtype=torch.bfloat16, device=device)
        else:
            yield name, (torch.randn(p.shape, generator=g, device=device) * 0.02).to(torch.bfloat16)


def _write_shards(entries, out: Path) -> None:
    """safetensors shards of at most SHARD_BYTES and their index, as transformers writes them."""
    from safetensors.torch import save_file

    shards, current, size = [], {}, 0
    for name, t in entries:
        if current and size + t.numel() * t.element_size() > SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[name] = t.detach().to("cpu", copy=True).contiguous()  # own storage: quant maps are shared
        size += t.numel() * t.element_size()
        if size >= SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
    if current:
        shards.append(current)
    weight_map = {}
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, file)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def write_checkpoints(config, root: Path, device: str = "cuda:0", formats: tuple[str, ...] = ("16bit", "bnb4")
                      ) -> dict[str, str]:  # fmt: skip
    """The 16-bit, bnb-4bit and/or "nf4grid16" (`formats`) checkpoints of one random model under `root` (kept: written
    once per root). nf4grid16 is 16-bit with every decoder linear replaced by its NF4 weight dequantized: the
    bnb-4bit checkpoint's model for a system that quantizes its own base (torchtune), whose requantization then
    changes little. Streamed: one tensor at a time on `device`, one shard (SHARD_BYTES) at a time on the host."""
    from qlora_fsdp.nf4 import quantize_nf4
    from qlora_fsdp.nf4.bnb import nf4_to_state_dict
    from qlora_fsdp.nf4.tensor import NF4Tensor

    dirs = {f: root / f for f in formats}
    if all((d / "model.safetensors.index.json").is_file() and (d / "config.json").is_file() for d in dirs.values()):
        return {k: str(v) for k, v in dirs.items()}
    linears = (".q_proj.", ".k_proj.", ".v_proj.", ".o_proj.", ".gate_proj.", ".up_proj.", ".down_proj.")
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    config.dtype = torch.bfloat16
    if "16bit" in dirs:
        config.save_pretrained(dirs["16bit"])
        _write_shards(_tensors(config, device), dirs["16bit"])
    is_linear = lambda name: ".layers." in name and any(x in name for x in linears)  # noqa: E731
    if "nf4grid16" in dirs:
        config.save_pretrained(dirs["nf4grid16"])
        _write_shards(((name, NF4Tensor(quantize_nf4(t), t.dtype).dequantize() if is_linear(name) else t)
                       for name, t in _tensors(config, device)), dirs["nf4grid16"])  # fmt: skip
    if "bnb4" not in dirs:
        return {k: str(v) for k, v in dirs.items()}

    def quantized():
        for name, t in _tensors(config, device):
            if is_linear(name):
                yield from nf4_to_state_dict(quantize_nf4(t), name).items()
            else:
                yield name, t

    _write_shards(quantized(), dirs["bnb4"])
    config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                  "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "float16",
                                  "bnb_4bit_quant_storage": "uint8"}  # fmt: skip
    config.save_pretrained(dirs["bnb4"])
    return {k: str(v) for k, v in dirs.items()}
