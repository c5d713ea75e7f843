"""Intra-op threads of a rank: the host's cores shared among the ranks of a machine, as torchrun does.

Each process's torch uses every core by default. N ranks on one host then run N x cores threads on cores
threads' worth of hardware, and OpenMP's spinning barriers make small CPU ops several times slower (gloo ranks
on a 32-core GPU host ran the parallel tests 2-6x slower than on 2 cores). An explicit OMP_NUM_THREADS wins.
"""

from __future__ import annotations

import os


def host_cores() -> int:
    """The cores this process may run on (its affinity mask, e.g. a container's share), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def share_cpu_cores(ranks_on_host: int) -> int:
    """Set this rank's torch intra-op threads to host cores // ranks_on_host (at least 1), unless OMP_NUM_THREADS
    is set; returns the number of threads now in use."""
    import torch

    if not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(max(1, host_cores() // max(1, ranks_on_host)))
    return torch.get_num_threads()
