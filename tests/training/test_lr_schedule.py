"""The lr schedule: the first step trains (lr / warmup, where transformers' schedule starts at 0), the warmup ends
at the full lr, and the decay is transformers' cosine step for step."""

import pytest
import torch
from transformers import get_cosine_schedule_with_warmup

from qlora_fsdp.training.lr_schedule import warmup_cosine


def lrs(make, steps):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched, out = make(opt), []
    for _ in range(steps):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("warmup, total", [(4, 12), (1, 5), (0, 6), (5, 5)])
def test_warmup_starts_above_zero_and_the_decay_is_transformers_cosine(warmup, total):
    ours = lrs(lambda o: warmup_cosine(o, warmup, total), total)
    theirs = lrs(lambda o: get_cosine_schedule_with_warmup(o, warmup, total), total)
    assert ours[0] == (2.0 / warmup if warmup else 2.0)
    assert ours[:warmup] == pytest.approx([2.0 * (k + 1) / warmup for k in range(warmup)])
    assert ours[warmup:] == pytest.approx(theirs[warmup:])
