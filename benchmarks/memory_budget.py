"""--max-memory on a GPU: the setup the planner picks for a budget, its predicted peak against the measured one, and
its tokens/s against the peer whose peak set the budget (issue 23: at every peer's peak, at least 1.5x its tokens/s).

    python benchmarks/memory_budget.py [--shapes 1x2048,4x2048,1x8192] [--budgets 7.0,10.0] [--peaks-from results.jsonl]

Budgets come from --budgets (GB, at every shape) or from the peers' measured peaks in results.jsonl (the newest
`peers` row of each system and shape on this GPU model, ours left out). Each budget runs ours (train_step.ours:
TrainLoop.train_step, compiled, the planner free to choose checkpointing, --keep-dequantized, the offloads and the
chunked loss) on a random Llama-3.1-8B-shape model in this process, one budget after another (a budget whose plan
is one already run at that shape reuses that run's row, marked same_run_as). Rows go to
results.jsonl (bench "memory_budget"); the table shows predicted vs measured (the planner's contract: within 10%),
and the ratio to the peer's tokens/s.

`--check` prints the memory model (qlora_fsdp.memory.budget.predict_peak) against every peak of ours measured so
far in results.jsonl, without a GPU (tests/memory/test_budget.py holds it to 10%).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, append_results, environment, model_config, parse_shapes  # noqa: E402

# the setups of peers.py's and train_step.py's systems of ours (train_step.ours checkpoints unless told not to)
NAMED = {"ours_fastest": {"keep_dequantized": True, "chunked_loss": True, "compile": True},
         "ours_ac": {"activation_checkpointing": True, "chunked_loss": True, "compile": True},
         "ours_ac_keep": {"activation_checkpointing": True, "keep_dequantized": True, "chunked_loss": True,
                          "compile": True},
         "ours_leanest": {"activation_checkpointing": True, "offload_activations": True, "embedding_on_cpu": True,
                          "chunked_loss": True, "compile": True}}  # fmt: skip


def measured_setups(rows: list[dict]) -> list[tuple[dict, int, int, float, dict]]:
    """(options, batch, seq, measured peak GB, row) of every peak of ours at the 8B shape in `rows` (the newest per
    system, shape and budget): train_step's "ours[_compiled][_chunked][/option=value...]", peers' named systems, and
    memory_budget's / peers' budget rows with the setup they chose. Runs with chunked MLPs or a loss chunk of
    their own are left out (the model has no term for them)."""
    newest = {}
    for r in rows:
        name = str(r.get("system", ""))
        if r.get("config", "llama-3.1-8b") != "llama-3.1-8b" or not r.get("peak_gb") or not r.get("batch"):
            continue
        if r.get("same_run_as"):  # another row's peak, counted there
            continue
        if r.get("bench") in ("peers", "memory_budget") and r.get("setup"):
            options = {**r["setup"], "compile": True}
        elif r.get("bench") == "peers" and name in NAMED:
            options = dict(NAMED[name])
        elif r.get("bench") == "train_step" and name.startswith("ours"):
            base, *extra = name.split("/")
            options = {"activation_checkpointing": True, "compile": "compiled" in base, "chunked_loss": "chunked" in base}
            options.update((k, int(v)) for k, v in (x.split("=") for x in extra))
            if options.get("mlp_chunk_tokens") or options.get("loss_chunk_tokens"):
                continue
        else:
            continue
        key = (r.get("bench"), name, r["batch"], r["seq"], r.get("budget_gb"))  # each budget's run its own peak
        newest[key] = (options, r["batch"], r["seq"], r["peak_gb"], r)
    return list(newest.values())


def predicted_gb(config, options: dict, batch: int, seq: int) -> float:
    from qlora_fsdp.memory.budget import Setup, predict_peak

    fields = {k: (v if k == "ac_keep_layers" else bool(v)) for k, v in options.items() if k in Setup.__dataclass_fields__}
    return predict_peak(config, batch, seq, Setup(**fields), compiled=bool(options.get("compile")))["total"] / 1e9


def check(path: Path) -> list[tuple[dict, float]]:
    """Print the model against every measured peak of ours; return (the run's options, relative miss) of each."""
    config = model_config("llama-3.1-8b")
    misses = []
    for options, b, t, measured, r in measured_setups([json.loads(x) for x in path.read_text().splitlines()]):
        miss = predicted_gb(config, options, b, t) / measured - 1
        misses.append((options, miss))
        on = ",".join(k for k, v in options.items() if v and k != "compile") + (" compiled" if options.get("compile") else "")
        print(f"  {r['system'][:44]:<44} {b}x{t:<6} measured {measured:6.2f} GB, predicted {measured * (1 + miss):6.2f} "
              f"({miss:+.1%})  {on}  ({r.get('gpu', '?')}, {r.get('commit', '?')})")  # fmt: skip
    return misses


def peer_peaks(path: Path, gpu: str, shapes: list[tuple[int, int]]) -> list[tuple[str, int, int, float, float]]:
    """(peer, batch, seq, peak GB, tokens/s) of the newest peers row of each peer and shape on `gpu`."""
    newest = {}
    for r in (json.loads(x) for x in path.read_text().splitlines()) if path.is_file() else []:
        if r.get("bench") == "peers" and r.get("gpu") == gpu and r.get("peak_gb") and not r["system"].startswith("ours"):
            if (r["batch"], r["seq"]) in shapes:
                newest[(r["system"], r["batch"], r["seq"])] = (r["peak_gb"], r["tokens_per_s"])
    return [(name, b, t, peak, tok) for (name, b, t), (peak, tok) in sorted(newest.items())]


def planned(config, batch: int, seq: int, gb: float):
    """(batch, seq, the setup --max-memory gb plans): budgets with the same key run the same step; None when no
    setup fits (the loop then says so itself)."""
    from qlora_fsdp.memory.budget import BudgetError, plan

    try:
        return batch, seq, plan(config, batch, seq, gb * 1e9, compiled=True)[0]
    except BudgetError:
        return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="1x2048")
    p.add_argument("--budgets", default="", help="GB, comma-separated (default: the peers' peaks, --peaks-from)")
    p.add_argument("--peaks-from", default=str(RESULTS))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--check", action="store_true", help="the model against the measured peaks; no GPU")
    args = p.parse_args()
    if args.check:
        misses = [miss for _, miss in check(Path(args.peaks_from))]
        print(f"{len(misses)} peaks, largest miss {max(map(abs, misses)):.1%}")
        return
    import torch
    import train_step

    from qlora_fsdp.memory.budget import Setup
    from qlora_fsdp.training.config import TrainError

    shapes = parse_shapes(args.shapes)
    env = environment()
    if args.budgets:
        runs = [("--budgets", b, t, float(gb), None) for gb in args.budgets.split(",") for b, t in shapes]
    else:
        runs = peer_peaks(Path(args.peaks_from), env["gpu"], shapes)
        if not runs:
            raise SystemExit(f"memory_budget.py: no peers rows for {env['gpu']} at {args.shapes} in "
                             f"{args.peaks_from}: run peers.py first, or give --budgets")  # fmt: skip
    config, rows, measured = model_config("llama-3.1-8b"), [], {}
    for peer, b, t, gb, peer_tok in runs:
        key = planned(config, b, t, gb)
        same = measured.get(key)
        if same is not None:  # another budget at this shape planned the same setup: its run stands for this one
            row = {**same, "system": f"ours_budget@{peer}", "budget_gb": gb, "peer_tokens_per_s": peer_tok,
                   "same_run_as": same["system"]}  # fmt: skip
            rows.append(row)
            append_results([row])
            print({k: v for k, v in row.items() if k not in env}, flush=True)
            continue
        try:
            step = train_step.ours(config, None, compile=True, chunked=False, activation_checkpointing=False,
                                   max_memory=str(gb), batch_size=b, max_length=t)  # fmt: skip
        except TrainError as e:  # a budget below the leanest setup: said, and the other budgets go on
            print(f"{peer} {b}x{t} {gb:.2f} GB: {e}", flush=True)
            continue
        loop = step.loop
        setup = {name: getattr(loop.cfg, name) for name in Setup.__dataclass_fields__}
        r = train_step.time_shape(step, config, b, t, args.warmup, args.iters)
        row = {**env, "bench": "memory_budget", "system": f"ours_budget@{peer}", "batch": b, "seq": t,
               "budget_gb": gb, "predicted_gb": loop.predicted_peak / 1e9, "setup": setup, **r,
               "peer_tokens_per_s": peer_tok}  # fmt: skip
        rows.append(row)
        measured[key] = row
        append_results([row])
        print({k: v for k, v in row.items() if k not in env}, flush=True)
        del step, loop
        train_step.free_memory(between_systems=True)
        torch.cuda.reset_peak_memory_stats()
    print(f"\n{'budget from':<24} {'shape':>7} {'budget':>7} {'predicted':>9} {'measured':>8} {'miss':>6} "
          f"{'tokens/s':>9} {'x peer':>7}")  # fmt: skip
    for r in rows:
        miss = r["predicted_gb"] / r["peak_gb"] - 1 if r.get("peak_gb") else float("nan")
        ratio = r["tokens_per_s"] / r["peer_tokens_per_s"] if r.get("peer_tokens_per_s") and r.get("tokens_per_s") else float("nan")
        print(f"{r['system'].removeprefix('ours_budget@'):<24} {r['batch']}x{r['seq']:<5} {r['budget_gb']:7.2f} "
              f"{r['predicted_gb']:9.2f} {r.get('peak_gb', float('nan')):8.2f} {miss:+6.1%} "
              f"{r.get('tokens_per_s', float('nan')):9,.0f} {ratio:7.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
