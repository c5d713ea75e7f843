"""The CLI's --pp: a 2-rank pipeline run as a user starts it (its own process) against the same run in one process,
its schedule report and PEFT adapter; bad pipeline options are one-line errors."""

import json

import pytest
import torch

from qlora_fsdp.model import load_model
from qlora_fsdp.training import TrainConfig


@pytest.mark.timeout(300)
def test_cli_pp_2_trains_reports_the_schedule_and_writes_a_peft_adapter(tmp_path):
    import subprocess
    import sys

    import peft

    from qlora_fsdp.model import embedded_model_dir

    out = tmp_path / "run"
    args = ["train", "--nproc", "2", "--pp", "2", "--pp-schedule", "interleaved_zb", "--pp-report", "--max-steps", "3",
            "--max-length", "96", "--batch-size", "8", "--output-dir", str(out)]  # fmt: skip
    # as a user runs it: a process of its own, whose exit shows what the workers left behind (the resource
    # tracker warns of leaked semaphores when the parent exits)
    proc = subprocess.run([sys.executable, "-m", "qlora_fsdp", *args], capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "leaked" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    printed = proc.stdout
    assert "pipeline interleaved_zb: 2 stages x 1 replicas, 4 microbatches a step" in printed
    report = json.loads((out / "pp_report.json").read_text())
    assert [r["stages"] for r in report["ranks"]] == [[0, 2], [1, 3]]
    from qlora_fsdp.cli import EMBEDDED_DEFAULTS
    from qlora_fsdp.training import TrainLoop

    one = TrainConfig(**{**EMBEDDED_DEFAULTS, "max_steps": 3, "max_length": 96, "batch_size": 8, "progress": False,
                         "output_dir": str(tmp_path / "one")})  # fmt: skip  (the same run on one process)
    ref = TrainLoop(one).train()
    got = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # the embedded default's lr (3e-3): Adam turns the microbatches' sum-order noise (~1e-7) into 2.6e-5 by step 3
    for k in ("loss", "eval_loss"):
        torch.testing.assert_close(torch.tensor([r[k] for r in got if k in r]), torch.tensor([r[k] for r in ref if k in r]),
                                   rtol=1e-4, atol=0)  # fmt: skip
    model = peft.PeftModel.from_pretrained(load_model(embedded_model_dir(), dtype=torch.float32, device="cpu"),
                                           out / "adapter")  # fmt: skip
    assert sum("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters()) == 4 * 7  # all trained


@pytest.mark.parametrize("args, message", [
    (["--nproc", "3", "--pp", "2"], "--nproc 3 is not a multiple of --pp 2"),
    (["--nproc", "2", "--pp", "2", "--compile", "--pp-schedule", "zbv"], "refuses zero-bubble schedules"),
    (["--nproc", "2", "--pp", "2", "--pp-schedule", "dualpipe"], "choose one of gpipe, 1f1b"),
    (["--nproc", "2", "--pp", "2", "--packing"], "--packing with --pp"),
    (["--nproc", "2", "--pp", "2", "--pp-microbatches", "3"], "does not divide"),
])  # fmt: skip
def test_cli_bad_pipeline_options_are_one_line_errors(args, message, capsys):
    from qlora_fsdp.cli import main

    assert main(["train", "--max-steps", "1", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
