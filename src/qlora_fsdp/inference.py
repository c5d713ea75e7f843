"""Inference with an NF4 base: dequantize every weight once for a whole generation, load a trained adapter.

    with dense_weights(model, merge=True):   the NF4 weights swapped for their dense dequantization (and a peft
        model.generate(...)                  model's adapters merged into them), restored on exit: each token
                                             then costs a dense forward, no dequantization, no LoRA matmuls
    model, tok = load_adapted(adapter_dir)   the base (NF4, or dense) with a trained peft adapter

Training dequantizes each weight in every forward, which costs little next to a step's matmuls over thousands of
tokens. Generation runs one token per forward, so dequantizing all weights per token would dominate it (on CPU
0.18 s a token for SmolLM2-135M, against 0.05 s dense); on a GPU a small model's token is launch-bound, and the
adapter's two matmuls per linear cost more than the base's one, hence the merge (W + s B A, rounded once to the
weight's dtype, as `export --merge` does). The dense copy takes 2 bytes a weight (bf16, fp16) or 4 (fp32) on the
weights' device; where it does not fit in free memory the model stays NF4 and says so.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .nf4.tensor import NF4Tensor

logger = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HEADROOM = 1.25  # free memory asked for, per byte of dense copy (activations, KV cache, allocator slack)


def _nf4_weights(model: nn.Module) -> list[tuple[nn.Module, str, NF4Tensor]]:
    return [(m, name, p) for m in model.modules() for name, p in m.named_parameters(recurse=False)
            if isinstance(p, NF4Tensor)]  # fmt: skip


def free_bytes(device: torch.device) -> int:
    """Memory free for a new allocation on `device`: the GPU's free memory, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not Linux: do not guess low
        return 1 << 62


def dense_bytes(model: nn.Module) -> int:
    """Bytes of the dense copies dense_weights would make."""
    return sum(p.numel() * p.dtype.itemsize for _, _, p in _nf4_weights(model))


@contextmanager
def dense_weights(model: nn.Module, min_free_bytes: int | None = None, merge: bool = False):
    """Swap every NF4Tensor weight of `model` for its dense dequantization (same dtype, same device) for the block,
    then put the NF4 weights back (the same objects). The dense copies compute exactly the weights the NF4 path
    dequantizes, so outputs match. With `merge`, a peft model's active adapters are merged into the dense copies for
    the block (peft's merge_adapter; unmerged before the NF4 weights return). Yields True when swapped; False (model
    untouched) when the copies would not fit in free memory (needed: `min_free_bytes`, default HEADROOM x their
    size) or the weights are sharded (FSDP)."""
    weights = _nf4_weights(model)
    if not weights or any(type(p).__name__ == "DTensor" for p in model.parameters()):
        yield False
        return
    need = dense_bytes(model)
    free = free_bytes(weights[0][2].device)
    if free < (min_free_bytes if min_free_bytes is not None else HEADROOM * need):
        logger.warning("not dequantizing the base once for generation: %.2f GB dense would not fit in %.2f GB free "
                       "(each token dequantizes every weight again, slower)", need / 1e9, free / 1e9)  # fmt: skip
        yield False
        return
    merged = False
    try:
        with torch.no_grad():
            for module, name, w in weights:
                module._parameters[name] = nn.Parameter(w.dequantize(w.dtype), requires_grad=False)
            if merge and hasattr(model, "merge_adapter"):
                model.merge_adapter()
                merged = True
        yield True
    finally:
        if merged:  # peft's merged flags back to unmerged (the dense copies it subtracts from are dropped next)
            with torch.no_grad():
                model.unmerge_adapter()
        for module, name, w in weights:
            module._parameters[name] = w


def load_adapted(adapter: str | os.PathLike, model: str | None = None, *, dense: bool = False,
                 dtype: str | None = None, device: str | None = None):  # fmt: skip
    """(peft model, tokenizer): the base (`model`, default the adapter's base_model_name_or_path) loaded in NF4
    (dense 16-bit with `dense`: for merging) with the trained adapter of directory `adapter` on it; `dtype` "bf16",
    "fp16" or "fp32", default load_model's (bf16 where the device has it, else fp16)."""
    import json

    import peft

    from .model import EMBEDDED, ModelLoadError, dequantize_model, load_model
    from .training.batches import load_tokenizer

    path = Path(adapter)
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{path} holds no adapter_config.json: pass the adapter directory of a run "
                             "(e.g. runs/qlora/adapter)")  # fmt: skip
    base = model or json.loads(config_file.read_text()).get("base_model_name_or_path") or EMBEDDED
    nf4_model = load_model(base, dtype=DTYPES[dtype] if dtype else None, device=device)
    if dense:
        dequantize_model(nf4_model)
    adapted = peft.PeftModel.from_pretrained(nf4_model, path)
    tok = load_tokenizer(str(path) if (path / "tokenizer_config.json").is_file() else base)
    return adapted, tok


def stop_token_ids(model, tokenizer) -> list[int]:
    """Token ids that end an answer: the tokenizer's eos and the model's generation config's (end of turn)."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


@torch.no_grad()
def greedy_answer(model, tokenizer, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """The greedy continuation of `prompt_ids` (at most max_new_tokens, up to and with a stop token)."""
    ids = torch.tensor([prompt_ids], device=model.device)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=stop_token_ids(model, tokenizer))  # fmt: skip
    return out[0, len(prompt_ids) :].tolist()
