"""FSDP2 on 2, 3 and 4 gloo ranks (CPU) against one process: the NF4 base is sharded (1/N of its bytes per rank,
uint8 all-gathers); losses and LoRA weights equal one process's. Rank processes: test_fsdp_processes.py."""

import os
import re
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from qlora_fsdp.model import load_model
from qlora_fsdp.nf4.tensor import NF4Tensor
from qlora_fsdp.parallel.cpu_threads import share_cpu_cores
from qlora_fsdp.training import TrainConfig, TrainLoop
from tests.training.test_loop import ListBatches, collate, synthetic_examples

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from fsdp_profile import CollectiveBytes  # noqa: E402

STEPS = 8  # every curve below: warmup, decay, a checkpoint at step 3 and a resume from it
# on a machine with 2+ GPUs the same tests run over NCCL, one GPU a rank; elsewhere over gloo on the CPU
ON_GPUS = torch.cuda.device_count() >= 2


def tiny_llama(path, hidden=256, intermediate=None, heads=4, kv_heads=2, layers=2):
    """A random Llama; with hidden = 128 x N every projection's row chunk on N ranks holds whole quant groups (64 x 256
    elements), other widths shard in windows of groups (nf4/sharding.py)."""
    import transformers

    if not (path / "config.json").is_file():
        torch.manual_seed(0)
        config = transformers.LlamaConfig(vocab_size=104, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
                                          num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                          max_position_embeddings=64)  # fmt: skip
        transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def make_loop(out, grad_accum, model_dir, **options):
    batches = [collate(synthetic_examples(n=48)[i : i + 4]) for i in range(0, 48, 4)]
    options = {"precision": "fp32", **options}
    device = options.pop("device", "cpu")
    evaluate = options.pop("evaluate", True)  # False: the first forward is a training one (no evaluation at step 0)
    cfg = TrainConfig(output_dir=str(out), max_steps=STEPS, lr=5e-3, warmup_steps=2, progress=False, device=device,
                      lora_r=4, lora_alpha=8, grad_accum=grad_accum, **options)  # fmt: skip
    return TrainLoop(cfg, model=load_model(model_dir, dtype=torch.float32, device=device),
                     train_batches=ListBatches(batches), eval_batches=ListBatches(batches[:3]) if evaluate else None)  # fmt: skip


def _join(rank: int, world: int, port: int) -> str:
    """Join the process group (NCCL + gloo on GPUs, gloo on CPU); the rank's device."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    share_cpu_cores(world)
    if ON_GPUS:
        torch.cuda.set_device(rank)
    dist.init_process_group("cuda:nccl,cpu:gloo" if ON_GPUS else "gloo", rank=rank, world_size=world)
    return f"cuda:{rank}" if ON_GPUS else "cpu"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


OPTIONS = {
    "fp32": {},
    "activation_checkpointing": {"activation_checkpointing": True},
    "cpu_offload": {"cpu_offload": True},
    "bf16_mixed_precision": {"precision": "bf16", "fsdp_mixed_precision": True},
    "fp16_mixed_precision": {"precision": "fp16", "fsdp_mixed_precision": True},  # with the gradient scaler
    "grad_accum_2": {"grad_accum": 2},
    "chunked_loss": {"chunked_loss": True},  # the head's weight gathered by its FSDP2 unit, used in the chunked loss
    # compiled decoder layers inside FSDP2's hooks, recomputed by (non-reentrant) checkpointing in backward, with the
    # chunked loss: the combination a user picks for speed on several GPUs; no evaluation first, so the first compiled
    # forward is a training one (FSDP2's hook makes its input a view, which the recomputation's is not)
    "compile_checkpointing_chunked_loss": {"compile": True, "compile_backend": "aot_eager", "activation_checkpointing": True,
                                           "chunked_loss": True, "evaluate": False},  # fmt: skip
}

# on 4 ranks: all the options at once (fp32 with none: the Qwen2.5-0.5B widths below, on 4 ranks as well)
FOUR_RANKS = {"4 ranks, bf16 + offload + checkpointing": {
    "precision": "bf16", "fsdp_mixed_precision": True, "cpu_offload": True, "activation_checkpointing": True}}

# widths whose row chunks split quant groups: the embedded model's (128 x 128 on 3 ranks), SmolLM2-135M's (576 x 576,
# 9 / 3 heads) and Qwen2.5-0.5B's (896 x 4,864, 14 / 2 heads), one layer of each
UNEVEN = {
    "uneven: 128 wide on 3 ranks": (3, {"hidden": 128}),
    "uneven: SmolLM2-135M widths on 2 ranks": (2, {"hidden": 576, "intermediate": 1536, "heads": 9, "kv_heads": 3, "layers": 1}),
    "uneven: Qwen2.5-0.5B widths on 4 ranks": (4, {"hidden": 896, "intermediate": 4864, "heads": 14, "kv_heads": 2, "layers": 1}),
}  # fmt: skip


# -- the multi-rank runs: one launch per number of ranks -------------------------------------------------------------
# Starting ranks (processes, imports, the process group) costs more than most of the runs here, so the runs on one
# number of ranks share one launch (the module fixture `launches`): its ranks run the jobs in turn, each job on a
# freshly loaded model with a fresh loop (the loop seeds itself; Dynamo's caches and counters are reset between
# jobs), and rank 0 saves each job's results. The tests below check them against one process, as each did with a
# launch of its own. A job that fails stops its launch: its test and the tests of the jobs after it fail with its
# traceback.


def _equal_job(rank, world, device, out, model_dir, options):
    """`options` on `world` ranks: the per-step records, the LoRA weights and this rank's share of the NF4 bytes."""
    options = dict(options)
    accum = options.pop("grad_accum", 1)
    loop = make_loop(out / "fsdp", grad_accum=accum, model_dir=model_dir, device=device, **options)
    reduced_before = []  # per microbatch: did a sharded (reduced) LoRA gradient exist when it started?
    forward = loop._forward_loss_sum
    loop._forward_loss_sum = lambda b: reduced_before.append(any(p.grad is not None for p in loop.params)) or forward(b)
    w = loop.model.base_model.model.model.layers[0].mlp.down_proj.base_layer.weight
    local, split = w.to_local(), -(-w.shape[0] // world)  # FSDP2's row chunks: ceil(R / N) rows, the last fewer
    assert isinstance(local, NF4Tensor) and local.shape[0] == max(0, min(split, w.shape[0] - rank * split))
    # the mesh follows the model's device (fully_shard's own default mesh is the GPU's on a machine with one)
    assert w.device_mesh.device_type == torch.device(device).type, w.device_mesh
    shard_bytes = local.nf4.data.numel() + local.nf4.absmax.numel()
    assert local.nf4.data.device.type == ("cpu" if options.get("cpu_offload") or not ON_GPUS else "cuda")
    units = fsdp_units(loop.model)
    with CollectiveBytes() as collectives:  # (benchmarks/fsdp_profile.py)
        records = loop.train()
    gathered = [(n, backward) for kind, n, backward in collectives.calls if kind == "all_gather"]
    lora = loop.lora_state_dict()  # on CPU
    if rank == 0:
        from qlora_fsdp.compile import compile_counts

        torch.save({"records": records, "lora": lora, "shard_bytes": shard_bytes, "reduced_before": reduced_before,
                    "compile": compile_counts(), "units": units, "gathered": gathered}, out / "fsdp.pt")  # fmt: skip


def fsdp_units(model) -> list[dict]:
    """Per FSDP2 unit (one state, a list unit counted once): how many of its parameters are trainable and whether
    FSDP2 offloads each to the host, read from FSDP2's own records of the parameters it manages."""
    from torch.distributed.fsdp import FSDPModule

    units, seen = [], set()
    for m in model.modules():
        state = m._get_fsdp_state() if isinstance(m, FSDPModule) else None
        if state is None or id(state) in seen:
            continue
        seen.add(id(state))
        params = [fp for group in state._fsdp_param_groups for fp in group.fsdp_params]
        units.append({"trainable": [fp.sharded_param.requires_grad for fp in params],
                      "offloaded": [fp.offload_to_cpu for fp in params]})  # fmt: skip
    return units


def _resume_job(rank, world, device, out, model_dir, stop_at, resume, grad_accum=1):
    """A run on `world` ranks in `out`: trained until stop_at (checkpoints every 3 steps), or resumed to the end."""
    loop = make_loop(out, grad_accum=grad_accum, model_dir=model_dir, device=device, save_every=3, resume=resume)
    records = loop.train(stop_at)
    if rank == 0:
        torch.save(records, out / "records.pt")


def _overflow_job(rank, world, device, out, model_dir):
    """fp16 on 2 ranks; at step 3 rank 1 alone finds an inf in its gradient shard: both ranks must skip the step."""
    loop = make_loop(out / "fsdp", grad_accum=1, model_dir=model_dir, device=device, precision="fp16")
    unscale = loop.scaler.unscale_

    def unscale_with_overflow(optimizer):
        if rank == 1 and loop.step == 2:  # during step 3: poison one element of this rank's shard only
            p = next(p for p in loop.params if p.grad is not None and p.grad.to_local().numel())
            p.grad.to_local().view(-1)[0] = float("inf")
        unscale(optimizer)

    loop.scaler.unscale_ = unscale_with_overflow
    seen = []
    for _ in range(3):
        before, scale = loop.lora_state_dict(), loop.scaler.get_scale()
        loop.train_step()
        after = loop.lora_state_dict()
        seen.append((all(torch.equal(before[k], after[k]) for k in before), loop.scaler.get_scale() / scale))
    torch.save(seen, out / f"seen{rank}.pt")


JOB_KINDS = {"equal": _equal_job, "resume": _resume_job, "overflow": _overflow_job}


def _launch_worker(rank, world, port, jobs):
    """Join the group once, then run every job in turn; done-<world> in a job's folder once all ranks finished it."""
    from torch._dynamo.utils import counters, guard_failures

    device = _join(rank, world, port)
    try:
        for job in jobs:
            torch._dynamo.reset()  # a job's compile counts are its own
            counters.clear()
            guard_failures.clear()
            out = Path(job["out"])
            try:
                JOB_KINDS[job["kind"]](rank, world, device, out, **job["args"])
            except BaseException as e:
                raise RuntimeError(f"job {out.name} failed on rank {rank}") from e
            torch.distributed.barrier()
            if rank == 0:
                (out / f"done-{world}").write_text("")
    finally:
        torch.distributed.destroy_process_group()
    # skip interpreter teardown: a gloo worker thread sometimes aborts it ("terminate called without an active
    # exception", SIGABRT) after all work is done and written (seen with torch 2.13 on CPU)
    os._exit(0)


def launchable(world: int) -> bool:
    return not ON_GPUS or world <= torch.cuda.device_count()


def one_device() -> str:
    return "cuda:0" if ON_GPUS else "cpu"


def slug(name: str) -> str:
    return re.sub(r"\W+", "_", name).strip("_")


def equal_case(name):
    """(ranks, model widths, options) of a test_n_ranks_equal_one_process case."""
    if name in UNEVEN:
        world, widths = UNEVEN[name]
        return world, widths, {}
    world, options = (4, FOUR_RANKS[name]) if name in FOUR_RANKS else (2, OPTIONS[name])
    return world, {"hidden": 128 * world}, dict(options)


EQUAL_CASES = sorted(OPTIONS) + sorted(FOUR_RANKS) + list(UNEVEN)


class Launches:
    """The launches of this module, each started when a test first needs it (the 2-rank one after the 4-rank one:
    it resumes a run the 4 ranks saved)."""

    def __init__(self, root: Path):
        self.root, self.started, self.errors = root, set(), {}

    def model(self, **widths) -> Path:
        path = self.root / "models" / "_".join(f"{k}{v}" for k, v in sorted(widths.items()))
        path.parent.mkdir(parents=True, exist_ok=True)
        return tiny_llama(path, **widths)

    def job(self, name: str) -> Path:
        return self.root / "jobs" / slug(name)

    def jobs(self, world: int) -> list[dict]:
        jobs = []

        def add(name, kind, **args):
            self.job(name).mkdir(parents=True, exist_ok=True)
            jobs.append({"kind": kind, "out": str(self.job(name)), "args": args})

        for name in EQUAL_CASES:
            ranks, widths, options = equal_case(name)
            if ranks == world:
                add(name, "equal", model_dir=self.model(**widths), options=options)
        if world == 4:  # saved on 4 ranks, resumed on 2 (test_checkpoint_resumes_on_another_number_of_ranks)
            add("saved on 4", "resume", model_dir=self.model(hidden=512), stop_at=4, resume=False, grad_accum=1)
        if world == 2:
            m = self.model(hidden=256)
            add("two then one", "resume", model_dir=m, stop_at=4, resume=False)
            add("one then two", "resume", model_dir=m, stop_at=None, resume=True)
            add("overflow", "overflow", model_dir=m)
            saved = self.job("saved on 4")
            if (saved / "done-4").is_file():  # last: a copy of the run the 4 ranks saved, resumed
                shutil.copytree(saved, self.job("resumed on 2"), ignore=shutil.ignore_patterns("done-*"))
                add("resumed on 2", "resume", model_dir=self.model(hidden=512), stop_at=None, resume=True, grad_accum=2)
        return jobs

    def launch(self, world: int) -> None:
        if world in self.started:
            return
        self.started.add(world)
        if world == 2 and launchable(4):
            self.launch(4)
        jobs = self.jobs(world)
        if world == 2:  # one process until step 4, which the 2 ranks resume ("one then two")
            make_loop(self.job("one then two"), grad_accum=2, model_dir=self.model(hidden=256), device=one_device(),
                      save_every=3).train(stop_at=4)  # fmt: skip
        try:
            mp.spawn(_launch_worker, args=(world, free_port(), jobs), nprocs=world, join=True)
        except Exception as e:  # noqa: BLE001 - reported by the tests of the jobs it did not finish
            self.errors[world] = e

    def result(self, world: int, name: str) -> Path:
        """The folder of a finished job of the `world`-rank launch (started here if it has not been)."""
        self.launch(world)
        out = self.job(name)
        if not (out / f"done-{world}").is_file():
            pytest.fail(f"the {world}-rank launch stopped before job {slug(name)} finished: {self.errors.get(world)}")
        return out


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    return Launches(tmp_path_factory.mktemp("launches"))


@pytest.mark.timeout(900)  # the first test of a launch runs all of its jobs
@pytest.mark.parametrize("name", EQUAL_CASES)
def test_n_ranks_equal_one_process(launches, tmp_path, name):
    world, widths, options = equal_case(name)
    if not launchable(world):
        pytest.skip(f"{world} ranks need {world} GPUs here")
    got = torch.load(launches.result(world, name) / "fsdp.pt", weights_only=False)
    model_dir = launches.model(**widths)
    # one process on the same global batches (bf16: autocast, LoRA weights fp32)
    accum = options.get("grad_accum", 1)
    if options.get("compile") and not options.get("evaluate", True):  # the recomputation reuses the forward's graph
        assert got["compile"]["recompiles"] == 0 and got["compile"]["graph_breaks"] == 0, got["compile"]
    if accum > 1:  # no gradient was reduced before a step's last microbatch (evaluation forwards are not traced)
        assert got["reduced_before"] and not any(got["reduced_before"])
    ref_loop = make_loop(tmp_path / "one", grad_accum=world * accum, model_dir=model_dir,
                         precision=options.get("precision", "fp32"), device=one_device(),
                         evaluate=options.get("evaluate", True))  # fmt: skip
    ref = ref_loop.train()
    rtol = 1e-5 if options.get("precision", "fp32") == "fp32" else 1e-2
    losses = lambda rs, k: torch.tensor([r[k] for r in rs if k in r])  # noqa: E731
    torch.testing.assert_close(losses(got["records"], "loss"), losses(ref, "loss"), rtol=rtol, atol=0)
    torch.testing.assert_close(losses(got["records"], "eval_loss"), losses(ref, "eval_loss"), rtol=rtol, atol=0)
    ref_lora = ref_loop.lora_state_dict()
    assert got["lora"].keys() == ref_lora.keys()
    # the weights, by norm: Adam's step is about lr whatever a gradient's size, so where a gradient is near zero the
    # sum-order noise of the reduction (fp32: ~1e-7; bf16: rounding) decides its sign and one element moves by a
    # whole step (seen: 1 of 2,048 elements off by 1.6e-5 in fp32, 5.5% of the norm in bf16); the losses above are
    # the contract
    bound = 1e-3 if rtol < 1e-3 else 0.1
    for k in ref_lora:
        assert (got["lora"][k] - ref_lora[k]).norm() <= bound * ref_lora[k].norm() + 1e-6, k
    w = ref_loop.model.base_model.model.model.layers[0].mlp.down_proj.base_layer.weight.nf4
    total, group = w.data.numel() + w.absmax.numel(), 64 * 256 // 2 + 256  # bytes: all, and one quant group's
    if name in UNEVEN:  # windows of whole groups: 1/N, and at most one group more
        assert total / world <= got["shard_bytes"] <= total / world + group, (got["shard_bytes"], total)
    else:
        assert got["shard_bytes"] * world == total  # 1/N of the 4-bit bytes at rest
    assert (launches.job(name) / "fsdp" / "adapter" / "adapter_model.safetensors").is_file()
    layers, units = widths.get("layers", 2), [u for u in got["units"] if u["trainable"]]
    if options.get("cpu_offload"):  # each layer's NF4 bases a unit of their own: 2 per layer + embedding, head, root
        assert len(units) == 2 * layers + 3, units
        for u in units:  # the host holds frozen weights only: no gradient or optimizer state leaves the GPU
            assert not any(u["offloaded"]) or (all(u["offloaded"]) and not any(u["trainable"])), u
        # offloaded: each layer's bases, the embedding, the head and the root's final norm; not: LoRA with the norms
        assert sum(all(u["offloaded"]) for u in units) == layers + 3, units
    else:
        assert len(units) == layers + 3 and not any(o for u in units for o in u["offloaded"])
    # the frozen embedding is gathered for its lookup only, never again in backward (nor is the head, kept gathered
    # from forward to backward): no backward all-gather of their size (vocab x hidden in the gathered dtype, the
    # vocabulary's 104 rows padded to whole row chunks of ceil(104 / N))
    mixed = options.get("precision", "fp32") != "fp32" and options.get("fsdp_mixed_precision", True)
    emb_bytes = -(-104 // world) * world * widths.get("hidden", 128 * world) * (2 if mixed else 4)
    assert emb_bytes in [b for b, backward in got["gathered"] if not backward], (emb_bytes, got["gathered"][:8])
    assert emb_bytes not in [b for b, backward in got["gathered"] if backward], (emb_bytes, got["gathered"])


@pytest.mark.timeout(900)
def test_checkpoint_saved_on_two_ranks_resumes_on_one_and_back(launches, tmp_path):
    """Sharded checkpoints (DCP) reshard: 2 ranks -> 1 process, and 1 process -> 2 ranks, on the same curve."""
    world = 2
    model = launches.model(hidden=256)
    one = lambda run_dir, **kw: make_loop(run_dir, grad_accum=world, model_dir=model, device=one_device(),  # noqa: E731
                                          save_every=3, **kw)
    full = [r["loss"] for r in one(tmp_path / "full").train() if "loss" in r]

    a = launches.result(world, "two then one")  # 2 ranks until step 4
    assert (a / "checkpoint-3" / "dcp").is_dir() and (a / "checkpoint-3" / "adapter_model.safetensors").is_file()
    resumed = [r["loss"] for r in one(a, resume=True).train() if "loss" in r]
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(full), rtol=1e-5, atol=0)

    b = launches.result(world, "one then two")  # one process until step 4 (Launches.launch), the 2 ranks resumed
    resumed = [r["loss"] for r in torch.load(b / "records.pt", weights_only=False) if "loss" in r]
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(full), rtol=1e-5, atol=0)


@pytest.mark.timeout(900)
def test_fp16_overflow_on_one_rank_skips_the_step_on_all(launches):
    out = launches.result(2, "overflow")
    for rank in range(2):
        unchanged, scale_factor = zip(*torch.load(out / f"seen{rank}.pt"))
        assert unchanged[1:] == (False, True), rank  # step 2 updates the LoRA weights (step 1 has lr 0: warmup)
        assert scale_factor == (1.0, 1.0, 0.5), rank  # no overflow until step 3, which every rank skips


@pytest.mark.timeout(900)
@pytest.mark.parametrize("saved_on, resumed_on", [(4, 2)])  # fewer to more ranks: 1 -> 2 above
def test_checkpoint_resumes_on_another_number_of_ranks(launches, tmp_path, saved_on, resumed_on):
    """A run saved (DCP) on `saved_on` ranks and resumed on `resumed_on` follows the one-process curve."""
    if not launchable(max(saved_on, resumed_on)):
        pytest.skip("needs 4 GPUs here")
    model = launches.model(hidden=512)  # shardable on 4 ranks
    full = make_loop(tmp_path / "full", grad_accum=4, model_dir=model, device=one_device()).train()
    # the same global batch on both: 4 batches per step = 4 ranks x 1 or 2 ranks x 2 accumulation steps (the job
    # "saved on 4" of the 4-rank launch, and "resumed on 2" of the 2-rank launch on a copy of its folder)
    assert (launches.result(saved_on, "saved on 4") / "checkpoint-3" / "trainer_state.pt").is_file()
    run = launches.result(resumed_on, "resumed on 2")
    resumed = [r["loss"] for r in torch.load(run / "records.pt", weights_only=False) if "loss" in r]
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor([r["loss"] for r in full if "loss" in r]), rtol=1e-5, atol=0)
