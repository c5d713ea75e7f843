"""Pipeline parallelism over decoder layers with torch.distributed.pipelining: GPipe, 1F1B, interleaved zero-bubble
and ZBV zero-bubble schedules.

    schedule, stages = build_pipeline(model, "zbv", rank, pp, n_microbatches=4, loss_fn=loss_fn)
    schedule.step(input_ids, attention_mask=mask, target=labels, losses=losses)   # every rank, every step

The model (a transformers Llama-style causal LM, peft-wrapped or not) is cut into stages by decoder layers, balanced
by count: the first stage also holds the embedding, the last the final norm and lm_head. Each stage recomputes the
position ids, the causal mask and the rotary embedding from `attention_mask` (keyword arguments reach every stage),
so only hidden states (B, T, H) travel between ranks. All steps must share one sequence length: the stages size
their receive buffers at the first step.

Zero-bubble schedules split each stage's backward into an input-gradient pass and a deferred weight-gradient pass.
The NF4 base path yields input gradients only, so the LoRA weight gradients are what the weight pass computes.

Loss: the schedule sums the microbatch losses' gradients as they are (`scale_grads=False`); give it a `loss_fn`
that divides by the label tokens of the whole step (all microbatches), so N stages equal one process.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model import decoder_layers

# name -> (schedule class name in torch.distributed.pipelining, stages per rank)
SCHEDULES = {"gpipe": ("ScheduleGPipe", 1), "1f1b": ("Schedule1F1B", 1),
             "interleaved_zb": ("ScheduleInterleavedZeroBubble", 2), "zbv": ("ScheduleZBVZeroBubble", 2)}  # fmt: skip
ZERO_BUBBLE = ("interleaved_zb", "zbv")


class PipelineError(ValueError):
    """A pipeline setup that cannot run; the message names the fix."""


class DecoderStage(nn.Module):
    """Decoder layers [lo, hi) of a causal LM; the embedding if first, the final norm + lm_head if last."""

    def __init__(self, model: nn.Module, lo: int, hi: int, first: bool, last: bool):
        super().__init__()
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft -> transformers
        inner = base.model  # e.g. LlamaModel
        self.config = inner.config
        self.embed_tokens = inner.embed_tokens if first else None
        self.layers = nn.ModuleDict({str(i): decoder_layers(base)[i] for i in range(lo, hi)})
        self.rotary_emb = inner.rotary_emb
        self.norm = inner.norm if last else None
        self.lm_head = base.lm_head if last else None

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask

        h = self.embed_tokens(x) if self.embed_tokens is not None else x  # (B, T, H)
        pos = torch.arange(h.shape[1], device=h.device).unsqueeze(0)  # (1, T)
        mask = create_causal_mask(self.config, h, attention_mask, None, pos)  # 4th argument: the (absent) KV cache
        pe = self.rotary_emb(h, position_ids=pos)  # (cos, sin)
        for layer in self.layers.values():
            h = layer(h, attention_mask=mask, position_embeddings=pe, position_ids=pos)
        if self.lm_head is not None:
            h = self.lm_head(self.norm(h))  # (B, T, V)
        return h


def split_bounds(n_layers: int, n_stages: int) -> list[tuple[int, int]]:
    """[lo, hi) layer ranges of n_stages stages balanced by layer count (the first ones take the remainder)."""
    if n_stages > n_layers:
        raise PipelineError(f"{n_stages} pipeline stages but the model has {n_layers} decoder layers: lower --pp")
    q, r = divmod(n_layers, n_stages)
    sizes = [q + (i < r) for i in range(n_stages)]
    return [(sum(sizes[:i]), sum(sizes[: i + 1])) for i in range(n_stages)]


def stage_indices(schedule: str, rank: int, pp: int) -> list[int]:
    """The stages rank `rank` of `pp` runs: one; two in loop order (interleaved); two in V order (ZBV)."""
    if schedule in ("gpipe", "1f1b"):
        return [rank]
    if schedule == "interleaved_zb":
        return [rank, rank + pp]
    return [rank, 2 * pp - 1 - rank]


def build_pipeline(model: nn.Module, schedule: str, rank: int, pp: int, *, n_microbatches: int, loss_fn,
                   device: torch.device | str = "cpu", group=None):  # fmt: skip
    """(the schedule object, this rank's DecoderStage modules) for `schedule` on `pp` ranks."""
    import torch.distributed.pipelining as pipelining

    if schedule not in SCHEDULES:
        raise PipelineError(f"schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")
    if n_microbatches < pp:
        raise PipelineError(f"{n_microbatches} microbatches for {pp} stages leave ranks idle: use at least {pp}")
    layers = decoder_layers(model)
    if schedule in ZERO_BUBBLE and any(getattr(m, "_compiled_call_impl", None) is not None for m in layers):
        raise PipelineError(f"{schedule}: torch.distributed.pipelining refuses zero-bubble schedules with compiled "
                            "stages; drop --compile or use --pp-schedule 1f1b / gpipe")  # fmt: skip
    cls_name, per_rank = SCHEDULES[schedule]
    n_stages = pp * per_rank
    bounds = split_bounds(len(layers), n_stages)
    mods, stages = [], []
    for s in stage_indices(schedule, rank, pp):
        mod = DecoderStage(model, *bounds[s], first=s == 0, last=s == n_stages - 1)
        mods.append(mod)
        stages.append(pipelining.PipelineStage(mod, s, n_stages, torch.device(device), group=group))
    cls = getattr(pipelining, cls_name)
    sched = cls(stages if per_rank > 1 else stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn,
                scale_grads=False)  # fmt: skip
    return sched, mods
