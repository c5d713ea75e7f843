"""Tokens/s against peak GPU memory, one point per system and configuration, one panel per shape, from results.jsonl.

    python benchmarks/pareto.py [--bench peers,memory_budget] [--commit abc1234] [--gpu H200] [--out benchmarks/pareto.png]

Takes the rows of the benches named by `--bench` (peers.py's and memory_budget.py's by default; train_step.py's
work too) of one commit (by default the newest that has such rows) and one GPU model, the newest row per (system,
shape); a --max-memory row is named by the peer whose peak set its budget, or by the budget, and one that peaked
past its budget is left out. In each panel the points on the Pareto front (no other point is both faster and leaner) are
joined by a line; a system's label sits by its point.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

RESULTS = Path(__file__).with_name("results.jsonl")


def load_points(path: Path, bench: str, commit: str | None = None, gpu: str | None = None) -> tuple[dict, str, str]:
    """{(batch, seq): {system: (peak GB, tokens/s)}}, the commit and the GPU they come from; `bench`: names,
    comma-separated."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("bench") in bench.split(",") and "tokens_per_s" in r and "peak_gb" in r and not r.get("oom")
            and not over_budget(r)]  # fmt: skip
    if gpu:
        rows = [r for r in rows if gpu.lower() in (r.get("gpu") or "").lower()]
    if not rows:
        raise SystemExit(f"pareto.py: no {bench!r} rows with tokens/s and peak memory in {path}"
                         + (f" on a GPU matching {gpu!r}" if gpu else ""))  # fmt: skip
    commit = commit or max(rows, key=lambda r: r.get("date", ""))["commit"]
    rows = [r for r in rows if r.get("commit") == commit]
    if not rows:
        raise SystemExit(f"pareto.py: no {bench!r} rows at commit {commit}")
    gpus = {r.get("gpu") for r in rows}
    if len(gpus) > 1:
        raise SystemExit(f"pareto.py: rows of several GPUs at {commit} ({sorted(map(str, gpus))}): pick one with --gpu")
    points: dict = {}
    for r in sorted(rows, key=lambda r: r.get("date", "")):  # the newest row per (system, shape) wins
        points.setdefault((r["batch"], r["seq"]), {})[label(r)] = (r["peak_gb"], r["tokens_per_s"])
    return points, commit, gpus.pop() or "?"


def label(row: dict) -> str:
    """A row's name in the plot: its system; memory_budget.py's --budgets rows (no peer) by their budget."""
    if row["system"].endswith("@--budgets"):
        return f"ours_budget@{row['budget_gb']:g}GB"
    return row["system"]


def over_budget(row: dict) -> bool:
    """A --max-memory row (peers.py's ours_budget@peer) that peaked past its budget: not a point at that memory."""
    return "budget_gb" in row and row["peak_gb"] > row["budget_gb"]


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """The systems no other system beats on both axes (less memory and more tokens/s), by memory."""
    front = []
    for name, (mem, speed) in points.items():
        beaten = any(m <= mem and s >= speed and (m, s) != (mem, speed) for m, s in points.values())
        if not beaten:
            front.append(name)
    return sorted(front, key=lambda n: points[n][0])


def draw(points: dict, title: str, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted(points, key=lambda s: (s[0] * s[1], s))
    fig, axes = plt.subplots(1, len(shapes), figsize=(5.2 * len(shapes), 4.4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        pts = points[shape]
        for name, (mem, speed) in pts.items():
            ours = name.startswith("ours")
            ax.scatter(mem, speed, color="tab:red" if ours else "tab:blue", zorder=3)
            ax.annotate(name, (mem, speed), textcoords="offset points", xytext=(4, 4), fontsize=7)
        front = pareto_front(pts)
        ax.plot([pts[n][0] for n in front], [pts[n][1] for n in front], color="gray", lw=1, ls="--", zorder=2)
        ax.set_title(f"{shape[0]} x {shape[1]} tokens")
        ax.set_xlabel("peak GPU memory (GB)")
        ax.set_ylabel("tokens/s")
        ax.grid(alpha=0.3)
    fig.suptitle("\n".join(textwrap.wrap(title, 70 * len(shapes))), fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--bench", default="peers,memory_budget")
    p.add_argument("--commit", default=None)
    p.add_argument("--gpu", default=None, help="a part of the GPU's name, e.g. H200")
    p.add_argument("--out", default=str(Path(__file__).with_name("pareto.png")))
    args = p.parse_args()
    points, commit, gpu = load_points(Path(args.results), args.bench, args.commit, args.gpu)
    title = f"QLoRA step, Llama-3.1-8B shape, r=16 on all 7 projections: {gpu}, commit {commit} ({args.bench})"
    print(draw(points, title, Path(args.out)))
    for shape, pts in sorted(points.items()):
        print(f"{shape[0]}x{shape[1]}: Pareto front {' < '.join(pareto_front(pts))}")


if __name__ == "__main__":
    main()
