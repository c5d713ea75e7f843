"""benchmarks/pareto.py: the Pareto front against a brute-force definition, row selection, and a drawn PNG."""

from __future__ import annotations

import itertools
import json
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import pareto  # noqa: E402


def test_front_is_exactly_the_points_nothing_dominates():
    rng = random.Random(1)
    for _ in range(100):
        pts = {f"s{i}": (rng.randint(1, 20), rng.randint(1, 20)) for i in range(rng.randint(1, 9))}
        dominated = {a for a, b in itertools.permutations(pts, 2)
                     if pts[b][0] <= pts[a][0] and pts[b][1] >= pts[a][1] and pts[b] != pts[a]}  # fmt: skip
        front = pareto.pareto_front(pts)
        assert set(front) == set(pts) - dominated
        assert [pts[n][0] for n in front] == sorted(pts[n][0] for n in front)


def _row(commit, system, batch, seq, tok_s, peak, date="2026-11-30T00:00:00", gpu="NVIDIA H200"):
    return {"bench": "peers", "commit": commit, "gpu": gpu, "date": date, "system": system, "batch": batch,
            "seq": seq, "tokens_per_s": tok_s, "peak_gb": peak}  # fmt: skip


def test_points_come_from_the_newest_commit_and_the_newest_row(tmp_path):
    rows = [_row("old", "hf", 1, 2048, 1.0, 10.0, date="2026-11-01T00:00:00"),
            _row("new", "hf", 1, 2048, 2.0, 10.0, date="2026-11-02T00:00:00"),
            _row("new", "hf", 1, 2048, 3.0, 11.0, date="2026-11-03T00:00:00"),
            _row("new", "ours", 1, 2048, 9.0, 8.0, date="2026-11-03T00:00:00"),
            {**_row("new", "ours", 4, 2048, 0.0, 0.0), "oom": True},
            {**_row("new", "ours_budget@hf", 1, 2048, 9.0, 30.2), "budget_gb": 10.0},  # past its budget: left out
            {**_row("new", "ours_budget@noac", 1, 2048, 9.0, 8.5), "budget_gb": 21.6},
            {**_row("new", "ours_budget@--budgets", 1, 2048, 7.0, 6.9), "budget_gb": 7.0, "bench": "memory_budget"},
            {**_row("new", "ours_budget@--budgets", 1, 2048, 8.0, 8.5), "budget_gb": 8.6, "bench": "memory_budget"},
            {"bench": "train_step", "commit": "new", "system": "x"}]  # fmt: skip
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    points, commit, gpu = pareto.load_points(path, "peers")
    assert commit == "new" and gpu == "NVIDIA H200"
    assert points == {(1, 2048): {"hf": (11.0, 3.0), "ours": (8.0, 9.0), "ours_budget@noac": (8.5, 9.0)}}
    # with memory_budget.py's rows: those of --budgets named by their budget
    both = pareto.load_points(path, "peers,memory_budget")[0][(1, 2048)]
    assert both == {**points[(1, 2048)], "ours_budget@7GB": (6.9, 7.0), "ours_budget@8.6GB": (8.5, 8.0)}
    assert pareto.load_points(path, "peers", commit="old")[0] == {(1, 2048): {"hf": (10.0, 1.0)}}
    with pytest.raises(SystemExit, match="no 'peers' rows at commit nope"):
        pareto.load_points(path, "peers", commit="nope")


def test_draw_writes_a_png(tmp_path):
    out = pareto.draw({(1, 2048): {"hf": (10.0, 3.0), "ours": (8.0, 9.0)}, (4, 2048): {"hf": (20.0, 5.0)}},
                      "title", tmp_path / "p.png")  # fmt: skip
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
