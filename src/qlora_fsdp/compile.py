"""Regional torch.compile of a QLoRA model: every decoder layer with fullgraph=True, and the loss.

    compile_model(model)                 # in place, after LoRA, activation checkpointing and FSDP2
    loss_sum = compile_loss(token_loss_sum)
    ...
    print(compile_counts())              # {"graphs": 2, "graph_breaks": 0, ...}

Inside a layer the NF4 weight traces as a tensor subclass (`NF4Tensor.__tensor_flatten__`); `F.linear` on it runs
`nf4_linear`, whose dequantization is the `triton_op` kernel on CUDA (the PyTorch reference on CPU), tagged to be
recomputed in backward rather than saved, as in eager mode (nf4/linear.py).

Recompilation is bounded: `dynamic=True` makes batch size and sequence length symbols from the first call, so one
graph serves every length. All decoder layers share one code object, hence one set of graphs; what remains are the
distinct code paths (a batch without padding has `attention_mask=None`, training vs evaluation, the loss): a few
graphs for a run of any length. `fail_on_recompile_limit_hit` turns the silent fallback to eager past Dynamo's
limit (8 per code object) into an error.

Inductor draws its own random numbers, so LoRA dropout would not match eager masks; with dropout on, inductor uses
eager's generator (`fallback_random`, a global inductor setting).
"""

from __future__ import annotations

import torch
from torch import nn

from .memory.input_grad import embedding_output_requires_grad
from .model import decoder_layers


_SKIP_FWD_SIDE_EFFECTS = "skip_fwd_side_effects_in_bwd_under_checkpoint"


def _has_dropout(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())


def _configure(backend: str, model: nn.Module | None = None) -> None:
    import torch._dynamo

    torch._dynamo.config.fail_on_recompile_limit_hit = True
    if model is not None and hasattr(torch._dynamo.config, _SKIP_FWD_SIDE_EFFECTS):
        # transformers' own checkpointing (gradient_checkpointing_enable, or the Trainer's gradient_checkpointing=True,
        # which may come after this call) calls torch.utils.checkpoint inside each decoder layer's forward in
        # transformers 5, so the compiled region holds it. Dynamo then refuses a forward side effect it would not
        # replay in the recomputation, such as the context variable the `kernels` hub sets around attention (which
        # kernel runs: bookkeeping, no math). Not replaying it is safe for these layers: the recomputation computes
        # the same tensors (tests/lora/test_fuse.py). Our own checkpointing wraps the compiled layer: no effect there.
        setattr(torch._dynamo.config, _SKIP_FWD_SIDE_EFFECTS, True)
    if backend == "inductor" and model is not None and _has_dropout(model):
        import torch._inductor.config

        torch._inductor.config.fallback_random = True


def compile_model(model: nn.Module, *, backend: str = "inductor", dynamic: bool = True, fullgraph: bool = True,
                  mode: str | None = None) -> nn.Module:  # fmt: skip
    """Compile every decoder layer of `model` (a transformers causal LM, peft-wrapped or not) in place; returns it.
    fullgraph=False allows graph breaks (sequence-chunked MLPs run outside the graph: memory/chunked_mlp.py); mode is
    inductor's (e.g. "max-autotune-no-cudagraphs": Triton matmul templates tried against cuBLAS, fused epilogues).

    The embedding output is made to require grad (`memory/input_grad.py`), so the first layer sees the same kind of input
    as the others and shares their graph."""
    _configure(backend, model)
    embedding_output_requires_grad(model)
    for layer in decoder_layers(model):
        layer.register_forward_pre_hook(_input_as_view)  # after FSDP2's own pre-forward hook
        layer.compile(backend=backend, fullgraph=fullgraph, dynamic=dynamic, mode=mode)
    return model


@torch.compiler.disable  # a hook runs as a frame of its own: Dynamo need not compile (and guard) it
def _input_as_view(module: nn.Module, args: tuple):
    """The layer's hidden states as a view of themselves: compiled graphs guard on whether an input is a view, and
    FSDP2's pre-forward hook makes it one (it passes the inputs through an autograd Function) in forward but not
    when non-reentrant checkpointing recomputes the layer in backward. Unchanged, the recomputation would compile a
    second graph whose saved tensors differ from the forward's (torch.utils.checkpoint.CheckpointError). A view of a
    view has the same base, so every call now sees a view of the same shape: one graph, no copy."""
    if args and isinstance(args[0], torch.Tensor):
        return (args[0].view_as(args[0]), *args[1:])
    return None


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over the predicted tokens of the cross-entropy (fp32): logits (B, T, V), labels (B, T), -100 ignored."""
    logits = logits[:, :-1].float()  # (B, T-1, V): position t predicts token t+1
    labels = labels[:, 1:]
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                                       reduction="sum")  # fmt: skip


def compile_loss(fn=token_loss_sum, *, backend: str = "inductor", dynamic: bool = True):
    _configure(backend)
    return torch.compile(fn, backend=backend, fullgraph=True, dynamic=dynamic)


def compile_counts() -> dict:
    """Graphs compiled, graph breaks and recompilations (a frame compiled again because the guards of its earlier
    graphs failed) so far in this process (Dynamo's counters and guard-failure record)."""
    from torch._dynamo.utils import counters, guard_failures

    return {
        "graphs": int(counters["stats"]["unique_graphs"]),
        "graph_breaks": int(sum(counters["graph_break"].values())),
        "recompiles": sum(len(reasons) for reasons in guard_failures.values()),
    }
