"""The loss-curve PNG written at the end of a run (matplotlib, no display needed)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .checkpoint import with_user_mode


def plot_loss(records: list[dict], path: Path) -> None:
    """Training loss per step, and the held-out loss where it was measured; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp.png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp)
        os.replace(with_user_mode(tmp), path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
