"""TrainConfig as the CLI shows it: every option described in --help with its choices, and a value outside the
choices a one-line error."""

from dataclasses import fields

import pytest
import torch

from qlora_fsdp.cli import main
from qlora_fsdp.training import TrainConfig, TrainError


def test_help_describes_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    text, squeezed = " ".join(out.split()), "".join(out.split())  # argparse wraps lines, also at hyphens
    options = [f for f in fields(TrainConfig) if "help" in f.metadata]
    assert len(options) == len(fields(TrainConfig)) - 2  # all but progress and extra
    for f in options:
        flag = "--" + f.name.replace("_", "-")
        assert flag in text, flag
        assert "".join(f.metadata["help"].split()) in squeezed, flag
    assert "(one of auto, bf16, fp16, fp32; default: auto)" in text
    assert "one of gpipe, 1f1b, interleaved_zb, zbv" in text


@pytest.mark.parametrize("flag, value, listed", [
    ("--precision", "fp8", "auto, bf16, fp16, fp32"),
    ("--compile-backend", "tvm", "inductor, aot_eager, eager"),
    ("--compile-mode", "fast", "'', default, reduce-overhead"),
    ("--pp-schedule", "dualpipe", "gpipe, 1f1b, interleaved_zb, zbv"),
])  # fmt: skip
def test_a_value_outside_the_choices_is_a_one_line_error(flag, value, listed, capsys):
    assert main(["train", "--max-steps", "1", flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{flag} {value}: choose one of {listed}" in err and len(err.splitlines()) == 1, err


def test_compile_mode_needs_the_inductor_backend():
    from qlora_fsdp.training import TrainError

    with pytest.raises(TrainError, match="--compile-mode max-autotune is inductor's: drop --compile-backend eager"):
        TrainConfig(compile=True, compile_mode="max-autotune", compile_backend="eager").validate()


def test_cpu_offload_without_data_parallel_ranks_is_a_one_line_error(monkeypatch, capsys):
    """FSDP2's CPU offload has nothing to offload in one data-parallel process: it used to be ignored silently."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["train", "--max-steps", "1", "--cpu-offload"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--cpu-offload offloads FSDP2's shards" in err and len(err.splitlines()) == 1, err
    with pytest.raises(TrainError, match="--cpu-offload"):
        TrainConfig(cpu_offload=True, nproc=2, pp=2).validate()  # two pipeline stages, one replica each
    TrainConfig(cpu_offload=True, nproc=2).validate()
    TrainConfig(cpu_offload=True, nproc=4, pp=2).validate()
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun: --nproc stays 1
    TrainConfig(cpu_offload=True).validate()
    # prepare() checks the processes it is given (any entry point), before touching the model
    from qlora_fsdp.training.setup import prepare

    with pytest.raises(TrainError, match="--cpu-offload"):
        prepare(None, TrainConfig(cpu_offload=True), device=torch.device("cpu"), world=1)


def test_precision_auto_follows_the_gpu(monkeypatch):
    """auto: bf16 where the device computes in it, else fp16 with one line saying so; bf16 on a GPU without it is a
    one-line error. A T4 is emulated the way the GPU gate does it (qlora_fsdp.gpu.EMULATED)."""
    import torch

    from qlora_fsdp import gpu
    from qlora_fsdp.training.config import resolve_precision

    assert resolve_precision("auto", "cpu")[0] == "bf16" and resolve_precision("fp32", "cpu") == ("fp32", None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    monkeypatch.setattr(gpu, "EMULATED", (7, 5))
    chosen, note = resolve_precision("auto", "cuda:0")
    assert chosen == "fp16" and note.startswith("precision: fp16 (auto: Tesla T4 (sm75") and "no bf16" in note
    with pytest.raises(TrainError) as e:
        resolve_precision("bf16", "cuda:0")
    assert str(e.value) == ("--precision bf16: Tesla T4 (sm75, emulated by QLORA_FSDP_CUDA_CAPABILITY) has no bf16: "
                            "use --precision fp16 (or auto)")  # fmt: skip
    assert resolve_precision("fp16", "cuda:0") == ("fp16", None)
    monkeypatch.setattr(gpu, "EMULATED", (9, 0))
    assert resolve_precision("auto", "cuda:0")[0] == "bf16"


def test_the_emulated_capability_is_read_from_the_environment():
    import subprocess
    import sys

    code = "from qlora_fsdp.gpu import EMULATED, cuda_capability; print(EMULATED, cuda_capability('cuda:0'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**__import__("os").environ, "QLORA_FSDP_CUDA_CAPABILITY": "7.5"})  # fmt: skip
    assert out.stdout.split() == ["(7,", "5)", "(7,", "5)"], out.stderr[-500:]
    bad = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**__import__("os").environ, "QLORA_FSDP_CUDA_CAPABILITY": "t4"})  # fmt: skip
    assert bad.returncode != 0 and "write major.minor, e.g. 7.5" in bad.stderr
