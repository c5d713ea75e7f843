"""Pipeline parallelism (parallel/pipeline.py) on 2 gloo ranks against one process: every schedule gives the
one-process per-step losses and final LoRA weights for the same global batch; zero-bubble really defers the LoRA
weight gradients to the weight pass."""

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from qlora_fsdp.compile import token_loss_sum
from qlora_fsdp.lora.fused_mlp import patch_lora_swiglu
from qlora_fsdp.model import load_model
from qlora_fsdp.parallel.cpu_threads import share_cpu_cores
from qlora_fsdp.training import TrainConfig, add_lora, seed_everything
from tests.parallel.test_fsdp import free_port, fsdp_units
from tests.training.test_loop import ListBatches, collate, synthetic_examples

STEPS, BATCH, T, MICRO = 3, 8, 20, 4
PP = 2


def four_layer_llama(path):
    import transformers

    if not (path / "config.json").is_file():
        torch.manual_seed(0)
        config = transformers.LlamaConfig(vocab_size=104, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
        transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def step_batches():
    """STEPS global batches of BATCH examples, all padded to T tokens (a pipeline keeps one sequence length)."""
    ex = synthetic_examples(n=BATCH * STEPS)
    pad = lambda xs, v: [x + [v] * (T - len(x)) for x in xs]  # noqa: E731
    return [{"input_ids": torch.tensor(pad([e["input_ids"] for e in chunk], 0)),
             "labels": torch.tensor(pad([e["labels"] for e in chunk], -100)),
             "attention_mask": torch.tensor(pad([[1] * len(e["input_ids"]) for e in chunk], 0))}
            for chunk in (ex[i : i + BATCH] for i in range(0, len(ex), BATCH))]  # fmt: skip


def peft_model(model_dir):
    """The tiny Llama with LoRA as TrainLoop builds it: its graph holds the fused LoRA kernels' autograd Functions
    (lora_add in the attention, lora_swiglu in the MLPs; on CPU their PyTorch references), as on a GPU."""
    cfg = TrainConfig(output_dir="unused", lora_r=4, lora_alpha=8, precision="fp32", device="cpu")
    seed_everything(cfg.seed)  # the LoRA initialisation TrainLoop makes
    model = add_lora(load_model(model_dir, dtype=torch.float32, device="cpu"), cfg)
    assert patch_lora_swiglu(model) == 4
    return model


def label_tokens(b):
    return int((b["labels"][:, 1:] != -100).sum())


def one_process(model_dir):
    model = peft_model(model_dir)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-3, weight_decay=0.0)
    losses = []
    for b in step_batches():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
        loss = token_loss_sum(logits, b["labels"]) / label_tokens(b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _schedules_job(rank, world, out, model_dir, schedules):
    """Every schedule in turn on `world` ranks: PP stages, and FSDP2 over dp = world / PP inside each stage."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from qlora_fsdp.parallel.pipeline import build_pipeline

    dp = world // PP
    mesh = init_device_mesh("cpu", (PP, dp), mesh_dim_names=("pp", "dp")) if dp > 1 else None
    pp_rank, dp_rank = (mesh["pp"].get_local_rank(), mesh["dp"].get_local_rank()) if mesh else (rank, 0)
    results = {}
    for schedule in schedules:
        model = peft_model(model_dir)
        n_tok = [1]
        # FSDP2 averages gradients over dp: the factor dp turns that into the sum the one-process step takes
        loss_fn = lambda logits, labels: token_loss_sum(logits, labels) / n_tok[0] * dp  # noqa: E731
        pipe = build_pipeline(model, schedule, pp_rank, PP, n_microbatches=MICRO // dp, loss_fn=loss_fn,
                              group=mesh.get_group("pp") if mesh else None, dp_mesh=mesh["dp"] if mesh else None)  # fmt: skip
        names = {id(p): n for n, p in model.named_parameters()}  # after FSDP2 swapped in DTensor parameters
        params = [p for m in pipe.modules for p in m.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=5e-3, weight_decay=0.0)
        deferred = probe_weight_passes(pipe.stages) if schedule in ("zbv", "interleaved_zb") else []
        losses = []
        for b in step_batches():
            n_tok[0] = label_tokens(b)
            rows = slice(dp_rank * BATCH // dp, (dp_rank + 1) * BATCH // dp)  # this replica's share
            mb_losses = []
            pipe.schedule.step(*[b["input_ids"][rows]] * pipe.has_first, attention_mask=b["attention_mask"][rows],
                               target=b["labels"][rows], losses=mb_losses)  # fmt: skip
            opt.step()
            opt.zero_grad(set_to_none=True)
            total = torch.tensor(sum(x.item() for x in mb_losses), dtype=torch.float64)
            dist.all_reduce(total)  # only the last stage's ranks hold losses, each its replica's share x dp
            losses.append(float(total) / dp)
        lora = {names[id(p)]: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                for m in pipe.modules for p in m.parameters() if p.requires_grad}  # fmt: skip
        results[schedule] = {"losses": losses, "lora": lora, "deferred": deferred}
    torch.save(results, out / f"rank{rank}.pt")


def probe_weight_passes(stages) -> list:
    """Record, per input-gradient ('I') and weight-gradient ('W') pass of the non-first stages, whether the pass
    left the LoRA gradients as they were (I) or changed them (W)."""
    seen = []

    def grads(st):
        return [None if p.grad is None else p.grad.clone() for p in st.submod.parameters() if p.requires_grad]

    def same(a, b):
        return all((x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
                   for x, y in zip(a, b))  # fmt: skip

    for st in stages:
        if st.stage_index == 0:  # its input needs no gradient: the whole backward runs in the weight pass
            continue

        def probe(*a, _st=st, _f=st.backward_one_chunk, **k):
            before = grads(_st)
            r = _f(*a, **k)
            if not k.get("full_backward", True):
                seen.append(("I", same(before, grads(_st))))
            return r

        def probe_w(*a, _st=st, _f=st.backward_weight_one_chunk, **k):
            before = grads(_st)
            r = _f(*a, **k)
            seen.append(("W", not same(before, grads(_st))))
            return r

        st.backward_one_chunk, st.backward_weight_one_chunk = probe, probe_w
    return seen


SCHEDULE_NAMES = ["gpipe", "1f1b", "interleaved_zb", "zbv"]


def check_against_one_process(tmp_path, model_dir, world):
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    ref_losses, ref_lora = one_process(model_dir)
    for schedule in SCHEDULE_NAMES:
        torch.testing.assert_close(torch.tensor(got[0][schedule]["losses"]), torch.tensor(ref_losses), rtol=1e-5,
                                   atol=0, msg=lambda m: f"{schedule}: {m}")  # fmt: skip
        lora = {k: v for g in got for k, v in g[schedule]["lora"].items()}
        assert lora.keys() == ref_lora.keys(), schedule
        for k in ref_lora:  # summation order differs (microbatches): Adam turns ~1e-7 into ~1e-5 on tiny gradients
            torch.testing.assert_close(lora[k], ref_lora[k], rtol=1e-4, atol=3e-5, msg=lambda m: f"{schedule} {k}: {m}")
        if schedule in ("zbv", "interleaved_zb"):
            deferred = [d for g in got for d in g[schedule]["deferred"]]
            # input-gradient passes leave the LoRA gradients untouched, weight passes fill them
            assert {kind for kind, _ in deferred} == {"I", "W"} and all(ok for _, ok in deferred), (schedule, deferred)


# -- the multi-rank runs: one launch of 2 ranks and one of 4 -------------------------------------------------------
# Starting ranks (processes, imports, the process group) costs more than the runs here, so the runs on one number of
# ranks share one launch (the module fixture `launches`): its ranks run the jobs in turn, each on a freshly loaded
# model (the schedules, then the training loop: fp16 with an overflow on 2 ranks, pp x FSDP2 on 4), and the tests
# below check their results as each did with a launch of its own. A job that fails stops its launch: its test and
# the tests of the jobs after it fail with its traceback.
def _launch_worker(rank, world, port, jobs):
    """Join the group once, then run every job in turn; `done` in a job's folder once all ranks finished it."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    share_cpu_cores(world)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for job in jobs:
            out = Path(job["out"])
            try:
                JOB_KINDS[job["kind"]](rank, world, out, **job["args"])
            except BaseException as e:
                raise RuntimeError(f"job {out.name} failed on rank {rank}") from e
            dist.barrier()
            if rank == 0:
                (out / "done").write_text("")
    finally:
        dist.destroy_process_group()
    os._exit(0)


class Launches:
    """The 2-rank and the 4-rank launch, each started when a test first needs it, on one four-layer Llama."""

    def __init__(self, root: Path):
        self.root, self.started, self.errors = root, set(), {}
        self.model_dir = four_layer_llama(root / "model")

    def job(self, world: int, kind: str) -> Path:
        return self.root / f"{world}ranks-{kind}"

    def launch(self, world: int) -> None:
        if world in self.started:
            return
        self.started.add(world)
        jobs = [{"kind": "schedules", "args": {"model_dir": self.model_dir, "schedules": SCHEDULE_NAMES}}]
        if world == 2:
            jobs.append({"kind": "overflow", "args": {"model_dir": self.model_dir}})
        else:
            options = {"pp": 2, "pp_schedule": "zbv", "grad_accum": 2, "activation_checkpointing": True, "pp_report": True,
                       "cpu_offload": True}  # fmt: skip
            jobs.append({"kind": "loop", "args": {"model_dir": self.model_dir, "options": options}})
        for job in jobs:
            job["out"] = str(self.job(world, job["kind"]))
            Path(job["out"]).mkdir()
        try:
            mp.spawn(_launch_worker, args=(world, free_port(), jobs), nprocs=world, join=True)
        except Exception as e:  # noqa: BLE001 - reported by the tests of the jobs it did not finish
            self.errors[world] = e

    def result(self, world: int, kind: str) -> Path:
        """The folder of a finished job of the `world`-rank launch (started here if it has not been)."""
        self.launch(world)
        out = self.job(world, kind)
        if not (out / "done").is_file():
            pytest.fail(f"the {world}-rank launch stopped before its {kind} job finished: {self.errors.get(world)}")
        return out


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    return Launches(tmp_path_factory.mktemp("launches"))


@pytest.mark.timeout(600)  # the first test of a launch runs all of its jobs
def test_two_stage_ranks_equal_one_process(launches):
    """2 ranks x 2 stages (4 stages for the zero-bubble schedules), every schedule."""
    check_against_one_process(launches.result(PP, "schedules"), launches.model_dir, PP)


@pytest.mark.timeout(600)
def test_pp_by_fsdp_on_four_ranks_equals_one_process(launches):
    """4 ranks: 2 pipeline stages x 2 FSDP2 data-parallel ranks (a 2-D mesh), every schedule."""
    check_against_one_process(launches.result(2 * PP, "schedules"), launches.model_dir, 2 * PP)


def test_bad_pipeline_setups_are_one_line_errors(tmp_path):
    from qlora_fsdp.parallel.pipeline import PipelineError, build_pipeline, split_bounds

    assert split_bounds(5, 2) == [(0, 3), (3, 5)]
    with pytest.raises(PipelineError, match="lower --pp"):
        split_bounds(2, 4)
    model = peft_model(four_layer_llama(tmp_path / "model"))
    with pytest.raises(PipelineError, match="choose one of"):
        build_pipeline(model, "dualpipe", 0, 2, n_microbatches=4, loss_fn=None)
    with pytest.raises(PipelineError, match="at least 2"):
        build_pipeline(model, "1f1b", 0, 2, n_microbatches=1, loss_fn=None)
    from qlora_fsdp.compile import compile_model

    compile_model(model, backend="eager")
    with pytest.raises(PipelineError, match="refuses zero-bubble schedules with compiled stages"):
        build_pipeline(model, "zbv", 0, 2, n_microbatches=4, loss_fn=None)


# -- the training loop over a pipeline (make_loop with cfg.pp > 1) -------------------------------------------------
LOOP_STEPS = 6


def make_loop(out, model_dir, **options):
    from qlora_fsdp.training import make_loop as loop_for

    batches = [collate(synthetic_examples(n=48)[i : i + 4]) for i in range(0, 48, 4)]
    options = {"precision": "fp32", "max_grad_norm": 0.05, **options}  # a small norm: clipping acts in every step
    cfg = TrainConfig(output_dir=str(out), max_steps=LOOP_STEPS, lr=5e-3, warmup_steps=2, progress=False,
                      device="cpu", lora_r=4, lora_alpha=8, batch_size=4, max_length=20, **options)  # fmt: skip
    return loop_for(cfg, model=load_model(model_dir, dtype=torch.float32, device="cpu"),
                    train_batches=ListBatches(batches), eval_batches=ListBatches(batches[:3]))  # fmt: skip


def _loop_job(rank, world, out, model_dir, options):
    loop = make_loop(out / "pp", model_dir, nproc=world, **options)
    units = fsdp_units(loop.model)
    records = loop.train()
    lora = loop.lora_state_dict()  # every stage's, on rank 0
    if rank == 0:
        torch.save({"records": records, "lora": lora, "units": units}, out / "pp.pt")


def _overflow_job(rank, world, out, model_dir):
    """fp16 over 2 stages (zero-bubble ZBV); at step 3 stage 1's rank alone finds an inf in a gradient."""
    loop = make_loop(out / "pp", model_dir, nproc=world, pp=2, pp_schedule="zbv", precision="fp16",
                     max_grad_norm=1.0)  # fmt: skip
    unscale = loop.scaler.unscale_

    def unscale_with_overflow(optimizer):
        if rank == 1 and loop.step == 2:  # during step 3: poison one gradient element of this stage only
            next(p for p in loop.params if p.grad is not None).grad.view(-1)[0] = float("inf")
        unscale(optimizer)

    loop.scaler.unscale_ = unscale_with_overflow
    seen = []
    for _ in range(3):
        before = {n: p.detach().clone() for n, p in loop.model.named_parameters() if p.requires_grad}
        scale = loop.scaler.get_scale()
        record = loop.train_step()
        unchanged = all(torch.equal(before[n], p) for n, p in loop.model.named_parameters() if p.requires_grad)
        seen.append((unchanged, loop.scaler.get_scale() / scale, record["loss"]))
    torch.save(seen, out / f"seen{rank}.pt")


JOB_KINDS = {"schedules": _schedules_job, "loop": _loop_job, "overflow": _overflow_job}


@pytest.mark.timeout(600)
def test_fp16_pipeline_overflow_in_one_stage_skips_the_step_on_every_stage(launches):
    """fp16 runs on a pipeline: the loss carries the scaler's scale through the schedule's own backward, and the
    found-inf flags are reduced over all ranks, so an overflow in one stage skips the step on both."""
    out = launches.result(2, "overflow")
    for rank in range(2):
        unchanged, scale_factor, losses = zip(*torch.load(out / f"seen{rank}.pt"))
        assert unchanged[1:] == (False, True), rank  # step 2 updates (step 1 has a small warmup lr), step 3 skipped
        assert scale_factor == (1.0, 1.0, 0.5), rank  # the scale backs off on both stages alike
        assert all(0 < x < 20 for x in losses), losses  # the logged loss is unscaled (the scale is 65536)


@pytest.mark.timeout(600)
def test_train_loop_pp_by_fsdp_equals_one_process(launches, tmp_path):
    """TrainLoop on 4 ranks (2 stages x 2 FSDP2 replicas, ZBV, activation checkpointing, CPU offload of the frozen
    weights, clipping over the stages): per-step losses, gradient norms, eval losses and the saved adapter equal one
    process."""
    import peft
    from safetensors.torch import load_file

    model_dir = launches.model_dir
    run = launches.result(4, "loop")  # options: pp 2, ZBV, grad_accum 2, checkpointing, offload, pp_report (launch)
    got = torch.load(run / "pp.pt", weights_only=False)
    # rank 0's two stages (ZBV: the first and last), each a unit per layer's NF4 bases (offloaded) inside the layer's
    # (LoRA and norms, not), and a root with the embedding or the norm and head (frozen: offloaded)
    units = [u for u in got["units"] if u["offloaded"]]
    assert any(all(u["offloaded"]) for u in units) and any(any(u["trainable"]) for u in units), units
    assert all(not any(u["offloaded"]) or not any(u["trainable"]) for u in units), units
    ref_loop = make_loop(tmp_path / "one", model_dir, grad_accum=4)  # one process, the same 4 batches a step
    ref = ref_loop.train()
    col = lambda rs, k: torch.tensor([r[k] for r in rs if k in r])  # noqa: E731
    for k in ("loss", "grad_norm", "eval_loss"):
        torch.testing.assert_close(col(got["records"], k), col(ref, k), rtol=1e-5, atol=0, msg=lambda m: f"{k}: {m}")
    assert len(col(ref, "eval_loss")) == 2 and all(r["grad_norm"] > 0.05 for r in ref[1:])  # clipping acted
    ref_lora = ref_loop.lora_state_dict()
    assert got["lora"].keys() == ref_lora.keys()
    for k in ref_lora:
        torch.testing.assert_close(got["lora"][k], ref_lora[k], rtol=1e-4, atol=3e-5)
    saved = load_file(run / "pp" / "adapter" / "adapter_model.safetensors")  # what rank 0 wrote, PEFT format
    model = peft.PeftModel.from_pretrained(load_model(model_dir, dtype=torch.float32, device="cpu"),
                                           run / "pp" / "adapter")  # fmt: skip
    assert len(saved) == len(ref_lora) and model.peft_config["default"].r == 4
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert loaded.keys() == ref_lora.keys() and all(torch.equal(loaded[k], got["lora"][k]) for k in loaded)
    report = json.loads((run / "pp" / "pp_report.json").read_text())
    assert report["schedule"] == "zbv" and [r["stages"] for r in report["ranks"]] == [[0, 3], [0, 3], [1, 2], [1, 2]]
    assert all(0 <= r["idle"] < 1 and r["step_ms"] > r["busy_ms"] > 0 for r in report["ranks"])
