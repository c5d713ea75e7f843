"""gguf_checkpoint(): a GGUF file as the 16-bit transformers checkpoint directory that load_model reads.

    gguf_checkpoint("model.Q4_K_M.gguf") -> ~/.cache/qlora_fsdp/gguf/model.Q4_K_M-<bytes>-<mtime_ns>/

The file is converted once by transformers' own GGUF loader (the `gguf` package): its weights dequantized to bf16
and saved with the config, generation config and tokenizer (model.safetensors, config.json, tokenizer.json...).
The cache root is $QLORA_FSDP_CACHE (default ~/.cache/qlora_fsdp); a file changed in size or mtime converts again.
A directory appears whole or not at all (written under a temporary name, then renamed); concurrent callers (the
ranks of a run) wait on a lock and convert once. Failures raise GGUFError, one line that names the file and the fix.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

ADVICE = "download it again if it is damaged, or pass the model as a safetensors checkpoint (save_pretrained)"


class GGUFError(ValueError):
    """A GGUF file that cannot be converted; the message names the fix (load_model raises it as ModelLoadError)."""


def cache_root() -> Path:
    return Path(os.environ.get("QLORA_FSDP_CACHE") or Path.home() / ".cache" / "qlora_fsdp").expanduser()


def checkpoint_dir(path: Path) -> Path:
    """Where the checkpoint of GGUF file `path` is cached: its stem, size and mtime name it."""
    st = path.stat()
    return cache_root() / "gguf" / f"{path.stem}-{st.st_size}-{st.st_mtime_ns}"


@contextlib.contextmanager
def _lock(file: Path):
    """An exclusive advisory lock on `file` (fcntl; no lock where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: concurrent conversions only cost time, the rename keeps the result whole
        yield
        return
    with open(file, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


def _convert(path: Path, out: Path) -> None:
    """transformers' GGUF loader: the tokenizer and the dequantized bf16 model of `path`, saved into `out`."""
    import torch
    import transformers

    kwargs = {}
    if hasattr(transformers, "GgufConfig"):  # transformers 5.x: saving needs the weights dequantized
        kwargs["quantization_config"] = transformers.GgufConfig(dequantize=True)
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.bfloat16,
                                                              **kwargs)  # fmt: skip
    model.save_pretrained(out)
    tok.save_pretrained(out)
    if not (out / "generation_config.json").is_file():
        model.generation_config.save_pretrained(out)


def gguf_checkpoint(path: str | os.PathLike) -> Path:
    """The cached 16-bit checkpoint directory of GGUF file `path`, converted on the first call (module docstring)."""
    given = Path(path).expanduser()  # named in messages; its resolved path (a link's target) is converted
    if not given.is_file():
        raise GGUFError(f"{given}: no such GGUF file")
    path = given.resolve()
    out = checkpoint_dir(path)
    if out.is_dir():
        return out
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files with it)
    except ImportError:
        raise GGUFError(f"{given}: reading GGUF files needs the gguf package: pip install gguf") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    with _lock(out.parent / ".lock"):
        if out.is_dir():  # another process converted it while this one waited
            return out
        print(f"converting {path.name} to a 16-bit checkpoint in {out} (once)", file=sys.stderr, flush=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            _convert(path, tmp)
            tmp.rename(out)
        except ImportError as e:  # transformers wants another gguf version
            raise GGUFError(f"{given}: transformers cannot read GGUF ({_one_line(e)}): pip install -U gguf") from None
        except Exception as e:  # an architecture transformers cannot load, a truncated or foreign file
            raise GGUFError(f"{given}: transformers cannot convert this GGUF ({_one_line(e)}): {ADVICE}") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out
