"""FSDP's rank processes apart from the loss curves of test_fsdp.py: a world of one against the unsharded model, a
rank that dies mid-run (the run stops, then resumes), the CLI's one-line errors for --nproc and NCCL, and how ranks
share the host's cores."""

import os

import pytest
import torch
import torch.multiprocessing as mp

from qlora_fsdp.model import load_model
from tests.parallel.test_fsdp import ON_GPUS, _join, free_port, tiny_llama


def _dying_worker(rank, cfg, port):
    """The CLI's worker, except that rank 1 dies (as if killed) during step 3."""
    from qlora_fsdp import cli
    from qlora_fsdp.training import TrainLoop

    step = TrainLoop.train_step

    def train_step(self):
        if self.rank == 1 and self.step == 2:
            os._exit(1)
        return step(self)

    TrainLoop.train_step = train_step
    cli._worker(rank, cfg, port)


@pytest.mark.timeout(300)
def test_dead_worker_stops_the_run_and_it_resumes(tmp_path, capfd, monkeypatch):
    """`train --nproc 2` on a tiny Llama with a held-out set: a rank that dies stops the run (no hang, no adapter);
    resumed, it trains to the end and writes its metrics once and one adapter. (The CLI's --nproc 2 run of the
    embedded default, whose 128 x 128 projections split quant groups on 2 ranks: tests/test_notebook.py.)"""
    import json
    import shutil
    import time

    from qlora_fsdp import cli
    from qlora_fsdp.model import embedded_model_dir

    model = tiny_llama(tmp_path / "model")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(embedded_model_dir() / f, model / f)
    out = tmp_path / "run"
    args = ["train", "--nproc", "2", "--model", str(model), "--max-steps", "4", "--save-every", "2", "--precision",
            "fp32", "--batch-size", "4", "--output-dir", str(out), "--eval-split", "train[:8]",
            "--eval-dataset", str(embedded_model_dir() / "eval.jsonl")]  # fmt: skip
    monkeypatch.setattr(cli, "_worker", _dying_worker)
    start = time.monotonic()
    assert cli.main(args) == 2
    assert time.monotonic() - start < 60  # no hang: the surviving rank is stopped
    assert "a worker died" in capfd.readouterr().err
    assert (out / "checkpoint-2" / "trainer_state.pt").is_file() and not (out / "adapter").exists()
    monkeypatch.undo()
    assert cli.main(args + ["--resume"]) == 0
    assert "resumed from" in capfd.readouterr().out  # the workers write to the inherited stdout
    steps = [json.loads(x).get("step") for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4]  # step 0 (eval) and every step written once: by rank 0 alone
    assert (out / "adapter" / "adapter_model.safetensors").is_file()  # one adapter, written at the end


def test_cli_nproc_more_than_gpus_and_missing_nccl_are_one_line_errors(monkeypatch, capsys):
    from qlora_fsdp.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main(["train", "--nproc", "2", "--max-steps", "1"]) == 2
    assert "--nproc 2 but this machine has 1 GPU(s): lower --nproc" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")  # a torchrun worker on a torch build without NCCL
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: False)
    assert main(["train", "--max-steps", "1"]) == 2
    assert "NCCL is not available in this torch build" in capsys.readouterr().err


def test_ranks_share_the_host_cores_unless_omp_num_threads_is_set(monkeypatch):
    import qlora_fsdp.parallel.cpu_threads as cpu_threads

    before = torch.get_num_threads()
    monkeypatch.setattr(cpu_threads, "host_cores", lambda: 8)
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert cpu_threads.share_cpu_cores(4) == 2
        assert cpu_threads.share_cpu_cores(16) == 1  # more ranks than cores: one thread each
        torch.set_num_threads(3)
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert cpu_threads.share_cpu_cores(4) == 3  # the user's choice stands
    finally:
        torch.set_num_threads(before)


def _one_rank_job(rank, port, model_dir, out):
    """apply_fsdp on a process group of one, against the same model unsharded: 3 AdamW steps."""
    import peft

    from qlora_fsdp.parallel import apply_fsdp

    _join(rank, 1, port)
    ids = torch.randint(0, 104, (2, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for shard in (True, False):
        torch.manual_seed(0)
        model = peft.get_peft_model(load_model(model_dir, dtype=torch.float32, device="cpu"),
                                    peft.LoraConfig(r=4, target_modules="all-linear"))  # fmt: skip
        if shard:
            apply_fsdp(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        run = []
        for _ in range(3):  # the second forward re-gathers into the first gather's (freed) inner tensors
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            run.append(loss.item())
        losses.append(run)
    torch.save(losses, out)
    torch.distributed.destroy_process_group()


@pytest.mark.timeout(300)
def test_one_rank_equals_the_unsharded_model(tmp_path):
    """FSDP2 on a world of one (a direct apply_fsdp caller): NF4Tensor's one flat all-gather output is cut into
    inner tensors with storages of their own, which FSDP2 frees and reallocates one by one (as views of one
    storage, the reallocation shrank it and the second gather failed: "setStorage ... out of bounds")."""
    if ON_GPUS:
        pytest.skip("gloo on CPU")
    out = tmp_path / "losses.pt"
    mp.spawn(_one_rank_job, args=(free_port(), tiny_llama(tmp_path / "model"), out), nprocs=1, join=True)
    sharded, plain = torch.load(out)
    assert sharded == plain and sharded[2] < sharded[0], (sharded, plain)
