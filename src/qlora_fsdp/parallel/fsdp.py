"""apply_fsdp(): FSDP2 (`fully_shard`) on every decoder layer and on the root, with the NF4 base sharded.

Each NF4 weight is an `NF4Tensor` whose FSDP2 all-gather extension moves its uint8 bytes (see nf4/sharding.py):
at rest a rank holds 1/N of every weight's packed bytes and statistics, LoRA parameters, their gradients and
optimizer states; in forward and backward a layer's 4-bit bytes are gathered, dequantized per matmul and freed.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model import decoder_layers
from ..nf4 import NF4FormatError
from ..nf4.sharding import check_shardable
from ..nf4.tensor import NF4Tensor


def apply_fsdp(model: nn.Module, *, mesh=None, mp_policy=None, offload_policy=None, reshard_after_forward: bool = True):
    """Shard `model` (a transformers causal LM, peft-wrapped or not) in place with FSDP2; returns it."""
    from torch.distributed.fsdp import fully_shard

    world = mesh.size() if mesh is not None else torch.distributed.get_world_size()
    for name, p in model.named_parameters():
        if isinstance(p, NF4Tensor):
            try:
                check_shardable(p.nf4, world)
            except NF4FormatError as e:
                raise NF4FormatError(f"{name}: {e}") from None
    kwargs = {"reshard_after_forward": reshard_after_forward}
    if mesh is not None:
        kwargs["mesh"] = mesh
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    if offload_policy is not None:
        kwargs["offload_policy"] = offload_policy
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model
