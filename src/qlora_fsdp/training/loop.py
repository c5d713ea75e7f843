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
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch

from ..parallel.fsdp import set_accumulating
from .checkpoint import atomic_dir, atomic_write_text, latest_checkpoint, prune_checkpoints
from .config import PRECISIONS, TrainConfig, TrainError, resolve_precision
from .lr_schedule import warmup_cosine
from .rng import rng_state, seed_everything, set_rng_state
from .setup import plan_memory, prepare


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


def load_storage(device: torch.device, world: int, pp: int) -> str | None:
    """Where load_model keeps the model: on the host for FSDP2 over GPUs (fully_shard then moves one unit at a time
    to this rank's GPU and keeps its shard: no GPU holds the whole model, which a 70B base needs); else on `device`."""
    return "cpu" if device.type == "cuda" and world > 1 and pp == 1 else None


PEAK_TOLERANCE = 0.10  # --max-memory's contract: the predicted peak within 10% of the first step's measured one


def check_predicted_peak(predicted: float, measured: float, budget: float = float("inf")) -> dict:
    """The --max-memory prediction against the first step's measured peak (bytes): a line, and a warning when it
    misses by more than PEAK_TOLERANCE or the peak passed the budget."""
    off = predicted / measured - 1
    line = f"step 1: peak {measured / 1e9:.2f} GB, predicted {predicted / 1e9:.2f} GB ({off:+.1%})"
    if abs(off) > PEAK_TOLERANCE:
        warnings.warn(f"--max-memory: {line}: the memory model is off by more than {PEAK_TOLERANCE:.0%}", stacklevel=2)
    elif measured > budget:
        warnings.warn(f"--max-memory: {line}, over the {budget / 1e9:.3g} GB budget: lower it by "
                      f"{(measured - budget) / 1e9:.2f} GB to stay within it", stacklevel=2)  # fmt: skip
    else:
        print(line)
    return {"predicted_peak_gb": predicted / 1e9, "peak_gb": measured / 1e9}


class TrainLoop:
    """One process, or FSDP2 over several (cfg.nproc, torchrun): the model prepared by training/setup.py, AdamW on
    its LoRA parameters, the loop, checkpoints. training.make_loop(cfg) picks this loop or the pipeline loop."""

    runs_pipeline = False  # the pipeline loop's: cfg.pp > 1

    def __init__(self, cfg: TrainConfig, model=None, tokenizer=None, train_batches=None, eval_batches=None):
        cfg.validate()
        if cfg.pp > 1 and not self.runs_pipeline:
            raise TrainError(f"--pp {cfg.pp} runs in the pipeline loop: build the loop with "
                             "qlora_fsdp.training.make_loop(cfg)")  # fmt: skip
        self.cfg = cfg
        self.device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.out = Path(cfg.output_dir)
        seed_everything(cfg.seed)
        self.rank, self.world = _rank_and_world()
        cfg.precision, note = resolve_precision(cfg.precision, self.device)  # auto -> bf16 or fp16, for all parts
        if note and self.rank == 0:
            print(note)
        self.dtype = PRECISIONS[cfg.precision]
        self.held_out_examples = None  # untokenized held-out examples, where the loop built its own batches
        if train_batches is None:  # data first: a wrong path or field fails before a big model loads
            from .batches import build_batches, load_tokenizer

            tokenizer = tokenizer or load_tokenizer(cfg.model)
            data = build_batches(cfg, tokenizer)
            train_batches, eval_batches, self.held_out_examples = data.train, data.eval, data.held_out_examples
            if data.prompt_note and self.rank == 0:
                print(data.prompt_note)
        self.batches, self.eval_batches = train_batches, eval_batches
        if model is None:
            from ..model import load_model

            model = load_model(cfg.model, dtype=self.dtype, device=self.device,
                               storage_device=load_storage(self.device, self.world, cfg.pp))  # fmt: skip
        self.tokenizer = tokenizer
        # bytes, with --max-memory: the predicted peak, checked against the measured one after step 1, and the budget
        self.predicted_peak, self.memory_budget = None, float("inf")
        if cfg.max_memory:
            self.predicted_peak, self.memory_budget = plan_memory(cfg, model.config, self.device)
        self.prepared = prepare(model, cfg, device=self.device, rank=self.rank, world=self.world)
        self.model = self.prepared.model
        self._loss_sum = self.prepared.loss_sum
        # data-parallel replicas (each runs grad_accum batches a step) and this rank's index among them
        self.replicas, self.replica = self.prepared.replicas, self.prepared.replica
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # one process on a GPU: AdamW's fused kernel (one launch for all LoRA tensors instead of ~10 per tensor)
        fused = self.device.type == "cuda" and self.world == 1 and cfg.pp == 1
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)
        steps_per_epoch = max(1, len(self.batches) // (cfg.grad_accum * self.replicas))
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
        self.scheduler = warmup_cosine(self.optimizer, min(cfg.warmup_steps, self.total_steps), self.total_steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        self.step = 0
        self._train_mode = False  # whether the loop has put the model in training mode (and not left it since)
        self.records: list[dict] = []
        self._stream = None

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

    def _forward_loss_sum(self, batch: dict) -> torch.Tensor:
        """Sum of token cross-entropies of one batch (fp32)."""
        return self.prepared.forward_loss_sum(batch)

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
        from ..parallel.fsdp import full_lora_state_dict

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
        check_peak = bool(self.predicted_peak) and self.device.type == "cuda"  # (off a GPU: no peak to read)
        if check_peak and self.step == 0:
            torch.cuda.reset_peak_memory_stats(self.device)  # the prediction is a step's peak: not load's, not eval's
        start, tokens = time.perf_counter(), 0
        while self.step < self.total_steps:
            if stop_at is not None and self.step >= stop_at:
                return self.records
            rec = self.train_step()
            tokens += rec["tokens"]
            elapsed = time.perf_counter() - start
            rec.update(tokens_per_s=tokens / elapsed, mem_gb=memory_gb(self.device), elapsed_s=elapsed)
            if check_peak and self.step == 1:
                peak = torch.cuda.max_memory_allocated(self.device)
                rec.update(check_predicted_peak(self.predicted_peak, peak, self.memory_budget))
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
