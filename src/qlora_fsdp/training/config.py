"""TrainConfig: every option of a run, and its validation (one-line TrainError that names the fix)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

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
    activation_checkpointing: bool = False  # recompute each decoder layer in backward (memory/)
    ac_keep_layers: int = 0  # with it: the last N layers keep their activations (faster, more memory)
    offload_activations: bool = False  # with it: the checkpointed layers' inputs wait in pinned host memory (1 GPU)
    embedding_on_cpu: bool = False  # the frozen input embedding in host memory, lookups on the CPU (1 GPU)
    keep_dequantized: bool = False  # NF4 linears keep the forward's dequantized weight for backward (nf4/linear.py)
    mlp_chunk_tokens: int = 0  # >0: the MLPs run N tokens at a time, each chunk recomputed in backward (memory/)
    compile: bool = False  # torch.compile every decoder layer (fullgraph) and the loss: see compile.py
    compile_backend: str = "inductor"  # inductor | aot_eager | eager
    compile_mode: str = ""  # inductor's mode: "" (its default) | max-autotune-no-cudagraphs | max-autotune | ...
    chunked_loss: bool = False  # lm_head + cross-entropy in chunks, no (B, T, V) logits (memory/; not --pp)
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
        from ..parallel.pipeline import COMPILED_ZERO_BUBBLE, SCHEDULES, ZERO_BUBBLE

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
