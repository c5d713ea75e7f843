"""prepare(): a TrainConfig applied to a loaded model, in one place and one order. Both loops call it.

    prepared = prepare(model, cfg, device=device, rank=rank, world=world)
    prepared.model                 # the peft model, ready to train (a pipeline rank: only its stages' weights)
    prepared.forward_loss_sum(b)   # sum of the token cross-entropies of batch b (fp32), under the run's autocast

The order, and why:
 1. LoRA: peft adapters (fp32, the base frozen), the scaling on the rank side (lora/linear.py).
 2. Kernels: NF4 linears keep the dequantized weight for backward or not (--keep-dequantized), and the MLPs'
    LoRA terms go into the fused SwiGLU (lora/fused_mlp.py) - without the down projection's lora_A when layers
    are checkpointed, where memory is the point.
 3. Memory options (memory/): activation checkpointing (reentrant in one process, non-reentrant under FSDP2 and
    in pipelines, whose split backward needs it), sequence-chunked MLPs, the embedding on the CPU (one GPU only).
 4. The loss: full logits then the token loss (compiled with --compile), or the chunked loss.
 5. Parallelism (parallel/): FSDP2 over all ranks, or pipeline stages (FSDP2 inside each when pp < world).
 6. torch.compile of every decoder layer, after checkpointing and FSDP2, so their hooks stay around the compiled
    code; a pipeline rank then drops the other stages' weights.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..parallel.fsdp import fsdp_policies
from .config import CPU_OFFLOAD_NEEDS_SHARDS, PRECISIONS, TrainConfig, TrainError


def plan_memory(cfg: TrainConfig, config, device: torch.device) -> tuple[float, float]:
    """--max-memory: set cfg's memory options to the fastest setup predicted to fit (memory/budget.py), the ones the
    user set kept; print the choice. Returns the predicted peak and the budget (bytes)."""
    from dataclasses import fields

    from ..memory.budget import BudgetError, Setup, parse_budget, plan

    defaults = {f.name: f.default for f in fields(TrainConfig)}
    fixed = {f.name: getattr(cfg, f.name) for f in fields(Setup) if getattr(cfg, f.name) != defaults[f.name]}
    tokens = cfg.max_tokens if cfg.packing else cfg.max_length
    try:
        budget = parse_budget(cfg.max_memory, device)
        setup, terms = plan(config, cfg.batch_size, tokens, budget, compiled=cfg.compile, lora_r=cfg.lora_r,
                            fixed=fixed)  # fmt: skip
    except BudgetError as e:
        raise TrainError(str(e)) from None
    for name, value in setup.options().items():
        setattr(cfg, name, value)
    print(f"memory budget {budget / 1e9:.3g} GB: {setup.describe(config.num_hidden_layers)}; predicted peak "
          f"{terms['total'] / 1e9:.3g} GB at {cfg.batch_size} x {tokens} tokens")  # fmt: skip
    return terms["total"], budget


def add_lora(model: nn.Module, cfg: TrainConfig):
    """peft LoRA on the NF4 model; adapters in fp32 (peft upcasts them), base frozen; the LoRA scaling applied on
    the rank side (lora/linear.py)."""
    import peft

    from ..lora.linear import register_rank_scaled_lora

    lora = peft.LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, use_rslora=cfg.use_rslora,
        target_modules=cfg.target_modules, task_type="CAUSAL_LM",
    )  # fmt: skip
    register_rank_scaled_lora(lora)
    try:
        with warnings.catch_warnings():  # peft asks transformers 5.2x for a deprecated flag; nothing for users to do
            deprecated = "`is_gradient_checkpointing` is deprecated"
            warnings.filterwarnings("ignore", message=deprecated, category=FutureWarning)
            return peft.get_peft_model(model, lora)
    except ValueError as e:
        if "not found in the base model" in str(e) or "Target modules" in str(e):
            names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
            raise TrainError(f"target_modules {cfg.target_modules!r} match no layer: use 'all-linear' or some of "
                             f"{', '.join(names)}") from None  # fmt: skip
        raise


class ScaledLoss:
    """loss_sum(logits, labels) x scale: the pipeline's loss function; its loop sets `scale` every step (data
    replicas / label tokens of the step), so that the step equals one process running all its batches."""

    def __init__(self, loss_sum: Callable):
        self.loss_sum, self.scale = loss_sum, 1.0

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss_sum(logits, labels) * self.scale


@dataclass
class Prepared:
    """A model made ready by prepare(), and what a loop needs to know of how."""

    model: nn.Module
    loss_sum: Callable  # token cross-entropy sum of (logits (B, T, V), labels (B, T)), fp32; compiled with --compile
    forward_loss_sum: Callable = field(repr=False)  # batch dict -> the sum of its token cross-entropies (fp32)
    replicas: int = 1  # data-parallel replicas (each runs grad_accum batches a step)
    replica: int = 0  # this rank's index among them
    # --pp only
    pipeline: object = None  # parallel/pipeline.Pipeline: this rank's stages and the schedule
    pipeline_loss: ScaledLoss | None = None
    pp_rank: int = 0
    pp_group: object = None
    microbatches: int = 0


def prepare(model: nn.Module, cfg: TrainConfig, *, device: torch.device, rank: int = 0, world: int = 1) -> Prepared:
    """Apply cfg to `model` (a transformers causal LM with its NF4 base, on `device`) in the order of the module
    docstring; `rank` and `world`: this process and the number of processes (FSDP2 or pipeline ranks)."""
    if cfg.cpu_offload and world // cfg.pp < 2:
        raise TrainError(CPU_OFFLOAD_NEEDS_SHARDS)
    model = add_lora(model, cfg)
    _apply_kernels(model, cfg)
    _apply_memory_options(model, cfg, world)
    loss_sum = _loss_sum(cfg)
    if cfg.pp > 1:
        return _pipeline(model, cfg, loss_sum, device=device, world=world)
    if world > 1:  # the mesh on the run's device: the model may wait in host memory (loop.load_storage)
        from ..parallel import apply_fsdp
        from ..parallel.fsdp import default_mesh

        apply_fsdp(model, mesh=default_mesh(model, device), **_fsdp_policies(cfg, device))
    if cfg.compile:
        _compile_layers(model, cfg)
    return Prepared(model, loss_sum, _forward_loss_sum(model, cfg, loss_sum, device), replicas=world, replica=rank)


def _fsdp_policies(cfg: TrainConfig, device: torch.device) -> dict:
    """FSDP2's mixed-precision and CPU-offload policies for this run's options."""
    dtype = PRECISIONS[cfg.precision] if cfg.fsdp_mixed_precision else None
    return fsdp_policies(dtype, cpu_offload=cfg.cpu_offload, pin_memory=device.type == "cuda")


def _apply_kernels(model: nn.Module, cfg: TrainConfig) -> None:
    from ..lora.fused_mlp import patch_lora_swiglu
    from ..nf4.linear import keep_dequantized

    keep_dequantized(cfg.keep_dequantized)  # process-wide: the run's setting holds for its model
    # on CUDA, the MLPs' LoRA terms inside the SwiGLU kernels; with checkpointing, where memory is the point, without
    # the down projection's lora_A (one (T, I) tensor less at the backward peak)
    patch_lora_swiglu(model, fuse_down_a=not cfg.activation_checkpointing)


def _apply_memory_options(model: nn.Module, cfg: TrainConfig, world: int) -> None:
    if cfg.activation_checkpointing:
        from ..memory.activation_checkpointing import checkpoint_layers
        from ..model import decoder_layers

        n = len(decoder_layers(model))
        if cfg.ac_keep_layers > n:
            raise TrainError(f"--ac-keep-layers {cfg.ac_keep_layers}: the model has {n} decoder layers")
        # reentrant in one process (less host time a step); torch's non-reentrant form under FSDP2 and in pipelines
        checkpoint_layers(model, keep_last=cfg.ac_keep_layers, offload=cfg.offload_activations,
                          reentrant=world == 1 and cfg.pp == 1)  # fmt: skip
    if cfg.mlp_chunk_tokens:
        from ..memory.chunked_mlp import chunk_mlps

        try:
            chunk_mlps(model, cfg.mlp_chunk_tokens)
        except ValueError as e:
            raise TrainError(f"--mlp-chunk-tokens: {e}") from None
    if (cfg.offload_activations or cfg.embedding_on_cpu) and world > 1:
        raise TrainError("--offload-activations and --embedding-on-cpu run on one GPU: drop them, or start one "
                         "process")  # fmt: skip
    if cfg.embedding_on_cpu:
        from ..memory.cpu_embedding import embedding_on_cpu

        try:
            embedding_on_cpu(model)
        except ValueError as e:
            raise TrainError(f"--embedding-on-cpu: {e}") from None


def _loss_sum(cfg: TrainConfig) -> Callable:
    from ..compile import compile_loss, token_loss_sum

    return compile_loss(backend=cfg.compile_backend) if cfg.compile else token_loss_sum


def _forward_loss_sum(model: nn.Module, cfg: TrainConfig, loss_sum: Callable, device: torch.device) -> Callable:
    """batch -> the sum of its token cross-entropies (fp32): the forward under autocast in the run's precision, and
    the loss (--chunked-loss: the lm_head inside it, a chunk of tokens at a time, no (B, T, V) logits)."""
    dtype, enabled = PRECISIONS[cfg.precision], cfg.precision != "fp32"
    chunk_tokens = cfg.loss_chunk_tokens or None

    def forward_loss_sum(batch: dict) -> torch.Tensor:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        with torch.autocast(device.type, dtype=dtype, enabled=enabled):
            if cfg.chunked_loss:
                from ..memory.chunked_loss import causal_lm_loss_sum

                return causal_lm_loss_sum(model, labels=batch["labels"], chunk_tokens=chunk_tokens, **inputs)
            logits = model(**inputs, use_cache=False).logits  # (B, T, V)
        return loss_sum(logits, batch["labels"])

    return forward_loss_sum


def _compile_layers(model: nn.Module, cfg: TrainConfig) -> None:
    from ..compile import compile_model

    # chunked MLPs run their chunk loop outside the graph: one break a layer (memory/chunked_mlp.py)
    compile_model(model, backend=cfg.compile_backend, mode=cfg.compile_mode or None,
                  fullgraph=not cfg.mlp_chunk_tokens)  # fmt: skip


def _pipeline(model: nn.Module, cfg: TrainConfig, loss_sum: Callable, *, device: torch.device, world: int) -> Prepared:
    """The ranks as a (pp, dp) mesh; this rank's stages of the model under cfg.pp_schedule, FSDP2 over dp inside
    each stage; compiled layers (1F1B / GPipe only: TrainConfig.validate); the other stages' weights dropped."""
    from torch.distributed.device_mesh import init_device_mesh

    from ..parallel.pipeline import build_pipeline, keep_only

    if world < cfg.pp or world % cfg.pp:
        raise TrainError(f"--pp {cfg.pp} on {world} process(es): use --nproc {cfg.pp} or a multiple of it")
    replicas = world // cfg.pp  # D, the data-parallel size
    mesh = init_device_mesh(device.type, (cfg.pp, replicas), mesh_dim_names=("pp", "dp"))
    pp_rank, replica = mesh["pp"].get_local_rank(), mesh["dp"].get_local_rank()
    pp_group = mesh.get_group("pp")
    microbatches = cfg.microbatches()
    scaled = ScaledLoss(loss_sum)
    layers = [int(x) for x in cfg.pp_layers.split(",") if x.strip()] if cfg.pp_layers else None
    pipe = build_pipeline(
        model, cfg.pp_schedule, pp_rank, cfg.pp, n_microbatches=microbatches, loss_fn=scaled, device=device,
        group=pp_group, dp_mesh=mesh["dp"] if replicas > 1 else None, fsdp=_fsdp_policies(cfg, device),
        layers_per_stage=layers, compute_dtype=PRECISIONS[cfg.precision],
    )  # fmt: skip
    if cfg.compile:
        _compile_layers(model, cfg)
    keep_only(model, pipe.modules)  # this rank keeps its stages' weights only
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Prepared(model, loss_sum, _forward_loss_sum(model, cfg, loss_sum, device), replicas=replicas,
                    replica=replica, pipeline=pipe, pipeline_loss=scaled, pp_rank=pp_rank, pp_group=pp_group,
                    microbatches=microbatches)  # fmt: skip
