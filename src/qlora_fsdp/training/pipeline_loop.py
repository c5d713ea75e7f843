"""The training loop over a pipeline: `make_loop(cfg)` with `cfg.pp > 1` (the CLI's `--nproc N --pp P`).

The N ranks form a 2-D mesh of P pipeline stages x D = N / P data-parallel replicas (FSDP2 inside each stage when
D > 1). A step takes grad_accum x D batches, like the FSDP2 loop; replica d runs batches d, d + D, ... through the
pipeline as one (grad_accum x batch_size, width) block cut into microbatches (cfg.microbatches()).
Every batch is padded to batch_size rows (filler rows predict nothing) and to one width for the whole run, because
the stages size their send and receive buffers once: the longest example of the run's data rounded up to a multiple
of 8 (cfg.max_length where the batches cannot tell).

The loss of a microbatch is its token cross-entropy sum x D / (label tokens of the whole step), so the step equals
one process running all the batches (FSDP2 averages over D). Gradient clipping takes the norm over all stages:
each rank's squared norm (already summed over dp by DTensor) is summed over the pp group.

fp16: the loss function also multiplies by the gradient scaler's scale (the schedule runs backward itself), and
the scaler's found-inf flags are reduced over every rank after unscaling: an overflow in any stage's gradients
skips the step on all stages, and every rank's scaler backs off alike.
"""

from __future__ import annotations

import json

import torch
import torch.distributed as dist

from ..parallel.fsdp import full_lora_state_dict
from .checkpoint import atomic_write_text
from .config import TrainError
from .loop import TrainLoop


class PipelineTrainLoop(TrainLoop):
    """The loop of a pipeline rank: training/setup.py built its stages and schedule (Prepared.pipeline)."""

    runs_pipeline = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from ..parallel.schedule_timer import ScheduleTimer

        p = self.prepared
        self.pipe, self.pp_rank, self.pp_group, self.n_microbatches = p.pipeline, p.pp_rank, p.pp_group, p.microbatches
        self.timer = ScheduleTimer(self.pipe.stages, self.device) if self.cfg.pp_report else None
        longest = [getattr(b, "longest", None) for b in (self.batches, self.eval_batches) if b is not None]
        self.width = self.cfg.max_length
        if longest and None not in longest:  # every rank builds the same data: the same width everywhere
            self.width = min(self.width, -(-max(longest) // 8) * 8)

    # -- batches ------------------------------------------------------------------------------------------
    def _block(self, batches: list[dict]) -> dict:
        """The replica's batches as one (grad_accum x batch_size, self.width) block on the device; missing batches
        and rows are filler: attending to their own pad tokens (no fully masked row), with no label."""
        cfg = self.cfg
        rows, T = cfg.grad_accum * cfg.batch_size, self.width
        ids = torch.zeros(rows, T, dtype=torch.long)
        labels = torch.full((rows, T), -100, dtype=torch.long)
        mask = torch.ones(rows, T, dtype=torch.long)
        for i, b in enumerate(batches):
            r, t = b["input_ids"].shape
            if r > cfg.batch_size or t > T:
                raise TrainError(f"a batch of shape {r}x{t} exceeds --batch-size {cfg.batch_size} x the pipeline's "
                                 f"width {T} (--max-length {cfg.max_length}, or the longest example)")  # fmt: skip
            lo = i * cfg.batch_size
            ids[lo : lo + r, :t], labels[lo : lo + r, :t] = b["input_ids"], b["labels"]
            mask[lo : lo + r] = 0
            mask[lo : lo + r, :t] = b["attention_mask"] if "attention_mask" in b else 1
        return self._to_device({"input_ids": ids, "labels": labels, "attention_mask": mask})

    def _run(self, x: dict) -> torch.Tensor:
        """One step of the schedule over the block x; the sum of this rank's microbatch losses (0 off the last
        stage)."""
        losses: list[torch.Tensor] = []
        args = (x["input_ids"],) if self.pipe.has_first else ()  # torch 2.11 refuses inputs on other stages
        kwargs = {"attention_mask": x["attention_mask"], "target": x["labels"], "losses": losses}
        if self.timer is not None:
            self.timer.step(self.pipe.schedule.step, *args, **kwargs)
        else:
            self.pipe.schedule.step(*args, **kwargs)
        return sum((loss.detach().double().cpu() for loss in losses), torch.zeros((), dtype=torch.float64))

    # -- one optimizer step -------------------------------------------------------------------------------
    def _forward_backward(self, batches: list[dict], n_tokens: int) -> torch.Tensor:
        """The replica's batches through the schedule; the step's loss over all replicas (fp64, CPU)."""
        d, loss_scale = self.replicas, 1.0
        if self.scaler.is_enabled():  # scale() also creates the scaler's scale tensor on first use (unscale_ needs it)
            loss_scale = float(self.scaler.scale(torch.ones((), device=self.device)))
        self.prepared.pipeline_loss.scale = d / n_tokens * loss_scale
        return self._sum_over_ranks(self._run(self._block(batches[self.replica :: d]))) / (d * loss_scale)

    def _clip_gradients(self) -> float:
        """Unscale (fp16: found-inf shared by all ranks) and clip all stages' gradients to cfg.max_grad_norm by
        their joint norm; returns that norm."""
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
            self._share_found_inf()
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)
        if hasattr(norm, "full_tensor"):  # DTensor: the norm over the dp shards
            norm = norm.full_tensor()
        sq = norm.double() ** 2
        dist.all_reduce(sq, group=self.pp_group)
        total = sq.sqrt()
        if self.cfg.max_grad_norm:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.cfg.max_grad_norm, total.to(norm.dtype))
        return float(total)

    def _share_found_inf(self) -> None:
        """Every rank's found-inf flags (set by unscale_) become their maximum over all ranks, in place: where one
        stage overflowed, scaler.step skips the step everywhere and scaler.update lowers every rank's scale."""
        flags = self.scaler._found_inf_per_device(self.optimizer)  # {device: fp32 scalar}, read by step and update
        anywhere = torch.zeros((), device=self.device)
        for flag in flags.values():
            anywhere = torch.maximum(anywhere, flag.to(self.device).reshape(()))
        dist.all_reduce(anywhere, op=dist.ReduceOp.MAX)
        for flag in flags.values():
            flag.copy_(anywhere.to(flag.device).reshape(flag.shape))

    def _eval_loss_sum(self, batch: dict) -> torch.Tensor | None:
        """One held-out batch through the stages in turn, forward only (no schedule: torch's `schedule.eval` runs
        backward actions under the zero-bubble schedules in torch 2.13); the loss sum on the last stage's rank."""
        mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))
        logits = self.pipe.forward_only(batch["input_ids"], mask)
        return None if logits is None else self._loss_sum(logits, batch["labels"])

    # -- weights and the report ---------------------------------------------------------------------------
    def lora_state_dict(self) -> dict:
        """All stages' LoRA weights, whole, on CPU, on rank 0 (other ranks: {}). A collective."""
        mine = full_lora_state_dict(self.model)  # gathered over dp
        parts = self._gather_on_rank0(mine if self.replica == 0 else {})
        return {k: v for part in parts or [] for k, v in part.items()}

    def _gather_on_rank0(self, obj) -> list | None:
        """Every rank's `obj`, in rank order, on rank 0; None on the others. A collective."""
        parts = [None] * self.world if self.rank == 0 else None
        dist.gather_object(obj, parts, dst=0)
        return parts

    def _save_adapter(self, directory, lora: dict) -> None:
        """PEFT's files written from the gathered weights of all stages: peft's own save_pretrained keeps only the
        LoRA modules present in this rank's (pruned) model."""
        from safetensors.torch import save_file

        adapter = self.model.active_adapter
        save_file({k.replace(f".{adapter}.", "."): v.contiguous() for k, v in lora.items()},
                  str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})  # fmt: skip
        self.model.peft_config[adapter].save_pretrained(str(directory))

    def schedule_report(self) -> list[dict] | None:
        """Per rank: its stages, step time and idle share (cfg.pp_report); on rank 0, None elsewhere. A collective."""
        if self.timer is None:
            return None
        mine = {"rank": self.rank, "pp_rank": self.pp_rank, "dp_rank": self.replica,
                "stages": [st.stage_index for st in self.pipe.stages], **self.timer.summary()}  # fmt: skip
        return self._gather_on_rank0(mine)

    def save_final(self) -> None:
        report = self.schedule_report()
        super().save_final()
        if report is not None and self.rank == 0:
            cfg = self.cfg
            head = {"schedule": cfg.pp_schedule, "pp": cfg.pp, "dp": self.replicas, "microbatches": self.n_microbatches}
            atomic_write_text(self.out / "pp_report.json", json.dumps({**head, "ranks": report}, indent=1) + "\n")
            print(f"pipeline {cfg.pp_schedule}: {cfg.pp} stages x {self.replicas} replicas, {self.n_microbatches} "
                  f"microbatches a step")  # fmt: skip
            for r in report:
                print(f"  rank {r['rank']} (stages {r['stages']}): {r['step_ms']:.1f} ms a step, busy "
                      f"{r['busy_ms']:.1f} ms, idle {100 * r['idle']:.1f}%")  # fmt: skip
