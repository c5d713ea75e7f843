"""The single-process QLoRA training loop.

    loop = TrainLoop(TrainConfig(...))      # loads the model (NF4 base), adds LoRA, tokenizes the data
    records = loop.train()                  # per-step metrics; adapter, metrics.jsonl and loss.png in output_dir

Per optimizer step it takes `grad_accum` batches and normalises by the label tokens of all of them:

    loss = sum over the step's batches and tokens of CE(token) / (label tokens in the step)

(the normalisation transformers' Trainer uses, with `num_items_in_batch`), so a step's loss does not depend
on how its tokens are split into batches. AdamW on the LoRA parameters only, linear warmup + cosine decay,
gradient clipping, bf16/fp16 autocast (fp16 with a gradient scaler), activation checkpointing.

Checkpoints (`output_dir/checkpoint-<step>/`) hold the adapter in PEFT format and `trainer_state.pt`: optimizer,
scheduler, scaler, RNG states, the data position and the metrics so far; they are written atomically, and
`resume=True` continues from the newest one on the same loss curve.
"""

from __future__ import annotations

import json
import math
import random
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .checkpoint import atomic_dir, atomic_write_text, latest_checkpoint, prune_checkpoints
from .parallel.fsdp import fsdp_policies, set_accumulating

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class TrainError(ValueError):
    """A training setup that cannot run; the message names the fix."""


@dataclass
class TrainConfig:
    model: str = "embedded"  # a Hugging Face id, a local directory, or "embedded" (the shipped tiny model)
    dataset: str = "embedded"  # a datasets name, a local .jsonl/.json/.parquet/.csv, or "embedded"
    split: str = "train"
    eval_dataset: str | None = None  # default: the embedded held-out set when dataset == "embedded"
    eval_split: str = "train"
    output_dir: str = "runs/qlora"
    # data
    max_length: int = 512
    batch_size: int = 8  # examples per batch (padded batches)
    packing: bool = False  # padding-free packing into rows of max_tokens
    max_tokens: int = 2048  # tokens per packed row
    group_by_length: bool = True
    completion_only: bool = True
    # LoRA
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"
    use_rslora: bool = False
    # optimisation
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    max_steps: int = 0  # 0: epochs * steps per epoch
    epochs: float = 1.0
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    precision: str = "bf16"  # bf16 | fp16 | fp32
    activation_checkpointing: bool = False  # recompute each decoder layer in backward (activation_checkpointing.py)
    ac_keep_layers: int = 0  # with it: the last N layers keep their activations (faster, more memory)
    offload_activations: bool = False  # with it: the checkpointed layers' inputs wait in pinned host memory (1 GPU)
    embedding_on_cpu: bool = False  # the frozen input embedding in host memory, lookups on the CPU (1 GPU)
    keep_dequantized: bool = False  # NF4 linears keep the forward's dequantized weight for backward (nf4/linear.py)
    mlp_chunk_tokens: int = 0  # >0: the MLPs run N tokens at a time, each chunk recomputed in backward (chunked_mlp.py)
    compile: bool = False  # torch.compile every decoder layer (fullgraph) and the loss: see compile.py
    compile_backend: str = "inductor"  # inductor | aot_eager | eager
    compile_mode: str = ""  # inductor's mode: "" (its default) | max-autotune-no-cudagraphs | max-autotune | ...
    chunked_loss: bool = False  # lm_head + cross-entropy in chunks, no (B, T, V) logits (chunked_loss.py; not --pp)
    loss_chunk_tokens: int = 0  # with it: tokens per chunk; 0: about 2^26 logits (512 tokens for Llama 3)
    # FSDP2 (several processes)
    nproc: int = 1  # processes to start (the CLI starts them; torchrun works as well)
    fsdp_mixed_precision: bool = True  # MixedPrecisionPolicy: params in the compute dtype, fp32 gradient reduction
    cpu_offload: bool = False  # CPUOffloadPolicy: sharded parameters, gradients and optimizer states on the host
    # pipeline parallelism (parallel/pipeline.py): nproc = pp stages x data-parallel (FSDP2) replicas
    pp: int = 1  # pipeline stages (ranks per pipeline)
    pp_schedule: str = "1f1b"  # gpipe | 1f1b | interleaved_zb | zbv (the last two: 2 stages per rank)
    pp_microbatches: int = 0  # microbatches per step and replica; 0: grad_accum, or 2 x pp if grad_accum < pp
    pp_layers: str = ""  # decoder layers per stage, e.g. "3,5"; "": balanced by count
    pp_report: bool = False  # time every stage pass: step time and idle share per rank (pp_report.json)
    seed: int = 0
    # bookkeeping
    log_every: int = 1
    eval_every: int = 0  # 0: at the start and the end only
    save_every: int = 0  # 0: at the end only
    keep_checkpoints: int = 2
    resume: bool = False
    device: str | None = None
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        if self.precision not in PRECISIONS:
            raise TrainError(f"--precision {self.precision}: choose one of {', '.join(PRECISIONS)}")
        for name in ("batch_size", "max_length", "grad_accum", "lora_r", "max_tokens"):
            if getattr(self, name) < 1:
                raise TrainError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if self.packing and self.max_tokens < self.max_length:
            raise TrainError(f"--max-tokens {self.max_tokens} < --max-length {self.max_length}: raise --max-tokens")
        if self.ac_keep_layers < 0:
            raise TrainError(f"--ac-keep-layers must be at least 0 (got {self.ac_keep_layers})")
        if (self.ac_keep_layers or self.offload_activations) and not self.activation_checkpointing:
            flag = "--offload-activations" if self.offload_activations else "--ac-keep-layers"
            raise TrainError(f"{flag} applies to checkpointed layers: add --activation-checkpointing")
        for flag in ("offload_activations", "embedding_on_cpu"):
            if getattr(self, flag) and (self.nproc > 1 or self.pp > 1):
                raise TrainError(f"--{flag.replace('_', '-')} runs on one GPU: drop it, or --nproc / --pp")
        if self.compile_mode and (self.compile_mode not in COMPILE_MODES or self.compile_backend != "inductor"):
            raise TrainError(f"--compile-mode {self.compile_mode}: one of {', '.join(COMPILE_MODES)}, with the "
                             "inductor backend")  # fmt: skip
        if self.mlp_chunk_tokens < 0:
            raise TrainError(f"--mlp-chunk-tokens must be at least 0 (got {self.mlp_chunk_tokens})")
        if self.loss_chunk_tokens < 0 or (self.loss_chunk_tokens and not self.chunked_loss):
            raise TrainError(f"--loss-chunk-tokens {self.loss_chunk_tokens}: a positive chunk size, with --chunked-loss")
        if self.chunked_loss and self.pp > 1:
            raise TrainError("--chunked-loss does not run with --pp yet: drop one of them")
        if self.pp > 1:
            self._validate_pipeline()

    def microbatches(self) -> int:
        """Pipeline microbatches a step and replica: --pp-microbatches, else grad_accum if that is at least pp
        (each batch one microbatch), else 2 x pp (the batches' rows split evenly)."""
        if self.pp_microbatches:
            return self.pp_microbatches
        return self.grad_accum if self.grad_accum >= self.pp else 2 * self.pp

    def _validate_pipeline(self) -> None:
        from .parallel.pipeline import COMPILED_ZERO_BUBBLE, SCHEDULES, ZERO_BUBBLE

        if self.pp_schedule not in SCHEDULES:
            raise TrainError(f"--pp-schedule {self.pp_schedule}: choose one of {', '.join(SCHEDULES)}")
        if self.nproc > 1 and self.nproc % self.pp:
            raise TrainError(f"--nproc {self.nproc} is not a multiple of --pp {self.pp}: the ranks form pp x dp")
        if self.precision == "fp16":
            raise TrainError("--precision fp16 with --pp: the fp16 overflow check does not span stages; use bf16")
        if self.packing:
            raise TrainError("--packing with --pp: a pipeline needs padded batches of one shape; drop --packing")
        if self.compile and self.pp_schedule in ZERO_BUBBLE:
            raise TrainError(f"--pp-schedule {self.pp_schedule}: {COMPILED_ZERO_BUBBLE}")
        mb = self.microbatches()
        if (self.grad_accum * self.batch_size) % mb:
            raise TrainError(f"--pp-microbatches {mb} does not divide a step's {self.grad_accum * self.batch_size} "
                             "rows per replica (grad_accum x batch_size)")  # fmt: skip
        if mb < self.pp:
            raise TrainError(f"{mb} microbatches a step for --pp {self.pp} leave stages idle: raise --grad-accum "
                             f"or --pp-microbatches to at least {self.pp}")  # fmt: skip


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover
        pass


def rng_state() -> dict:
    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    except ImportError:  # pragma: no cover
        return float("nan")


def add_lora(model, cfg: TrainConfig):
    """peft LoRA on the NF4 model; adapters in fp32 (peft upcasts them), base frozen; the LoRA scaling applied on
    the rank side (lora_linear.py)."""
    import peft

    from .lora_linear import register_rank_scaled_lora

    lora = peft.LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, use_rslora=cfg.use_rslora,
        target_modules=cfg.target_modules, task_type="CAUSAL_LM",
    )  # fmt: skip
    register_rank_scaled_lora(lora)
    try:
        with warnings.catch_warnings():  # peft asks transformers 5.2x for a deprecated flag; nothing for users to do
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
            return peft.get_peft_model(model, lora)
    except ValueError as e:
        if "not found in the base model" in str(e) or "Target modules" in str(e):
            names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
            raise TrainError(f"target_modules {cfg.target_modules!r} match no layer: use 'all-linear' or some of "
                             f"{', '.join(names)}") from None  # fmt: skip
        raise


class TrainLoop:
    def __new__(cls, cfg: TrainConfig, *args, **kwargs):
        if cfg.pp > 1 and cls is TrainLoop:  # TrainLoop(cfg) with cfg.pp > 1 runs the pipeline loop
            from .train_pipeline import PipelineTrainLoop

            return super().__new__(PipelineTrainLoop)
        return super().__new__(cls)

    def __init__(self, cfg: TrainConfig, model=None, tokenizer=None, train_batches=None, eval_batches=None):
        cfg.validate()
        self.cfg = cfg
        self.device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = PRECISIONS[cfg.precision]
        self.out = Path(cfg.output_dir)
        seed_everything(cfg.seed)
        if train_batches is None:  # data first: a wrong path or field fails before a big model loads
            from .batches import build_batches, load_tokenizer

            tokenizer = tokenizer or load_tokenizer(cfg.model)
            train_batches, eval_batches = build_batches(cfg, tokenizer)
        self.batches, self.eval_batches = train_batches, eval_batches
        if model is None:
            from .model import load_model

            model = load_model(cfg.model, dtype=self.dtype, device=self.device)
        self.tokenizer = tokenizer
        self.model = add_lora(model, cfg)
        from .nf4.linear import keep_dequantized

        keep_dequantized(cfg.keep_dequantized)  # process-wide: the loop's setting holds for its model
        from .lora_swiglu import patch_lora_swiglu

        # on CUDA, the MLPs' LoRA terms inside the SwiGLU kernels (lora_swiglu.py); with checkpointing, where memory
        # is the point, without the down projection's lora_A (one (T, I) tensor less at the backward peak)
        patch_lora_swiglu(self.model, fuse_down_a=not cfg.activation_checkpointing)
        self.rank, self.world = _rank_and_world()
        if cfg.activation_checkpointing:
            self._checkpoint_layers()
        if cfg.mlp_chunk_tokens:
            from .chunked_mlp import chunk_mlps

            try:
                chunk_mlps(self.model, cfg.mlp_chunk_tokens)
            except ValueError as e:
                raise TrainError(f"--mlp-chunk-tokens: {e}") from None
        if (cfg.offload_activations or cfg.embedding_on_cpu) and self.world > 1:
            raise TrainError("--offload-activations and --embedding-on-cpu run on one GPU: drop them, or start one "
                             "process")  # fmt: skip
        if cfg.embedding_on_cpu:
            from .cpu_embedding import embedding_on_cpu

            try:
                embedding_on_cpu(self.model)
            except ValueError as e:
                raise TrainError(f"--embedding-on-cpu: {e}") from None
        self.replicas, self.replica = self.world, self.rank  # data-parallel replicas (each runs grad_accum batches
        # a step) and this rank's index among them
        from .compile import token_loss_sum

        self._loss_sum = token_loss_sum
        if cfg.compile:
            from .compile import compile_loss

            self._loss_sum = compile_loss(backend=cfg.compile_backend)
        self._parallelize()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # one process on a GPU: AdamW's fused kernel (one launch for all LoRA tensors instead of ~10 per tensor)
        fused = self.device.type == "cuda" and self.world == 1 and cfg.pp == 1
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)
        steps_per_epoch = max(1, len(self.batches) // (cfg.grad_accum * self.replicas))
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
        from transformers import get_cosine_schedule_with_warmup

        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, min(cfg.warmup_steps, self.total_steps),
                                                         self.total_steps)  # fmt: skip
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        self.step = 0
        self._train_mode = False  # whether the loop has put the model in training mode (and not left it since)
        self.records: list[dict] = []
        self._stream = None

    def _checkpoint_layers(self) -> None:
        """Activation checkpointing: reentrant in one process (less host time a step), torch's non-reentrant form
        under FSDP2 and in pipelines (whose split backward needs it)."""
        from .activation_checkpointing import checkpoint_layers
        from .model import decoder_layers

        cfg, n = self.cfg, len(decoder_layers(self.model))
        if cfg.ac_keep_layers > n:
            raise TrainError(f"--ac-keep-layers {cfg.ac_keep_layers}: the model has {n} decoder layers")
        checkpoint_layers(self.model, keep_last=cfg.ac_keep_layers, offload=cfg.offload_activations,
                          reentrant=self.world == 1 and cfg.pp == 1)  # fmt: skip

    def _parallelize(self) -> None:
        """FSDP2 over all ranks (several processes), then torch.compile of the layers (--compile)."""
        cfg = self.cfg
        if self.world > 1:
            from .parallel import apply_fsdp

            apply_fsdp(self.model, **self._fsdp_policies())
        if cfg.compile:  # after checkpointing and FSDP2 (their hooks stay around the compiled layers)
            self._compile_layers()

    def _compile_layers(self) -> None:
        from .compile import compile_model

        cfg = self.cfg
        # chunked MLPs run their chunk loop outside the graph: one break a layer (chunked_mlp.py)
        compile_model(self.model, backend=cfg.compile_backend, mode=cfg.compile_mode or None,
                      fullgraph=not cfg.mlp_chunk_tokens)  # fmt: skip

    def _fsdp_policies(self) -> dict:
        """FSDP2's mixed-precision and CPU-offload policies for this run's options."""
        cfg = self.cfg
        return fsdp_policies(self.dtype if cfg.fsdp_mixed_precision else None, cpu_offload=cfg.cpu_offload,
                             pin_memory=self.device.type == "cuda")  # fmt: skip

    # -- batches ------------------------------------------------------------------------------------------
    def _next_batch(self) -> dict:
        if self._stream is None:
            self._stream = iter(self.batches)
        try:
            return next(self._stream)
        except StopIteration:  # the batcher starts its next epoch
            self._stream = iter(self.batches)
            return next(self._stream)

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}

    @staticmethod
    def label_tokens(batch: dict) -> int:
        labels = batch["labels"]
        return int((labels[:, 1:] != -100).sum())  # the first position is never predicted

    def _autocast(self):
        enabled = self.cfg.precision != "fp32"
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=enabled)

    def _forward_loss_sum(self, batch: dict) -> torch.Tensor:
        """Sum of token cross-entropies of one batch (fp32)."""
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        with self._autocast():
            if self.cfg.chunked_loss:  # the lm_head inside the loss, a chunk of tokens at a time
                from .chunked_loss import causal_lm_loss_sum

                return causal_lm_loss_sum(self.model, labels=batch["labels"], chunk_tokens=self.cfg.loss_chunk_tokens or None,
                                          **inputs)  # fmt: skip
            logits = self.model(**inputs, use_cache=False).logits  # (B, T, V)
        return self._loss_sum(logits, batch["labels"])

    # -- one optimizer step -------------------------------------------------------------------------------
    def train_step(self) -> dict:
        if not self._train_mode:  # model.train() walks every module: 5-10 ms a step for an 8B peft model
            self.model.train()
            self._train_mode = True
        batches = [self._next_batch() for _ in range(self.cfg.grad_accum * self.replicas)]
        n_tokens = sum(self.label_tokens(b) for b in batches)
        if n_tokens == 0:
            raise TrainError("a step without any label token: check --completion-only and the dataset fields")
        # the loss and the norm stay on the device until the optimizer step is queued: no wait for the GPU before
        # then, so the host queues clipping and AdamW while the GPU is still in backward
        total = self._forward_backward(batches, n_tokens)
        grad_norm = self._clip_gradients()
        lr = self.scheduler.get_last_lr()[0]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        tokens = sum(int(b["input_ids"].numel()) for b in batches)
        return {"step": self.step, "loss": float(total), "lr": lr, "grad_norm": float(grad_norm),
                "label_tokens": n_tokens, "tokens": tokens}  # fmt: skip

    def _forward_backward(self, batches: list[dict], n_tokens: int) -> torch.Tensor:
        """Gradients of the step's loss (its `n_tokens` label tokens) into the parameters; the loss (fp64, on the
        device: reading it waits for the GPU).

        Every rank reads the whole step (grad_accum batches per rank) and works on its share: batches rank,
        rank + world, ...; the divisor is the step's label tokens over all ranks, and the factor `world` undoes
        FSDP's gradient averaging, so the step equals one process running all the batches."""
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        mine = batches[self.rank :: self.world]
        for i, b in enumerate(mine):
            if self.world > 1:  # FSDP2: reduce-scatter and reshard once, after the step's last microbatch
                set_accumulating(self.model, i < len(mine) - 1)
            loss = self._forward_loss_sum(self._to_device(b)) / n_tokens
            self.scaler.scale(loss * self.world).backward()
            total += loss.detach().double()
        return self._sum_over_ranks(total)

    def _clip_gradients(self) -> torch.Tensor | float:
        """Unscale (fp16) and clip the gradients to cfg.max_grad_norm; their norm before clipping (a device scalar)."""
        # fp16 under FSDP2: the gradients are DTensors, and DTensor all-reduces unscale_'s found-inf flag, so every
        # rank skips the step when any rank's shard overflowed (tests/parallel: test_fp16_overflow_on_one_rank...)
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm or float("inf"))
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    @torch.no_grad()
    def evaluate(self) -> dict:
        if self.eval_batches is None:
            return {}
        self.model.eval()
        self._train_mode = False
        batches = list(self.eval_batches)
        n = sum(self.label_tokens(b) for b in batches)
        loss_sum = torch.zeros((), dtype=torch.float64)
        rounds = -(-len(batches) // self.replicas)  # every replica runs as many forwards (collectives)
        for i in range(self.replica, rounds * self.replicas, self.replicas):
            s = self._eval_loss_sum(self._to_device(batches[i % len(batches)]))
            if s is not None and i < len(batches):
                loss_sum += s.double().cpu()
        loss_sum = self._sum_over_ranks(loss_sum)
        return {"eval_loss": float(loss_sum) / max(n, 1), "eval_tokens": n}

    def _eval_loss_sum(self, batch: dict) -> torch.Tensor | None:
        """Sum of token cross-entropies of one held-out batch (None on a rank that does not see the loss)."""
        return self._forward_loss_sum(batch)

    def _sum_over_ranks(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of x over all ranks (on the device when there are several)."""
        if self.world > 1:
            x = x.to(self.device)
            torch.distributed.all_reduce(x)
        return x

    # -- checkpoints --------------------------------------------------------------------------------------
    # Checkpoints: `checkpoint-<step>/` holds the adapter in PEFT format (for users), `dcp/` with the LoRA weights
    # and AdamW states written by torch.distributed.checkpoint (sharded under FSDP2, and loadable on any number of
    # ranks: the base is never in it), and `trainer_state.pt` (step, scheduler, scaler, RNG, data position,
    # metrics). Written into `checkpoint-<step>.tmp` and renamed when whole.
    def _trainable_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        lora = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        return {"lora": lora, "optim": get_optimizer_state_dict(self.model, self.optimizer)}

    def _barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def save_checkpoint(self) -> Path:
        import shutil

        import torch.distributed.checkpoint as dcp

        final, tmp = self.out / f"checkpoint-{self.step}", self.out / f"checkpoint-{self.step}.tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._barrier()
        with warnings.catch_warnings():  # one process: DCP's "assuming ... a single process" is what we mean
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
            dcp.save(self._trainable_state(), checkpoint_id=str(tmp / "dcp"))
        lora = self.lora_state_dict() if self.world > 1 else None  # a collective under FSDP
        if self.rank == 0:
            self._save_adapter(tmp, lora)
            state = {
                "step": self.step, "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "rng": rng_state(), "data": self.batches.state_dict(), "records": self.records,
                "config": asdict(self.cfg), "world_size": self.world,
            }  # fmt: skip
            torch.save(state, tmp / "trainer_state.pt")
            with atomic_dir(final) as staging:  # replace a same-named older checkpoint whole
                staging.rmdir()
                tmp.rename(staging)
            prune_checkpoints(self.out, self.cfg.keep_checkpoints)
        self._barrier()
        return final

    def load_checkpoint(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        state = torch.load(path / "trainer_state.pt", weights_only=False, map_location="cpu")
        trainable = self._trainable_state()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
            dcp.load(trainable, checkpoint_id=str(path / "dcp"))  # LoRA weights in place, resharded to this world size
        set_optimizer_state_dict(self.model, self.optimizer, trainable["optim"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.batches.load_state_dict(state["data"])
        self._stream = None
        set_rng_state(state["rng"])
        self.step, self.records = state["step"], state["records"]

    def lora_state_dict(self) -> dict:
        """The trainable (LoRA) weights, whole, on CPU; under FSDP gathered from the shards (never the base)."""
        from .parallel.fsdp import full_lora_state_dict

        return full_lora_state_dict(self.model)

    def _save_adapter(self, directory: Path, lora: dict | None) -> None:
        """The adapter in PEFT format (adapter_config.json, adapter_model.safetensors); `lora`: gathered weights."""
        self.model.save_pretrained(directory, state_dict=lora)

    def save_final(self) -> None:
        lora = self.lora_state_dict() if self.world > 1 else None  # a collective: every rank takes part
        if self.rank != 0:
            return
        with atomic_dir(self.out / "adapter") as tmp:
            self._save_adapter(tmp, lora)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp)
        lines = "".join(json.dumps(r) + "\n" for r in self.records)
        atomic_write_text(self.out / "metrics.jsonl", lines)
        from .plot import plot_loss

        plot_loss(self.records, self.out / "loss.png")

    # -- the run ------------------------------------------------------------------------------------------
    def train(self, stop_at: int | None = None) -> list[dict]:
        """Run to the end (or stop after step `stop_at` as if interrupted: no final save)."""
        cfg = self.cfg
        if cfg.resume and (ckpt := latest_checkpoint(self.out)) is not None:
            self.load_checkpoint(ckpt)
            print(f"resumed from {ckpt} at step {self.step}")
        if self.step == 0:
            self.records.append({"step": 0, **self.evaluate()})
        bar = None
        if cfg.progress and self.rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc="train", dynamic_ncols=True)
        start, tokens = time.perf_counter(), 0
        while self.step < self.total_steps:
            if stop_at is not None and self.step >= stop_at:
                return self.records
            rec = self.train_step()
            tokens += rec["tokens"]
            elapsed = time.perf_counter() - start
            rec.update(tokens_per_s=tokens / elapsed, mem_gb=memory_gb(self.device), elapsed_s=elapsed)
            last = self.step == self.total_steps
            if (cfg.eval_every and self.step % cfg.eval_every == 0) or last:
                rec.update(self.evaluate())
            self.records.append(rec)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}",
                                mem=f"{rec['mem_gb']:.2f}GB")  # fmt: skip
            if (cfg.save_every and self.step % cfg.save_every == 0) or last:
                self.save_checkpoint()
        if bar is not None:
            bar.close()
        self.save_final()
        return self.records
