"""Hugging Face `Trainer` / TRL `SFTTrainer` on N processes with our FSDP2 sharding of the NF4 base.

    model = get_peft_model(load_model("meta-llama/Llama-3.1-8B"), LoraConfig(...))
    args = TrainingArguments(..., bf16=True)             # launched with `torchrun --nproc-per-node N`
    shard_for_trainer(model, args)                       # our fully_shard per decoder layer + root
    trainer = QLoRATrainer(model=model, args=args, ...)  # or QLoRASFTTrainer, or ShardedTrainerMixin + yours
    trainer.train(); trainer.save_model(out)             # out: PEFT adapter files, gathered LoRA only

Left alone, accelerate wraps a multi-process model in DDP, which replicates the 4-bit weights (and refuses a model
with DTensor parameters). `shard_for_trainer` shards it our way (each rank holds 1/N of the NF4 bytes; the
all-gathers move uint8) and marks it as already prepared, so accelerate keeps it as it is. The loss math is the
Trainer's own: with `average_tokens_across_devices` (the default) it divides each rank's token sum by the global
label-token count and multiplies by N, which FSDP's gradient averaging undoes, so N ranks with batch B equal
one process with batch B and N accumulation steps.

Precision: `bf16=True` / `fp16=True` become FSDP2's `MixedPrecisionPolicy` (parameters cast to the half dtype for
compute, gradients reduced in fp32), as in our own loop; accelerate's autocast is not applied to a prepared model.
With fp16, ranks agree on skipping a step when any rank's gradient shard overflows (DTensor all-reduces the
scaler's found-inf flag).

`ShardedTrainerMixin` makes saving a collective: `save_model` gathers the LoRA weights (never the base) on every
rank and rank 0 writes the PEFT files; checkpoints keep the optimizer state sharded with
`torch.distributed.checkpoint` (`optimizer_dcp/`), so `resume_from_checkpoint` works on any number of ranks.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .parallel.fsdp import apply_fsdp, fsdp_policies, full_lora_state_dict, is_sharded, load_full_state_dict

OPTIMIZER_DCP = "optimizer_dcp"
SCHEDULER_FILE = "scheduler.pt"


def shard_for_trainer(model: nn.Module, args, *, cpu_offload: bool = False) -> nn.Module:
    """Shard `model` for a Trainer run on the current process group (a no-op on one process); returns it."""
    import torch.distributed as dist

    # TrainingArguments' device (cpu with use_cpu=True); reading it joins the process group of a torchrun launch
    device = torch.device(getattr(args, "device", "cpu"))
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return model
    half = torch.bfloat16 if getattr(args, "bf16", False) else torch.float16 if getattr(args, "fp16", False) else None
    if device.type == "cuda":
        model.to(device)
    apply_fsdp(model, **fsdp_policies(half, cpu_offload=cpu_offload, pin_memory=device.type == "cuda"))
    model._is_accelerate_prepared = True  # accelerate: keep this model as it is (no DDP replica)
    return model


class ShardedTrainerMixin:
    """Collective saving and sharded optimizer checkpoints for a model sharded by `shard_for_trainer`."""

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        if not is_sharded(self.model):
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir or self.args.output_dir
        lora = full_lora_state_dict(self.model)  # a collective: every rank takes part
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            self.model.save_pretrained(output_dir, state_dict=lora)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not is_sharded(self.model):
            return super()._save_optimizer_and_scheduler(output_dir)
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        dcp.save(get_optimizer_state_dict(self.model, self.optimizer), checkpoint_id=os.path.join(output_dir, OPTIMIZER_DCP))
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None or not is_sharded(self.model):
            return super()._load_optimizer_and_scheduler(checkpoint)
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        state = get_optimizer_state_dict(self.model, self.optimizer)
        dcp.load(state, checkpoint_id=os.path.join(checkpoint, OPTIMIZER_DCP))
        set_optimizer_state_dict(self.model, self.optimizer, state)
        self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, SCHEDULER_FILE), weights_only=True))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        model = model if model is not None else self.model
        if not is_sharded(model):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        from safetensors.torch import load_file

        saved = load_file(os.path.join(resume_from_checkpoint, "adapter_model.safetensors"))
        load_full_state_dict(model, _peft_keys_to_model(model, saved))


def _peft_keys_to_model(model: nn.Module, saved: dict) -> dict:
    """PEFT file keys (`...lora_A.weight`) -> the model's parameter names (`...lora_A.<adapter>.weight`)."""
    adapter = getattr(model, "active_adapter", "default")
    names = {n.replace(f".{adapter}.", "."): n for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(names) - set(saved))
    if missing:
        raise ValueError(f"the adapter file lacks {len(missing)} trained weights, e.g. {missing[0]}")
    return {names[k]: v for k, v in saved.items() if k in names}


def _trainer_classes():
    import transformers

    class QLoRATrainer(ShardedTrainerMixin, transformers.Trainer):
        """transformers.Trainer for a model sharded by `shard_for_trainer` (or a plain one)."""

    try:
        import trl
    except ImportError:
        return QLoRATrainer, None

    class QLoRASFTTrainer(ShardedTrainerMixin, trl.SFTTrainer):
        """trl.SFTTrainer for a model sharded by `shard_for_trainer` (or a plain one)."""

    return QLoRATrainer, QLoRASFTTrainer


def __getattr__(name: str):
    if name in ("QLoRATrainer", "QLoRASFTTrainer"):
        trainer, sft = _trainer_classes()
        cls = trainer if name == "QLoRATrainer" else sft
        if cls is None:
            raise ImportError("QLoRASFTTrainer needs trl: pip install trl")
        globals()["QLoRATrainer"], globals()["QLoRASFTTrainer"] = trainer, sft
        return cls
    raise AttributeError(name)
