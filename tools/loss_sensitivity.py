"""How far the embedded default's loss curve moves when its LoRA weights move by one rounding step.

    python tools/loss_sensitivity.py [--precision fp32|bf16] [--steps 20]

Runs the embedded default twice in eager mode (CPU): as it is, and with every LoRA weight scaled by (1 + 1.2e-7)
after initialisation (about one fp32 rounding step), and prints the per-step relative difference of the losses.
What it shows: how much this run amplifies a rounding-size difference, the floor under any comparison of two
implementations that are not equal to the bit (e.g. inductor against eager).
"""

import argparse

import torch

from qlora_fsdp.training import TrainConfig, TrainLoop


def losses(precision: str, steps: int, perturb: bool, out: str) -> torch.Tensor:
    cfg = TrainConfig(output_dir=out, max_steps=steps, lr=3e-3, batch_size=16, warmup_steps=10, lora_r=16, lora_alpha=32,
                      precision=precision, group_by_length=False, progress=False, device="cpu", eval_every=0)  # fmt: skip
    loop = TrainLoop(cfg)
    if perturb:
        with torch.no_grad():
            for p in loop.params:
                p.mul_(1 + 1.2e-7)
    return torch.tensor([r["loss"] for r in loop.train() if "loss" in r])


if __name__ == "__main__":
    import tempfile

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        a = losses(args.precision, args.steps, False, f"{tmp}/a")
        b = losses(args.precision, args.steps, True, f"{tmp}/b")
    rel = ((a - b).abs() / a.abs()).tolist()
    print(f"{args.precision}: per-step relative difference after a 1.2e-7 relative change of the LoRA weights")
    print(" ".join(f"{x:.1e}" for x in rel))
    print(f"max {max(rel):.1e}")
