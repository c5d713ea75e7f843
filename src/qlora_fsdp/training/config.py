"""TrainConfig: every option of a run, and its validation (one-line TrainError that names the fix)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

import torch

from ..data.formats import PROMPT_FORMATS
from ..memory.budget import AUTO_MARGIN, PLAN_MARGIN
from ..model import EMBEDDED
from ..parallel.pipeline import SCHEDULES

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# FSDP2's CPU offload keeps its sharded state on the host: a run with no data-parallel ranks has none (it was ignored)
CPU_OFFLOAD_NEEDS_SHARDS = ("--cpu-offload offloads FSDP2's shards, and one data-parallel process has none: use --nproc 2 "
                            "or more (with --pp P, a multiple of 2P); on one GPU, --offload-activations and "
                            "--embedding-on-cpu move memory to the host")
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class TrainError(ValueError):
    """A training setup that cannot run; the message names the fix."""


def resolve_precision(precision: str, device: torch.device | str) -> tuple[str, str | None]:
    """(bf16 | fp16 | fp32, the line that says why, for auto) on `device`; TrainError for bf16 on a GPU without it.
    auto: bf16 where the device computes in it (gpu.has_bf16: CUDA sm80 on, CPUs), else fp16."""
    from ..gpu import describe, has_bf16

    bf16 = has_bf16(device)
    if precision == "bf16" and not bf16:
        raise TrainError(f"--precision bf16: {describe(device)} has no bf16: use --precision fp16 (or auto)")
    if precision != "auto":
        return precision, None
    chosen = "bf16" if bf16 else "fp16"
    why = "has bf16" if bf16 else "has no bf16; fp16 with a gradient scaler"
    return chosen, f"precision: {chosen} (auto: {describe(device)} {why}; --precision to choose)"


def option(default, help: str, choices: tuple | None = None):
    """A TrainConfig field with its --help text (and the values it takes): the CLI builds its options from these."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    model: str = option("embedded", "a Hugging Face id, a local directory, or 'embedded' (the shipped tiny model)")
    dataset: str = option("embedded", "a datasets name, a local .jsonl/.json/.parquet/.csv file or folder, or "
                          "'embedded'")  # fmt: skip
    split: str = option("train", "the training split, slices included (train[:100])")
    eval_dataset: str | None = option(None, "held-out data, like --dataset (with the embedded dataset: its "
                                      "held-out set)")  # fmt: skip
    eval_split: str = option("", "held-out split: of --eval-dataset (its train split by default), or alone of "
                             "--dataset, which then trains on the rest: --eval-split 'train[-10%:]'")  # fmt: skip
    eval_fraction: float = option(0.0, "hold out this share of the training examples (seeded), e.g. 0.1")
    output_dir: str = option("runs/qlora", "adapter, checkpoints, metrics.jsonl and loss.png go here")
    # data
    max_length: int = option(512, "tokens per example at most (longer ones are cut)")
    batch_size: int = option(8, "examples per batch (padded batches)")
    packing: bool = option(False, "padding-free packing of examples into rows of --max-tokens")
    max_tokens: int = option(2048, "tokens per packed row (--packing)")
    group_by_length: bool = option(True, "batch examples of similar length together (less padding)")
    completion_only: bool = option(True, "train on the answers only (labels on the completion tokens)")
    prompt_format: str = option("auto", "how an instruction or prompt becomes tokens: the tokenizer's chat template, "
                                "the Alpaca template, or as written; auto: chat where the tokenizer has a template",
                                PROMPT_FORMATS)  # fmt: skip
    # LoRA
    lora_r: int = option(16, "LoRA rank")
    lora_alpha: int = option(32, "LoRA alpha (scaling alpha / r, or alpha / sqrt(r) with --use-rslora)")
    lora_dropout: float = option(0.0, "dropout on the LoRA input")
    target_modules: list[str] | str = option("all-linear", "'all-linear' or comma-separated module names "
                                             "(q_proj,v_proj)")  # fmt: skip
    use_rslora: bool = option(False, "rank-stabilised LoRA scaling")
    # optimisation
    lr: float = option(2e-4, "peak learning rate (AdamW on the LoRA weights)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    warmup_steps: int = option(10, "linear warmup steps, then cosine decay to 0")
    max_steps: int = option(0, "optimizer steps; 0: --epochs over the training data")
    epochs: float = option(1.0, "passes over the training data (when --max-steps is 0)")
    grad_accum: int = option(1, "batches per optimizer step (per process)")
    max_grad_norm: float = option(1.0, "gradient clipping norm; 0: no clipping")
    precision: str = option("auto", "compute precision (fp16 with a gradient scaler); auto: bf16 where the GPU has "
                            "it (sm80 on), else fp16 (a T4)", ("auto", *PRECISIONS))  # fmt: skip
    activation_checkpointing: bool = option(False, "recompute each decoder layer in backward: less memory")
    ac_keep_layers: int = option(0, "with checkpointing: the last N layers keep their activations (faster)")
    offload_activations: bool = option(False, "with checkpointing: the layers' inputs wait in pinned host memory "
                                       "(1 GPU)")  # fmt: skip
    embedding_on_cpu: bool = option(False, "the frozen input embedding in host memory, lookups on the CPU (1 GPU)")
    keep_dequantized: bool = option(False, "NF4 linears keep the forward's dequantized weight for backward (faster, "
                                    "more memory; with checkpointing one recomputed layer's at a time)")  # fmt: skip
    mlp_chunk_tokens: int = option(0, "N > 0: the MLPs run N tokens at a time, each chunk recomputed in backward")
    max_memory: str = option("", f"a GPU memory budget in GB, or 'auto' (free memory less {AUTO_MARGIN:.0%}): the "
                             "fastest setup of checkpointing, --ac-keep-layers, --keep-dequantized, the two offloads "
                             f"and --chunked-loss predicted to fit {PLAN_MARGIN:.0%} below it (1 GPU); those you set "
                             "yourself are kept")  # fmt: skip
    compile: bool = option(False, "torch.compile every decoder layer (fullgraph) and the loss")
    compile_backend: str = option("inductor", "torch.compile backend", ("inductor", "aot_eager", "eager"))
    compile_mode: str = option("", "inductor's mode ('': its default)", ("",) + COMPILE_MODES)
    chunked_loss: bool = option(False, "lm_head + cross-entropy in chunks of tokens: no (B, T, V) logits (not --pp)")
    loss_chunk_tokens: int = option(0, "with --chunked-loss: tokens per chunk; 0: about 2^26 logits")
    # FSDP2 (several processes)
    nproc: int = option(1, "processes to start, one per GPU (FSDP2; torchrun works as well)")
    fsdp_mixed_precision: bool = option(True, "FSDP2 parameters in the compute dtype, gradients reduced in fp32")
    cpu_offload: bool = option(False, "FSDP2 CPU offload of the frozen weights' shards (the NF4 base, "
                                     "embedding, lm_head): copied to the GPU per use; LoRA weights, gradients and "
                                     "AdamW states stay on the GPU")
    # pipeline parallelism (parallel/pipeline.py): nproc = pp stages x data-parallel (FSDP2) replicas
    pp: int = option(1, "pipeline stages; --nproc = pp x data-parallel replicas")
    pp_schedule: str = option("1f1b", "pipeline schedule (interleaved_zb and zbv: 2 stages per rank)", tuple(SCHEDULES))
    pp_microbatches: int = option(0, "microbatches per step and replica; 0: --grad-accum, or 2 x pp if that is less")
    pp_layers: str = option("", "decoder layers per stage, e.g. '3,5'; '': balanced by count")
    pp_report: bool = option(False, "time every stage pass: step time and idle share per rank (pp_report.json)")
    seed: int = option(0, "seed of LoRA initialisation, dropout and data order")
    # bookkeeping
    log_every: int = option(1, "steps between progress-bar updates")
    eval_every: int = option(0, "steps between held-out evaluations; 0: at the start and the end only")
    save_every: int = option(0, "steps between checkpoints; 0: at the end only")
    keep_checkpoints: int = option(2, "checkpoints kept (the oldest are removed)")
    resume: bool = option(False, "continue from the newest checkpoint in --output-dir")
    device: str | None = option(None, "cuda, cuda:1 or cpu; None: cuda when there is a GPU")
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        for f in fields(self):
            choices, value = f.metadata.get("choices"), getattr(self, f.name)
            if choices and value not in choices:
                listed = ", ".join(repr(c) if c == "" else c for c in choices)
                raise TrainError(f"--{f.name.replace('_', '-')} {value}: choose one of {listed}")
        for name in ("batch_size", "max_length", "grad_accum", "lora_r", "max_tokens"):
            if getattr(self, name) < 1:
                raise TrainError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        self._validate_evaluation()
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
        if self.cpu_offload and self._processes() // self.pp < 2:
            raise TrainError(CPU_OFFLOAD_NEEDS_SHARDS)
        if self.max_memory and (self._processes() > 1 or self.pp > 1):
            raise TrainError(f"--max-memory {self.max_memory} plans one GPU's memory: drop it, or --nproc / --pp")
        if self.compile_mode and self.compile_backend != "inductor":
            raise TrainError(f"--compile-mode {self.compile_mode} is inductor's: drop --compile-backend "
                             f"{self.compile_backend}")  # fmt: skip
        if self.mlp_chunk_tokens < 0:
            raise TrainError(f"--mlp-chunk-tokens must be at least 0 (got {self.mlp_chunk_tokens})")
        if self.loss_chunk_tokens < 0 or (self.loss_chunk_tokens and not self.chunked_loss):
            raise TrainError(f"--loss-chunk-tokens {self.loss_chunk_tokens}: a positive chunk size, with --chunked-loss")
        if self.chunked_loss and self.pp > 1:
            raise TrainError("--chunked-loss does not run with --pp yet: drop one of them")
        if self.pp > 1:
            self._validate_pipeline()

    def _processes(self) -> int:
        """The processes of this run: the process group's when one is up, else --nproc or torchrun's WORLD_SIZE."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size()
        return max(self.nproc, int(os.environ.get("WORLD_SIZE", "1")))

    def _validate_evaluation(self) -> None:
        if not 0.0 <= self.eval_fraction < 1.0:
            raise TrainError(f"--eval-fraction {self.eval_fraction}: a share of the examples, 0 < f < 1 (0: off)")
        if self.eval_fraction and (self.eval_dataset or self.eval_split):
            given = "--eval-dataset" if self.eval_dataset else "--eval-split"
            raise TrainError(f"--eval-fraction and {given} both choose the held-out set: drop one of them")
        held_out = self.eval_dataset or self.eval_split or self.eval_fraction or self.dataset == EMBEDDED
        if self.eval_every and not held_out:
            raise TrainError(f"--eval-every {self.eval_every} without held-out data: add --eval-fraction 0.1, "
                             "--eval-split or --eval-dataset")  # fmt: skip

    def microbatches(self) -> int:
        """Pipeline microbatches a step and replica: --pp-microbatches, else grad_accum if that is at least pp
        (each batch one microbatch), else 2 x pp (the batches' rows split evenly)."""
        if self.pp_microbatches:
            return self.pp_microbatches
        return self.grad_accum if self.grad_accum >= self.pp else 2 * self.pp

    def _validate_pipeline(self) -> None:
        from ..parallel.pipeline import COMPILED_ZERO_BUBBLE, ZERO_BUBBLE

        if self.nproc > 1 and self.nproc % self.pp:
            raise TrainError(f"--nproc {self.nproc} is not a multiple of --pp {self.pp}: the ranks form pp x dp")
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
