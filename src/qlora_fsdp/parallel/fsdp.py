"""apply_fsdp(): FSDP2 (`fully_shard`) on every decoder layer and on the root, with the NF4 base sharded.

Each NF4 weight is an `NF4Tensor` whose FSDP2 all-gather extension moves its uint8 bytes (see nf4/sharding.py):
at rest a rank holds 1/N of every weight's packed bytes and statistics (whole quant groups, on any number of
ranks: at most one group more), LoRA parameters, their gradients and optimizer states; in forward and backward a layer's 4-bit bytes are gathered, dequantized per matmul and freed.

CPU offload (an `offload_policy`) moves only frozen weights to the host: a decoder layer's NF4 bases form one
unit of their own that lives on the host (copied to the GPU, gathered and freed per use), while the LoRA weights,
their gradients and AdamW's states stay on the GPU with the norms. A unit holding a trainable parameter is never
offloaded, so no gradient crosses to the host and the optimizer step runs on the GPU.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model import decoder_layers
from ..nf4.tensor import NF4Tensor


def apply_fsdp(model: nn.Module, *, mesh=None, mp_policy=None, offload_policy=None, reshard_after_forward: bool = True):
    """Shard `model` (a transformers causal LM, peft-wrapped or not) in place with FSDP2; returns it."""
    from torch.distributed.fsdp import fully_shard

    kwargs = shard_kwargs(model, mesh=mesh, mp_policy=mp_policy, offload_policy=offload_policy,
                          reshard_after_forward=reshard_after_forward)  # fmt: skip
    for layer in decoder_layers(model):
        shard_decoder_layer(layer, kwargs)
    # the 16-bit embedding and lm_head (1 GiB each for Llama-3.1-8B) get units of their own, so that neither stays
    # gathered for the whole step as part of the root: the embedding is gathered for its lookup only, the lm_head
    # from the end of forward to the start of backward. Tied ones (one tensor in both) stay in the root.
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if emb is not None and head is not None and emb.weight is not head.weight:
        fully_shard(emb, **unit_kwargs([emb], kwargs))
        if not emb.weight.requires_grad:  # a frozen lookup has nothing to do in backward: not gathered again for it
            emb.set_unshard_in_backward(False)  # (1 GiB a step less all-gathered at the 8B shape)
        fully_shard(head, **{**unit_kwargs([head], kwargs), "reshard_after_forward": False})
    fully_shard(model, **unit_kwargs([model], kwargs))
    return model


def shard_decoder_layer(layer: nn.Module, kwargs: dict) -> None:
    """One FSDP2 unit for a decoder layer; under CPU offload two: its NF4 bases (one list unit, on the host) inside
    the layer's unit (LoRA weights and norms, on the GPU)."""
    from torch.distributed.fsdp import fully_shard

    if kwargs.get("offload_policy") is not None:
        bases = [m for m in layer.modules() if isinstance(getattr(m, "weight", None), NF4Tensor)]
        if bases:
            fully_shard(bases, **unit_kwargs(bases, kwargs))
    fully_shard(layer, **unit_kwargs([layer], kwargs))


def unit_kwargs(modules: list[nn.Module], kwargs: dict) -> dict:
    """`kwargs` for the unit of `modules`, without the offload policy where the unit would hold a trainable
    parameter (its gradient and optimizer states stay on the GPU)."""
    if kwargs.get("offload_policy") is None or not any(p.requires_grad for m in modules for p in own_parameters(m)):
        return kwargs
    return {k: v for k, v in kwargs.items() if k != "offload_policy"}


def own_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters `fully_shard(module)` would manage: those of `module` and its submodules, less those of
    submodules already sharded (units of their own)."""
    from torch.distributed.fsdp import FSDPModule

    found: dict[int, nn.Parameter] = {}

    def walk(m: nn.Module, top: bool) -> None:
        if not top and isinstance(m, FSDPModule):
            return
        found.update((id(p), p) for p in m.parameters(recurse=False))
        for child in m.children():
            walk(child, False)

    walk(module, True)
    return list(found.values())


def shard_kwargs(module: nn.Module, *, mesh=None, mp_policy=None, offload_policy=None,
                 reshard_after_forward: bool = True) -> dict:  # fmt: skip
    """`fully_shard` keyword arguments; the mesh by default: all ranks, on the device type of `module`'s parameters.
    Any NF4 weight shards over any number of ranks (whole quant groups per rank, nf4/sharding.py)."""
    if mesh is None:  # fully_shard's own default mesh is on the accelerator whenever one exists, even for a CPU model
        mesh = default_mesh(module)
    kwargs = {"reshard_after_forward": reshard_after_forward, "mesh": mesh, "mp_policy": mp_policy,
              "offload_policy": offload_policy}  # fmt: skip
    return {k: v for k, v in kwargs.items() if v is not None}


def default_mesh(module: nn.Module, device: torch.device | str | None = None):
    """A 1-D mesh over all ranks on `device`'s type, by default that of `module`'s parameters (CPU parameters: a CPU
    mesh, sharded and gathered over gloo, also on a machine with GPUs). A model loaded into host memory for GPU
    ranks names the GPU: fully_shard moves each unit to the mesh's device."""
    from torch.distributed.device_mesh import init_device_mesh

    if device is None:
        device = next((p.device for p in module.parameters() if p.device.type != "meta"), torch.device("cpu"))
    return init_device_mesh(torch.device(device).type, (torch.distributed.get_world_size(),))


def fsdp_policies(param_dtype: torch.dtype | None, *, cpu_offload: bool = False, pin_memory: bool = False) -> dict:
    """apply_fsdp's `mp_policy` / `offload_policy` arguments: parameters cast to `param_dtype` for compute with
    gradients reduced in fp32 (no policy for None or fp32), and the frozen weights' shards kept on the host
    (`cpu_offload`; see the module docstring)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    mixed = param_dtype is not None and param_dtype != torch.float32
    return {"mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if mixed else None,
            "offload_policy": CPUOffloadPolicy(pin_memory=pin_memory) if cpu_offload else None}  # fmt: skip


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` holds DTensor parameters (sharded by FSDP2)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_lora_state_dict(model: nn.Module) -> dict:
    """The trainable (LoRA) weights, whole, on CPU; under FSDP gathered from the shards (never the base).

    A collective when the model is sharded: every rank must call it."""
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu()
            for n, p in model.named_parameters() if p.requires_grad}  # fmt: skip


@torch.no_grad()
def load_full_state_dict(model: nn.Module, state: dict) -> None:
    """Copy whole tensors (every rank holds the same `state`, keys = parameter names) into the model's parameters,
    each rank keeping its shard of a sharded one. Raises on an unknown name or a shape mismatch."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    params = dict(model.named_parameters())
    for name, full in state.items():
        if name not in params:
            raise KeyError(f"{name}: no such parameter in the model")
        p = params[name]
        if tuple(full.shape) != tuple(p.shape):
            raise ValueError(f"{name}: shape {tuple(full.shape)} in the file, {tuple(p.shape)} in the model")
        if isinstance(p.to_local() if isinstance(p, DTensor) else p, NF4Tensor):  # a shard's bytes are not its rows
            raise ValueError(f"{name}: a frozen NF4 base weight comes from the checkpoint (load_model), not a state dict")
        if isinstance(p, DTensor):  # this rank's block of the whole tensor, no communication
            shape, offset = compute_local_shape_and_global_offset(full.shape, p.device_mesh, p.placements)
            block = full[tuple(slice(o, o + n) for o, n in zip(offset, shape))]
            p.to_local().copy_(block)
        else:
            p.copy_(full)


def set_accumulating(model: nn.Module, accumulating: bool) -> None:
    """Gradient accumulation under FSDP2: while `accumulating` (every microbatch but a step's last), keep gradients
    unsharded and unreduced and the (4-bit) parameters gathered after backward, so the next microbatch neither
    re-gathers them nor reduce-scatters partial gradients; the last microbatch reduces once and reshards."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(not accumulating)
        model.set_reshard_after_backward(not accumulating)
