"""What the GPU of a tensor's device can do: its compute capability and whether it computes in bf16.

    cuda_capability(device) -> (major, minor), or None for a CPU device
    has_bf16(device)        -> bool: sm80 (Ampere) and later; CPUs too

Every capability question in the package goes through cuda_capability, so that one environment variable can make
the package take another GPU's paths: QLORA_FSDP_CUDA_CAPABILITY=7.5 makes every CUDA device answer sm75 (a Tesla
T4: fp16 only, Triton's tl.dot without tensor cores), which is how the GPU gate emulates a T4 on an H200. It is read
once, at import: compiled layers call cuda_capability, and Dynamo must see the same answer on every pass.
"""

from __future__ import annotations

import os

import torch

CAPABILITY_ENV = "QLORA_FSDP_CUDA_CAPABILITY"


def _emulated(value: str | None) -> tuple[int, int] | None:
    if not value:
        return None
    try:
        major, minor = (int(x) for x in value.strip().split("."))
    except ValueError:
        raise ValueError(f"{CAPABILITY_ENV}={value!r}: write major.minor, e.g. 7.5") from None
    return major, minor


EMULATED = _emulated(os.environ.get(CAPABILITY_ENV))


def cuda_capability(device: torch.device | str) -> tuple[int, int] | None:
    """(major, minor) of a CUDA device (EMULATED where set); None for any other device. No cache of its own:
    compiled layers call it, and Dynamo must see the same answer on every pass of its analysis."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    if EMULATED is not None:
        return EMULATED
    props = torch.cuda.get_device_properties(device)  # constant-folded by Dynamo (get_device_capability is not)
    return props.major, props.minor


def has_bf16(device: torch.device | str) -> bool:
    """Whether the device computes in bf16: CUDA from sm80 on (a T4, sm75, emulates it slowly or not at all)."""
    capability = cuda_capability(device)
    return capability is None or capability >= (8, 0)


def describe(device: torch.device | str) -> str:
    """'NVIDIA H200 (sm90)', 'Tesla T4 (sm75)', 'cpu' (emulated capabilities say so)."""
    device = torch.device(device)
    capability = cuda_capability(device)
    if capability is None:
        return device.type
    name = torch.cuda.get_device_name(device)
    emulated = f", emulated by {CAPABILITY_ENV}" if EMULATED is not None else ""
    return f"{name} (sm{capability[0]}{capability[1]}{emulated})"
