"""TrainConfig as the CLI shows it: every option described in --help with its choices, and a value outside the
choices a one-line error."""

from dataclasses import fields

import pytest

from qlora_fsdp.cli import main
from qlora_fsdp.training import TrainConfig


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
    assert "(one of bf16, fp16, fp32; default: bf16)" in text
    assert "one of gpipe, 1f1b, interleaved_zb, zbv" in text


@pytest.mark.parametrize("flag, value, listed", [
    ("--precision", "fp8", "bf16, fp16, fp32"),
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
