"""examples/kaggle_2x_t4.ipynb runs: its code cells, with the parameter cell set to the embedded default on 2 gloo
processes, executed in order as one script (shell lines, `!pip install`, skipped: the package is installed here).
It must train, show the loss plot's file, answer from the adapter and zip the adapter.

Its training is the suite's run of `qlora-fsdp train --nproc 2` on the embedded default (a process of its own, as a
user runs it): the embedded model's 128 x 128 projections split quant groups on 2 ranks (refused before the windows
of nf4/sharding.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "kaggle_2x_t4.ipynb"
EMBEDDED = """
MODEL = "embedded"
DATASET = "embedded"
SPLIT = "train[:100]"
NPROC = 2
MAX_STEPS = 6
EXTRA = ["--batch-size", "4"]
OUTPUT = "runs/kaggle"
PROMPT, INPUT = "Give the last letter.", "kitten"
PACKAGE = "unused"
"""


def notebook_script(parameters: str) -> str:
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert "parameters" in code[0]["metadata"].get("tags", []), "the first code cell holds the parameters"
    parts = [parameters]
    for cell in code[1:]:
        lines = "".join(cell["source"]).splitlines()
        parts.append("\n".join(line for line in lines if not line.lstrip().startswith(("!", "%"))))
    return "\n\n".join(parts) + "\n"


@pytest.mark.timeout(300)
def test_the_kaggle_notebook_runs_on_the_embedded_default(tmp_path):
    script = tmp_path / "notebook.py"
    script.write_text(notebook_script(EMBEDDED))
    assert '"--nproc", NPROC' in script.read_text()  # its training runs on NPROC = 2 ranks
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    run = tmp_path / "runs" / "kaggle"
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and (run / "loss.png").is_file()
    assert (run / "adapter.zip").is_file() and "adapter saved:" in proc.stdout
    assert "train loss:" in proc.stdout and "held-out loss" in proc.stdout


def test_the_notebook_parameters_are_the_seed_scenario():
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    params = "".join(next(c for c in cells if c["cell_type"] == "code")["source"])
    for expected in ('MODEL = "unsloth/Meta-Llama-3.1-8B-bnb-4bit"', 'SPLIT = "train[:100]"', "NPROC = 2"):
        assert expected in params
