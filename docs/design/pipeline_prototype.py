# Design spike for issue 6 (pipeline parallelism), kept for the implementation: not part of the package, not tested.
"""Prototype: pipeline parallelism (torch.distributed.pipelining) for the peft-wrapped NF4 Llama of qlora_fsdp.

    python pp_proto.py SCHEDULE [--pp 2] [--dp 1] [--mb 4] [--steps 4]
SCHEDULE: gpipe | 1f1b | izb (ScheduleInterleavedZeroBubble, 2 stages/rank) | zbv (ScheduleZBVZeroBubble)
Compares per-step losses and final LoRA weights with one process on the same global batch (fp32, AdamW).
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: tests.* helpers
from qlora_fsdp.compile import token_loss_sum  # noqa: E402
from qlora_fsdp.model import decoder_layers, load_model  # noqa: E402
from qlora_fsdp.parallel.pipeline import DecoderStage, split_bounds, stage_indices  # noqa: E402
from qlora_fsdp.training import TrainConfig, add_lora, seed_everything  # noqa: E402
from tests.training.test_loop import synthetic_examples  # noqa: E402

T_FIX = 20  # every batch padded to one length: PipelineStage fixes its recv buffer shapes at the first step
GLOBAL_B = 8
LR = 5e-3


# ------------------------------------------------------------------------------------------------ data / model
def batches(steps):
    ex = synthetic_examples(n=GLOBAL_B * steps)
    out = []
    for s in range(steps):
        e = ex[s * GLOBAL_B:(s + 1) * GLOBAL_B]
        pad = lambda xs, v: [x + [v] * (T_FIX - len(x)) for x in xs]  # noqa: E731
        out.append({"input_ids": torch.tensor(pad([x["input_ids"] for x in e], 0)),
                    "labels": torch.tensor(pad([x["labels"] for x in e], -100)),
                    "attention_mask": torch.tensor(pad([[1] * len(x["input_ids"]) for x in e], 0))})
    return out


def n_label_tokens(b):
    return int((b["labels"][:, 1:] != -100).sum())


def build_peft_model(model_dir):
    cfg = TrainConfig(output_dir="/tmp/unused", lora_r=4, lora_alpha=8, precision="fp32", device="cpu")
    seed_everything(cfg.seed)  # same LoRA init on every rank, as TrainLoop
    return add_lora(load_model(model_dir, dtype=torch.float32, device="cpu"), cfg)


# the stage module, the balanced split and the stage-to-rank layouts now live in qlora_fsdp.parallel.pipeline
SCHEDULE_NAMES = {"gpipe": "gpipe", "1f1b": "1f1b", "izb": "interleaved_zb", "zbv": "zbv"}


# ------------------------------------------------------------------------------------------------ reference
def reference(model_dir, bs):
    model = build_peft_model(model_dir)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    losses = []
    for b in bs:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
        loss = token_loss_sum(logits, b["labels"]) / n_label_tokens(b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return losses, lora


# ------------------------------------------------------------------------------------------------ PP worker
def worker(rank, world, port, out, model_dir, schedule, pp, dp, n_mb, steps, compile_mode="none"):
    import torch.distributed as dist
    from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleGPipe,
                                              ScheduleInterleavedZeroBubble, ScheduleZBVZeroBubble)

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        if dp > 1:
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh("cpu", (pp, dp), mesh_dim_names=("pp", "dp"))
            pp_group, pp_rank, dp_rank = mesh.get_group("pp"), mesh["pp"].get_local_rank(), mesh["dp"].get_local_rank()
        else:
            mesh, pp_group, pp_rank, dp_rank = None, None, rank, 0
        model = build_peft_model(model_dir)
        n_layers = len(decoder_layers(model))
        n_stages = pp * (1 if schedule in ("gpipe", "1f1b") else 2)
        bounds = split_bounds(n_layers, n_stages)
        names = {id(p): n for n, p in model.named_parameters()}
        mods, stages = [], []
        for s in stage_indices(SCHEDULE_NAMES[schedule], pp_rank, pp):
            m = DecoderStage(model, *bounds[s], first=s == 0, last=s == n_stages - 1)
            m.full_names = {n: names[id(p)] for n, p in m.named_parameters()}  # before FSDP swaps the params
            if mesh is not None:  # FSDP2 over the dp dimension, per layer + stage root
                from torch.distributed.fsdp import fully_shard

                for layer in m.layers.values():
                    fully_shard(layer, mesh=mesh["dp"])
                fully_shard(m, mesh=mesh["dp"])
                for sub in [*m.layers.values(), m]:
                    sub.set_gradient_divide_factor(1.0)  # token-weighted: sum over dp, the loss already / global tokens
            if compile_mode == "inplace":  # as qlora_fsdp.compile.compile_model: layer.compile() (no wrapper)
                for layer in m.layers.values():
                    layer.compile(backend="aot_eager", fullgraph=True)
            elif compile_mode == "wrapper":
                m = torch.compile(m, backend="aot_eager")  # an OptimizedModule
            mods.append(m)
            stages.append(PipelineStage(m, s, n_stages, torch.device("cpu"), group=pp_group))
        params = [p for m in mods for p in m.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)

        n_tok = [1]
        loss_fn = lambda logits, labels: token_loss_sum(logits, labels) / n_tok[0]  # noqa: E731
        cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "izb": ScheduleInterleavedZeroBubble,
               "zbv": ScheduleZBVZeroBubble}[schedule]
        sched = cls(stages if len(stages) > 1 else stages[0], n_microbatches=n_mb, loss_fn=loss_fn, scale_grads=False)

        # --- instrumentation: compute time per action, and whether LoRA grads change in I vs W steps
        busy = [0.0]
        events = []  # (stage, mb, action, lora grads changed)
        nf4_bwd = [0]
        from qlora_fsdp.nf4.linear import NF4LinearFunction

        orig_nf4_bwd = NF4LinearFunction.backward

        def counting_bwd(ctx, g):
            nf4_bwd[0] += 1
            return orig_nf4_bwd(ctx, g)

        NF4LinearFunction.backward = staticmethod(counting_bwd)

        def gsig(stage):
            return [None if p.grad is None else float(p.grad.to_local().abs().sum() if hasattr(p.grad, "to_local")
                                                      else p.grad.abs().sum())
                    for p in stage.submod.parameters() if p.requires_grad]

        for st in stages:
            for meth in ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk"):
                f = getattr(st, meth)

                def wrapped(*a, _f=f, _m=meth, _st=st, **k):
                    before, nb = gsig(_st), nf4_bwd[0]
                    t0 = time.perf_counter()
                    r = _f(*a, **k)
                    busy[0] += time.perf_counter() - t0
                    if _m != "forward_one_chunk":
                        kind = "W" if _m == "backward_weight_one_chunk" else ("B" if k.get("full_backward", True) else "I")
                        events.append((_st.stage_index, a[0], kind, gsig(_st) != before, nf4_bwd[0] - nb,
                                       all(g is None for g in gsig(_st))))
                    return r

                setattr(st, meth, wrapped)

        records = []
        for step, b in enumerate(batches(steps)):
            n_tok[0] = n_label_tokens(b)  # global over all dp replicas and microbatches
            rows = slice(dp_rank * GLOBAL_B // dp, (dp_rank + 1) * GLOBAL_B // dp)
            ids, am, labels = b["input_ids"][rows], b["attention_mask"][rows], b["labels"][rows]
            losses = []
            busy[0] = 0.0
            dist.barrier()
            t0 = time.perf_counter()
            sched.step(ids, attention_mask=am, target=labels, losses=losses)
            dt = time.perf_counter() - t0
            opt.step()
            opt.zero_grad(set_to_none=True)
            mine = torch.tensor(sum(float(x.detach()) for x in losses) if losses else 0.0, dtype=torch.float64)
            dist.all_reduce(mine)  # only last-stage ranks contribute; summed over dp
            records.append({"loss": float(mine), "time": dt, "busy": busy[0]})
        lora = {}
        for m in mods:
            for n, p in m.named_parameters():
                if p.requires_grad:
                    full = p.full_tensor() if hasattr(p, "full_tensor") else p
                    lora[m.full_names[n]] = full.detach().clone()
        torch.save({"records": records, "lora": lora, "events": events}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    os._exit(0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("schedule", choices=["gpipe", "1f1b", "izb", "zbv"])
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--dp", type=int, default=1)
    ap.add_argument("--mb", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--compile", default="none", choices=["none", "inplace", "wrapper"])
    a = ap.parse_args()
    torch.set_num_threads(1)
    root = Path("/tmp/pp_proto")
    model_dir = root / f"model_h{128 * a.dp}_l{a.layers}"
    if not (model_dir / "config.json").is_file():
        import transformers

        torch.manual_seed(0)
        hidden = 128 * max(2, a.dp)
        cfg = transformers.LlamaConfig(vocab_size=104, hidden_size=hidden, intermediate_size=2 * hidden,
                                       num_hidden_layers=a.layers, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=64)
        transformers.LlamaForCausalLM(cfg).save_pretrained(model_dir)
    out = root / f"run_{a.schedule}_pp{a.pp}_dp{a.dp}_mb{a.mb}_{a.compile}"
    out.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    world = a.pp * a.dp
    mp.spawn(worker, args=(world, port, str(out), model_dir, a.schedule, a.pp, a.dp, a.mb, a.steps, a.compile),
             nprocs=world, join=True)
    got = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]
    ref_losses, ref_lora = reference(model_dir, batches(a.steps))
    pp_losses = [r["loss"] for r in got[0]["records"]]
    print(f"{a.schedule} pp={a.pp} dp={a.dp} mb={a.mb}")
    print("  pp  losses:", [f"{x:.7f}" for x in pp_losses])
    print("  ref losses:", [f"{x:.7f}" for x in ref_losses])
    rel = max(abs(x - y) / abs(y) for x, y in zip(pp_losses, ref_losses))
    print(f"  max rel loss diff: {rel:.2e}")
    lora = {}
    for g in got:
        lora.update(g["lora"])
    assert lora.keys() == ref_lora.keys(), (len(lora), len(ref_lora))
    lerr = max(float((lora[k] - ref_lora[k]).abs().max()) for k in lora)
    lmax = max(float(ref_lora[k].abs().max()) for k in lora)
    nrel = max(float((lora[k] - ref_lora[k]).norm() / ref_lora[k].norm().clamp_min(1e-12)) for k in lora)
    print(f"  LoRA max per-tensor relative norm diff: {nrel:.2e}")
    close = all(torch.allclose(lora[k], ref_lora[k], rtol=1e-4, atol=1e-5) for k in lora)
    print(f"  LoRA tensors {len(lora)}: max abs diff {lerr:.2e} (max |w| {lmax:.2e}); allclose(rtol=1e-4, atol=1e-5): {close}")
    for r, g in enumerate(got):
        recs = g["records"][1:] or g["records"]  # skip step 0 (warm-up / shape inference)
        t = sum(x["time"] for x in recs) / len(recs)
        idle = 1 - sum(x["busy"] for x in recs) / sum(x["time"] for x in recs)
        print(f"  rank {r}: {t * 1e3:.1f} ms/step, idle {idle:.0%}")
    ev = got[0]["events"][: 4 * a.mb]
    print("  rank0 backward events of step 1 (stage, mb, kind, lora grads changed, nf4 bwd calls, all grads None):")
    for e in ev:
        print("   ", e)
    ok = rel < 1e-5 and nrel < 1e-4
    print("  MATCH" if ok else "  MISMATCH")


if __name__ == "__main__":
    main()
