"""Pipeline parallelism over decoder layers with torch.distributed.pipelining: GPipe, 1F1B, interleaved zero-bubble
and ZBV zero-bubble schedules, optionally with FSDP2 inside each stage (a 2-D mesh: pp x dp).

    pipe = build_pipeline(model, "zbv", pp_rank, pp, n_microbatches=4, loss_fn=loss_fn, device=dev,
                          group=mesh.get_group("pp"), dp_mesh=mesh["dp"])
    pipe.schedule.step(*([input_ids] if pipe.has_first else []), attention_mask=mask, target=labels, losses=losses)

The model (a transformers Llama-style causal LM, peft-wrapped or not) is cut into stages by decoder layers, balanced
by count or as given: the first stage also holds the embedding, the last the final norm and lm_head. Each stage
recomputes the position ids, the causal mask and the rotary embedding from `attention_mask` (keyword arguments reach
every stage), so only hidden states (B, T, H) travel between ranks. All steps must share one batch shape: the
stages size their receive buffers at the first step.

Zero-bubble schedules split each stage's backward into an input-gradient pass and a deferred weight-gradient pass.
The NF4 base path yields input gradients only, so the LoRA weight gradients are what the weight pass computes.

Loss: the schedule sums the microbatch losses' gradients as they are (`scale_grads=False`); give it a `loss_fn`
that divides by the label tokens of the whole step (all microbatches, all data-parallel replicas) and multiplies by
the data-parallel size (FSDP2 averages gradients over dp), so the run equals one process.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import nn

from ..model import decoder_layers, transformers_model

# name -> (schedule class name in torch.distributed.pipelining, stages per rank)
SCHEDULES = {"gpipe": ("ScheduleGPipe", 1), "1f1b": ("Schedule1F1B", 1),
             "interleaved_zb": ("ScheduleInterleavedZeroBubble", 2), "zbv": ("ScheduleZBVZeroBubble", 2)}  # fmt: skip
ZERO_BUBBLE = ("interleaved_zb", "zbv")
COMPILED_ZERO_BUBBLE = ("torch.distributed.pipelining refuses zero-bubble schedules with compiled stages; drop "
                        "--compile or use --pp-schedule 1f1b / gpipe")  # fmt: skip
FUSED_WEIGHT_PASS = True  # zero-bubble weight passes in one autograd call (stage_backward_weight_fused)


class PipelineError(ValueError):
    """A pipeline setup that cannot run; the message names the fix."""


class DecoderStage(nn.Module):
    """Decoder layers [lo, hi) of a causal LM; the embedding if first, the final norm + lm_head if last.

    `compute_dtype` (bf16 / fp16): the stage runs under autocast to it, as the whole model would."""

    def __init__(self, model: nn.Module, lo: int, hi: int, first: bool, last: bool,
                 compute_dtype: torch.dtype | None = None):  # fmt: skip
        super().__init__()
        base = transformers_model(model)
        inner = base.model  # e.g. LlamaModel
        self.config = inner.config
        self.embed_tokens = inner.embed_tokens if first else None
        self.layers = nn.ModuleDict({str(i): decoder_layers(base)[i] for i in range(lo, hi)})
        self.rotary_emb = inner.rotary_emb
        self.norm = inner.norm if last else None
        self.lm_head = base.lm_head if last else None
        self.compute_dtype = compute_dtype if compute_dtype in (torch.bfloat16, torch.float16) else None

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=self.compute_dtype or torch.float32,
                            enabled=self.compute_dtype is not None):  # fmt: skip
            return self._forward(x, attention_mask)

    def _forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
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


def split_bounds(n_layers: int, n_stages: int, layers_per_stage: list[int] | None = None) -> list[tuple[int, int]]:
    """[lo, hi) layer ranges of n_stages stages: `layers_per_stage` as given, or balanced by layer count (the first
    stages take the remainder)."""
    if layers_per_stage:
        sizes = list(layers_per_stage)
        if len(sizes) != n_stages or sum(sizes) != n_layers or min(sizes) < 1:
            raise PipelineError(f"--pp-layers {','.join(map(str, sizes))}: give {n_stages} counts of at least 1 "
                                f"that add up to the model's {n_layers} decoder layers")  # fmt: skip
    else:
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


def stage_owner(schedule: str, stage: int, pp: int) -> int:
    """The pp rank that runs `stage` (the inverse of stage_indices)."""
    return next(r for r in range(pp) if stage in stage_indices(schedule, r, pp))


def n_stages(schedule: str, pp: int) -> int:
    return pp * SCHEDULES[schedule][1]


_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@dataclass
class Pipeline:
    schedule: object  # a torch.distributed.pipelining schedule
    modules: list[DecoderStage]  # this rank's stage modules (FSDP2-sharded over dp when a dp mesh was given)
    stages: list = field(default_factory=list)  # their PipelineStage objects
    has_first: bool = False  # whether this rank runs the first stage (it alone takes the input ids)
    name: str = "1f1b"
    pp: int = 1
    group: object = None  # the pp process group (None: the default group)

    @torch.no_grad()
    def forward_only(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """Logits (B, T, V) of a batch run through every stage in order, without a schedule (evaluation); on the
        rank of the last stage, None on the others. Every rank of the pp group calls it."""
        import torch.distributed as dist

        total = n_stages(self.name, self.pp)
        mine = {st.stage_index: mod for st, mod in zip(self.stages, self.modules)}
        group = self.group or dist.group.WORLD

        def peer(stage: int) -> int:  # the global rank that runs `stage`
            return dist.get_global_rank(group, stage_owner(self.name, stage, self.pp))

        h = input_ids
        for s in sorted(mine):
            if s > 0 and s - 1 not in mine:  # (B, T, H) from the previous stage's rank, its dtype code first
                code = torch.zeros(1, dtype=torch.long, device=input_ids.device)
                dist.recv(code, peer(s - 1), group=self.group)
                h = torch.empty(*input_ids.shape, mine[s].config.hidden_size, dtype=_DTYPES[int(code)],
                                device=input_ids.device)  # fmt: skip
                dist.recv(h, peer(s - 1), group=self.group)
            h = mine[s](h, attention_mask)
            if s < total - 1 and s + 1 not in mine:
                dist.send(torch.tensor([_DTYPES.index(h.dtype)], device=h.device), peer(s + 1), group=self.group)
                dist.send(h.contiguous(), peer(s + 1), group=self.group)
        self.reshard()
        return h if total - 1 in mine else None

    def reshard(self) -> None:
        """Free the gathered FSDP2 parameters (the stages keep them from a forward until the schedule's reduction)."""
        from torch.distributed.fsdp import FSDPModule

        for mod in self.modules:
            for m in mod.modules():
                if isinstance(m, FSDPModule):
                    m.reshard()


def build_pipeline(model: nn.Module, schedule: str, rank: int, pp: int, *, n_microbatches: int, loss_fn,
                   device: torch.device | str = "cpu", group=None, dp_mesh=None, fsdp: dict | None = None,
                   layers_per_stage: list[int] | None = None, compute_dtype: torch.dtype | None = None) -> Pipeline:  # fmt: skip
    """This rank's part of `schedule` on `pp` pipeline ranks (rank = its index in the pp group `group`).

    With `dp_mesh` every stage is sharded with FSDP2 over it: each decoder layer a unit, the stage the root;
    `fsdp` holds further `fully_shard` options (mp_policy, offload_policy; see fsdp_policies)."""
    import torch.distributed.pipelining as pipelining

    if schedule not in SCHEDULES:
        raise PipelineError(f"schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")
    if n_microbatches < pp:
        raise PipelineError(f"{n_microbatches} microbatches for {pp} stages leave ranks idle: use at least {pp}")
    layers = decoder_layers(model)
    if schedule in ZERO_BUBBLE and any(getattr(m, "_compiled_call_impl", None) is not None for m in layers):
        raise PipelineError(f"{schedule}: {COMPILED_ZERO_BUBBLE}")
    cls_name, per_rank = SCHEDULES[schedule]
    if schedule in ZERO_BUBBLE:
        _anchor_function_intermediates()
        if FUSED_WEIGHT_PASS:
            _use_fused_weight_pass()
    total = n_stages(schedule, pp)
    bounds = split_bounds(len(layers), total, layers_per_stage)
    mods, stages = [], []
    for s in stage_indices(schedule, rank, pp):
        mod = DecoderStage(model, *bounds[s], first=s == 0, last=s == total - 1, compute_dtype=compute_dtype)
        if dp_mesh is not None:
            _shard_stage(mod, dp_mesh, fsdp or {})
        mods.append(mod)
        stages.append(_stage_class()(mod, s, total, torch.device(device), group=group))
    cls = getattr(pipelining, cls_name)
    sched = cls(stages if per_rank > 1 else stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn,
                scale_grads=False)  # fmt: skip
    return Pipeline(sched, mods, stages, has_first=any(st.is_first for st in stages), name=schedule, pp=pp,
                    group=group)  # fmt: skip


@functools.cache
def _stage_class():
    """torch's PipelineStage whose first step opens no channel from a rank to itself: its channel-opening sends and
    receives (one each way between neighbouring stages) include, under ZBV, the pair of stages on one rank, which the
    gloo backend of torch 2.11 refuses ("Pair is not connected"). A rank's own stages pass tensors in memory."""
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage

    class Stage(PipelineStage):
        def _get_init_p2p_neighbors_ops(self) -> list:
            me = dist.get_rank(self.group)
            return [op for op in super()._get_init_p2p_neighbors_ops() if op.group_peer != me]

    return Stage


def stage_backward_weight_fused(weights, param_groups: list[dict], retain_graph: bool = False) -> tuple:
    """torch.distributed.pipelining's weight pass (`stage_backward_weight`) in one call into the autograd engine.

    The input pass saves, per group of parameters, the gradients reaching the group's intermediate autograd nodes;
    torch's weight pass then calls `autograd.grad` once per group: 14 groups per Llama decoder layer with LoRA on
    its 7 projections, each a Python round trip. Here all groups' edges go into one call. Every intermediate's
    incoming gradient is pinned to the saved one (a pre-hook), so an intermediate below another one is not counted
    twice (torch pins per group for the same reason). Returns the parameters' gradients as they were on entry."""
    from torch.autograd.graph import GradientEdge
    from torch.distributed.pipelining._backward import _get_grad_fn_or_grad_acc

    acc_to_weight, entry = {}, []
    for w in weights:
        acc_to_weight[_get_grad_fn_or_grad_acc(w)] = w
        entry.append(w.grad)
    edges, grads, params, hooks, anchors = [], [], [], [], []
    try:
        for group in param_groups:
            saved = group.pop("grads", None)
            inters = group.pop("intermediates")
            if saved is None:  # no gradient reached this group
                continue
            for grads_tuple, node in zip(saved, inters, strict=True):
                hooks.append(node.register_prehook(lambda grad_outputs, g=grads_tuple: g))
                for i, g in enumerate(grads_tuple):
                    if g is not None:
                        edges.append(GradientEdge(node, i))
                        grads.append(g)
            params.extend(group["params"])
            anchors.append(group.pop("anchors", None))  # released with the graph when this pass returns
        if edges and params:
            dws = _grad_of_edges(edges, [GradientEdge(a, 0) for a in params], grads, retain_graph)
            for acc, dw in zip(params, dws):
                w = acc_to_weight[acc]
                if dw is None:
                    continue
                if w.grad is None:
                    w.grad = dw
                else:
                    w.grad += dw
    finally:
        for h in hooks:
            h.remove()
    return tuple(entry)


def _grad_of_edges(outputs: list, inputs: list, grads: list, retain_graph: bool) -> tuple:
    """`torch.autograd.grad(outputs, inputs, grads, allow_unused=True)` for GradientEdge outputs, straight into the
    autograd engine: `autograd.grad` reads each output node's `_input_metadata` to check the gradients' shapes, which a
    custom autograd.Function's node does not have in torch 2.11 ("Attribute '_input_metadata' is invalid for this
    instance of _C._FunctionBase"). The gradients here are the ones autograd itself handed those nodes."""
    from torch.autograd.graph import _engine_run_backward

    return _engine_run_backward(tuple(outputs), tuple(grads), retain_graph, False, tuple(inputs), True,
                                accumulate_grad=False)  # fmt: skip


def _use_fused_weight_pass() -> None:
    """Route the stages' weight passes through stage_backward_weight_fused (idempotent)."""
    import torch.distributed.pipelining.stage as stage_module

    stage_module.stage_backward_weight = stage_backward_weight_fused


def _python_function_node(node) -> bool:
    """Whether an autograd node is a custom autograd.Function's (Python) node."""
    return isinstance(node, torch.autograd.function.BackwardCFunction)


def _cpp_consumers(node, reverse_edges: dict) -> list:
    """The nearest C++ autograd nodes above `node` (toward the outputs) in the reverse graph: each holds `node`
    alive through its edges, and so do the Python nodes between them."""
    found, todo, seen = [], list(reverse_edges.get(node, ())), set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if _python_function_node(n):
            todo.extend(reverse_edges.get(n, ()))
        else:
            found.append(n)
    return found


def anchored_param_groups(inputs, params, reverse_edges: dict) -> list[dict]:
    """torch's `get_param_groups`, with each group's custom-Function intermediates kept alive until the weight pass.

    The input pass detaches the stage outputs, which frees every autograd node not held elsewhere. torch keeps a
    group's intermediate nodes in the group; that holds a C++ node, but a custom autograd.Function's node (the fused
    LoRA kernels', kernels/lora_add.py and kernels/lora_swiglu.py) is a Python object that holds its C++ node weakly: freed, the
    weight pass fails ("Attribute 'register_prehook' is invalid for this instance of _C._FunctionBase"). Its nearest
    C++ consumers hold it, so the group keeps those ("anchors") until the weight pass has run."""
    groups = _TORCH_GET_PARAM_GROUPS[0](inputs, params, reverse_edges)
    for group in groups:
        anchors = [c for node in group["intermediates"] if _python_function_node(node)
                   for c in _cpp_consumers(node, reverse_edges)]  # fmt: skip
        if anchors:
            group["anchors"] = anchors
    return groups


_TORCH_GET_PARAM_GROUPS: list = []


def _anchor_function_intermediates() -> None:
    """Make the stages' input passes build their parameter groups with anchored_param_groups (idempotent)."""
    import torch.distributed.pipelining._backward as backward_module

    if not _TORCH_GET_PARAM_GROUPS:
        _TORCH_GET_PARAM_GROUPS.append(backward_module.get_param_groups)
        backward_module.get_param_groups = anchored_param_groups


def _shard_stage(mod: DecoderStage, dp_mesh, options: dict) -> None:
    from torch.distributed.fsdp import fully_shard

    from .fsdp import shard_decoder_layer, shard_kwargs, unit_kwargs

    # parameters stay gathered from a step's first forward to its gradient reduction (the schedule reshards them
    # there): microbatches do not all-gather again, and the zero-bubble input pass, which looks the stage's
    # parameters up to find their gradient nodes, finds the gathered ones the autograd graph used. CPU offload:
    # frozen weights only, as in apply_fsdp
    kwargs = shard_kwargs(mod, mesh=dp_mesh, **{**options, "reshard_after_forward": False})
    for layer in mod.layers.values():
        shard_decoder_layer(layer, kwargs)
    fully_shard(mod, **unit_kwargs([mod], kwargs))


def keep_only(model: nn.Module, modules: list[DecoderStage]) -> None:
    """Drop from `model` the decoder layers, embedding, norm and lm_head that none of `modules` uses, so a rank
    holds its stages' weights only (their parameter names stay those of the whole model)."""
    base = transformers_model(model)
    inner = base.model
    mine = {id(layer) for m in modules for layer in m.layers.values()}
    layers = decoder_layers(base)
    for i, layer in enumerate(layers):
        if id(layer) not in mine:
            layers[i] = nn.Module()  # an empty placeholder keeps the later layers' indices
    if all(m.embed_tokens is None for m in modules):
        inner.embed_tokens = nn.Module()
    if all(m.lm_head is None for m in modules):
        inner.norm, base.lm_head = nn.Module(), nn.Module()
