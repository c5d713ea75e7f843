"""load_model(): a Hugging Face causal LM with its decoder-layer linears as frozen NF4 weights.

    model = load_model("meta-llama/Llama-3.1-8B" | "/path/to/dir" | "/path/to/model.gguf", dtype=torch.bfloat16)

The model is built on the meta device and its checkpoint streamed in tensor by tensor, so a full 16-bit copy
never exists on the host or the GPU (host peak: about one tensor plus the 4-bit model):
- a 16-bit checkpoint: every `nn.Linear` inside the decoder layers is quantized to NF4 as it arrives (on the
  GPU when the model goes there, bit-exact with bitsandbytes on that device); embeddings, norms and lm_head
  stay 16-bit;
- a bitsandbytes 4-bit checkpoint (`quantization_config.quant_method == "bitsandbytes"`, nf4): the stored
  bytes and statistics are imported as they are, bit for bit, no requantization;
- a GGUF file (or a directory holding one and no checkpoint): converted once, whole in memory, by transformers'
  GGUF loader to a cached bf16 checkpoint (gguf.py), then loaded as a 16-bit checkpoint.
The result is a plain transformers `PreTrainedModel` whose quantized linears hold an `NF4Tensor` weight.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from .gguf import GGUFError, gguf_checkpoint
from .gpu import has_bf16
from .nf4 import NF4FormatError, nf4_from_state_dict, quantize_nf4
from .nf4.bnb import QUANT_STATE_SUFFIX
from .nf4.tensor import NF4Tensor


class ModelLoadError(ValueError):
    """A model that cannot be found or loaded; the message names the fix."""


# ---------------------------------------------------------------------------------------------------------
# The checkpoint: safetensors shards behind one lazy mapping


class Checkpoint(Mapping):
    """The tensors of a checkpoint directory (one `model.safetensors` or an index with shards), read lazily."""

    def __init__(self, path: Path, device: str | torch.device = "cpu"):
        from safetensors import safe_open

        index = path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (path / "model.safetensors").is_file():
            with safe_open(path / "model.safetensors", "pt") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise ModelLoadError(
                f"{path}: no model.safetensors or model.safetensors.index.json: save the model with "
                "save_pretrained(safe_serialization=True)"
            )
        self.path, self.device, self.weight_map = path, device, weight_map
        self._handles: dict[str, object] = {}

    def _handle(self, file: str):
        from safetensors import safe_open

        if file not in self._handles:
            shard = self.path / file
            if not shard.is_file():
                raise ModelLoadError(f"{shard}: shard listed in the index is missing: download the checkpoint again")
            self._handles[file] = safe_open(shard, "pt", device=str(self.device))
        return self._handles[file]

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._handle(self.weight_map[key]).get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.weight_map)

    def __len__(self) -> int:
        return len(self.weight_map)

    def keys_in_file_order(self) -> list[str]:
        """Keys grouped by shard, so shards are read one after another."""
        return sorted(self.weight_map, key=lambda k: (self.weight_map[k], k))


EMBEDDED = "embedded"


def embedded_model_dir() -> Path:
    """The tiny Llama shipped in the package (with its tokenizer and task data): the default model."""
    return Path(__file__).resolve().parent / "assets" / "tiny"


def _gguf_checkpoint(path: Path) -> Path:
    try:
        return gguf_checkpoint(path)
    except GGUFError as e:
        raise ModelLoadError(str(e)) from None


def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
    """A local directory, "embedded", a Hugging Face model id from the local cache or the hub, or a GGUF file (or a
    directory holding one GGUF file and no checkpoint) as its cached 16-bit checkpoint (gguf.py)."""
    if str(name_or_path) == EMBEDDED:
        return embedded_model_dir()
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _gguf_checkpoint(path)
    if path.is_dir():
        if (path / "config.json").exists() or any(path.glob("*.safetensors")):
            return path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) > 1:
            raise ModelLoadError(f"{path} holds {len(ggufs)} GGUF files ({', '.join(g.name for g in ggufs)}): pass "
                                 "one of them as the model")  # fmt: skip
        return _gguf_checkpoint(ggufs[0]) if ggufs else path
    if path.exists() or str(name_or_path).startswith((".", "/", "~")) or str(name_or_path).count("/") > 1:
        raise ModelLoadError(f"model '{name_or_path}' not found: pass a directory holding config.json and safetensors, "
                             "or a .gguf file")  # fmt: skip
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(name_or_path), allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as e:  # offline, unknown id, gated repo
        raise ModelLoadError(
            f"model '{name_or_path}' not found locally and not downloadable ({type(e).__name__}): pass a local "
            "directory, or log in / go online for hub ids"
        ) from None


# ---------------------------------------------------------------------------------------------------------
# Which weights become NF4


def transformers_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (`get_base_model()`), or `model` itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a transformers causal LM (`model.model.layers` for Llama, Qwen, Mistral...)."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ModelLoadError(f"{type(model).__name__}: no decoder layers found (expected model.model.layers)")
    return layers


def quantizable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """`{parameter name of the weight: module}` for every nn.Linear inside the decoder layers."""
    layer_ids = {id(m) for m in decoder_layers(model).modules()}
    return {f"{name}.weight": m for name, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) in layer_ids}


def _set_parameter(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    old = getattr(module, attr)
    if isinstance(old, nn.Parameter) or old is None:
        setattr(module, attr, nn.Parameter(value, requires_grad=False))
    else:  # a persistent buffer
        module._buffers[attr] = value


# ---------------------------------------------------------------------------------------------------------


def _bnb_4bit_config(config) -> dict | None:
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    if qc.get("quant_method") != "bitsandbytes":
        raise ModelLoadError(f"quantization method '{qc.get('quant_method')}' is not supported: use a 16-bit or a "
                             "bitsandbytes nf4 checkpoint")  # fmt: skip
    if not qc.get("load_in_4bit"):
        raise ModelLoadError("bitsandbytes 8-bit checkpoints are not supported: use a 16-bit or a 4-bit nf4 checkpoint")
    if qc.get("bnb_4bit_quant_type", "nf4") != "nf4":
        raise ModelLoadError(f"bnb_4bit_quant_type '{qc.get('bnb_4bit_quant_type')}' is not supported (only nf4)")
    return qc


def _rebuild_meta_buffers(model: nn.Module, device: torch.device) -> None:
    """Non-persistent buffers (rotary inv_freq) are computed at construction: rebuild their modules on `device`."""
    for name, module in list(model.named_modules()):
        if not any(b.is_meta for b in module.buffers(recurse=False)):
            continue
        if "Rotary" not in type(module).__name__:
            raise ModelLoadError(f"{name}: buffers left on the meta device by {type(module).__name__}")
        config = getattr(module, "config", None) or model.config
        with torch.device("cpu"):  # the constructor's signature varies across transformers versions
            fresh = type(module)(config).to(device)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, fresh)


def load_model(
    name_or_path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    attn_implementation: str = "sdpa",
    blocksize: int = 64,
    storage_device: str | torch.device | None = None,
):
    """Load a causal LM with NF4 decoder linears (see the module docstring). `device` defaults to CUDA if present;
    `dtype` (of the 16-bit weights and the compute) to bf16 where the device has it, else fp16 (a T4).
    `storage_device`: where the loaded tensors are kept, when not on `device` (which still quantizes): "cpu" for
    FSDP2 on GPUs, whose `fully_shard` moves one unit at a time to the rank's GPU and keeps its shard, so no GPU ever
    holds the whole model (a bnb-4bit checkpoint's bytes stay views of the mapped file until then)."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    storage = torch.device(storage_device) if storage_device is not None else device
    dtype = dtype or (torch.bfloat16 if has_bf16(device) else torch.float16)
    path = resolve_model_dir(name_or_path)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: cannot read config.json ({e}): pass a transformers model directory") from None
    bnb = _bnb_4bit_config(config)
    if bnb is not None:
        config.quantization_config = None
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    targets = quantizable_linears(model)
    expected = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    ckpt = Checkpoint(path)

    loaded: set[str] = set()
    for key in ckpt.keys_in_file_order():
        if bnb is not None and (QUANT_STATE_SUFFIX in key or key.endswith(
                (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map"))):  # fmt: skip
            continue  # read together with their weight
        if key not in expected:
            continue  # e.g. rotary inv_freq saved by old transformers versions
        if key in targets:
            if bnb is not None:
                try:
                    w = nf4_from_state_dict(ckpt, key).to(storage)
                except NF4FormatError as e:
                    raise ModelLoadError(f"{path}: {e}") from None
            else:
                w = quantize_nf4(ckpt[key].to(device), blocksize=blocksize).to(storage)
            value = NF4Tensor(w, dtype)
        else:
            tensor = ckpt[key]
            value = tensor.to(storage, dtype) if tensor.is_floating_point() else tensor.to(storage)
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ModelLoadError(f"{key}: checkpoint shape {tuple(value.shape)} != model shape "
                                 f"{tuple(expected[key].shape)}: config.json does not match the weights")  # fmt: skip
        _set_parameter(model, key, value)
        loaded.add(key)

    if getattr(config, "tie_word_embeddings", False) or getattr(config.get_text_config(), "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ModelLoadError(f"{path}: the checkpoint lacks {len(missing)} weights (e.g. {missing[0]}): incomplete download?")
    _rebuild_meta_buffers(model, storage)
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    for p in model.parameters():
        p.requires_grad_(False)
    model.config._name_or_path = str(name_or_path)  # what peft records as base_model_name_or_path
    model.eval()
    return model


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every NF4Tensor weight by its dense dequantization (in place): the 16-bit model that holds
    exactly the weights the NF4 model computes with. Used to merge adapters and to export."""
    for name, param in list(model.named_parameters()):
        if isinstance(param, NF4Tensor):
            _set_parameter(model, name, param.dequantize(dtype or param.dtype))
    return model


def random_model(config, *, dtype: torch.dtype = torch.bfloat16, device: str | torch.device | None = None,
                 std: float = 0.02, seed: int = 0, attn_implementation: str = "sdpa"):  # fmt: skip
    """A causal LM of `config`'s shape with random N(0, std) weights (norms 1), its decoder linears quantized to NF4
    one at a time on `device`: no 16-bit copy of the model is ever whole and nothing is downloaded. The benchmark
    model (e.g. the Llama-3.1-8B shape); the same seed, device and dtype give the same weights."""
    from transformers import AutoModelForCausalLM

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    targets = quantizable_linears(model)
    gen = torch.Generator(device).manual_seed(seed)
    for name, p in list(model.named_parameters()):
        if p.ndim == 1:  # norms (and biases: zero)
            value = torch.ones(p.shape, dtype=dtype, device=device) if "norm" in name else torch.zeros_like(p, device=device)
        else:
            value = torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32).mul_(std).to(dtype)
            if name in targets:
                value = NF4Tensor(quantize_nf4(value), dtype)
        _set_parameter(model, name, value)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    _rebuild_meta_buffers(model, device)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return model
