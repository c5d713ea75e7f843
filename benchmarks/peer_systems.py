"""The systems of benchmarks/peers.py: each builds `step(batch) -> loss` (forward, backward, clip, AdamW) on the same
checkpoint, LoRA (r=16, alpha 32, dropout 0, all 7 projections) and bf16, the way its documentation recommends for
speed. peers.py runs each in a process of its own (Unsloth and Liger patch transformers for the whole process); a
system in WORLD runs on that many ranks (FSDP2), each rank the same batch, so its loss is one GPU's.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch
from train_step import MAX_GRAD_NORM, manual_step

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IMPORTS = {"hf_peft_bnb": ["bitsandbytes", "peft"], "hf_peft_bnb_noac": ["bitsandbytes", "peft"],
           "hf_peft_bnb_liger": ["bitsandbytes", "peft", "liger_kernel"], "unsloth": ["unsloth"],
           "torchtune": ["torchtune", "torchao"], "torchtune_eager": ["torchtune", "torchao"], "ours_fastest": [],
           "ours_ac": [], "ours_ac_keep": [], "ours_leanest": [], "ours_longest": [], "ours_in_hf": ["peft"], "ours_in_hf_fused": ["peft"],
           "ours_in_hf_compiled": ["peft"],
           "torchtune_fsdp2": ["torchtune", "torchao"],
           "ours_fsdp2": [], "ours_fsdp2_noac": []}  # fmt: skip
WORLD = {"torchtune_fsdp2": 2, "ours_fsdp2": 2, "ours_fsdp2_noac": 2}  # ranks (GPUs) of the multi-rank systems
OURS = {"ours_fastest": {"keep_dequantized": True, "activation_checkpointing": False},
        "ours_ac": {"activation_checkpointing": True},
        "ours_ac_keep": {"activation_checkpointing": True, "keep_dequantized": True},
        "ours_leanest": {"activation_checkpointing": True, "offload_activations": True, "embedding_on_cpu": True},
        "ours_longest": {"activation_checkpointing": True, "offload_activations": True, "embedding_on_cpu": True,
                         "mlp_chunk_tokens": 16384},
        "ours_fsdp2": {"activation_checkpointing": True},  # torchtune_fsdp2's setup: checkpointing, compiled
        "ours_fsdp2_noac": {"activation_checkpointing": False}}  # fmt: skip


def _hf_loss(model):
    def loss_of(batch):
        return model(input_ids=batch["input_ids"].to(DEVICE), labels=batch["labels"].to(DEVICE), use_cache=False).loss

    return loss_of


def _hf_lora(model, checkpointing: bool = True):
    """hf_peft_bnb's LoRA on a transformers model: non-reentrant checkpointing (or none), then peft's LoRA r=16 on
    LINEARS, seeded."""
    import peft

    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(0)
    return peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LINEARS,
                                                      task_type="CAUSAL_LM"))  # fmt: skip


def _hf_step(model, max_grad_norm: float):
    """`step(batch) -> loss` of a peft model as Trainer steps it: transformers' forward and loss, then
    train_step.manual_step on its trainable parameters."""
    model.train()
    return manual_step([p for p in model.parameters() if p.requires_grad], _hf_loss(model), max_grad_norm=max_grad_norm)


def ours_in_hf(dirs, max_grad_norm: float, fused: bool = False, compile_backend: str | None = None):
    """The README's recipe for Trainer users: `load_model` + `peft.get_peft_model(LoraConfig)`, then transformers'
    own forward, loss and non-reentrant checkpointing, as hf_peft_bnb runs them: only the 4-bit layers are ours (the
    NF4 dequantizer; peft's own LoRA layers). What swapping bitsandbytes for load_model gives a Trainer user.
    fused: + `fuse_lora(model)`, our LoRA layers and fused SwiGLU in place of peft's (lora/fuse.py);
    compile_backend: + `compile_model(model)`, every decoder layer compiled (fewer kernels and far less Python a step)."""
    from qlora_fsdp import fuse_lora
    from qlora_fsdp.compile import compile_model
    from qlora_fsdp.model import load_model

    model = _hf_lora(load_model(dirs["bnb4"], dtype=torch.bfloat16, device=DEVICE))
    if fused:
        fuse_lora(model, activation_checkpointing=True)
    if compile_backend:
        compile_model(model, backend=compile_backend)
    return _hf_step(model, max_grad_norm)


def hf_peft_bnb(dirs, max_grad_norm: float, *, checkpointing=True, liger=False):
    import transformers

    if liger:  # before the model is built: its classes are patched
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True)  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_pretrained(dirs["bnb4"], dtype=torch.bfloat16, device_map={"": 0}
                                                              if DEVICE == "cuda" else None, attn_implementation="sdpa")  # fmt: skip
    # not peft.prepare_model_for_kbit_training: its fp32 copies of the norms, embedding and lm_head would cost this
    # baseline memory and speed (train_step.hf_bnb's setup, with which earlier tables were measured)
    return _hf_step(_hf_lora(model, checkpointing), max_grad_norm)


def unsloth(dirs, max_seq: int, max_grad_norm: float):
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(model_name=dirs["bnb4"], max_seq_length=max_seq, dtype=torch.bfloat16,
                                                 load_in_4bit=True)  # fmt: skip
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, lora_dropout=0, bias="none",
                                             target_modules=LINEARS, use_gradient_checkpointing="unsloth",
                                             random_state=0, max_seq_length=max_seq)  # fmt: skip
    model.train()
    return manual_step([p for p in model.parameters() if p.requires_grad], _hf_loss(model), max_grad_norm=max_grad_norm)


# -- torchtune ---------------------------------------------------------------------------------------------------
def _torchtune_model(config, max_seq: int):
    """qlora_llama3_1_8b's model for any config: torchtune's Llama 3 QLoRA builder (quantize_base, NF4 from torchao)
    with the checkpoint's plain RoPE (the shape has no Llama 3.1 frequency scaling); on the current default device."""
    from torchtune.models.llama3 import lora_llama3

    return lora_llama3(lora_attn_modules=["q_proj", "k_proj", "v_proj", "output_proj"], apply_lora_to_mlp=True,
                       apply_lora_to_output=False, vocab_size=config.vocab_size, num_layers=config.num_hidden_layers,
                       num_heads=config.num_attention_heads, num_kv_heads=config.num_key_value_heads,
                       embed_dim=config.hidden_size, max_seq_len=max_seq, intermediate_dim=config.intermediate_size,
                       norm_eps=config.rms_norm_eps, rope_base=rope_theta(config), lora_rank=16, lora_alpha=32,
                       lora_dropout=0.0, quantize_base=True)  # fmt: skip


def _torchtune_state(dirs, config, device) -> dict:
    """The nf4grid16 checkpoint (the bnb-4bit weights dequantized: torchao requantizes them) in torchtune's names."""
    from safetensors.torch import load_file
    from torchtune.models.convert_weights import hf_to_tune

    index = json.loads((Path(dirs["nf4grid16"]) / "model.safetensors.index.json").read_text())
    state = {}
    for file in sorted(set(index["weight_map"].values())):
        state.update(load_file(str(Path(dirs["nf4grid16"]) / file), device=str(device)))
    return hf_to_tune(state, num_heads=config.num_attention_heads, num_kv_heads=config.num_key_value_heads,
                      dim=config.hidden_size)  # fmt: skip


def _torchtune_step(model, compiled: bool, device, max_grad_norm: float):
    """Its recipe's loss (chunked cross-entropy on labels shifted by one, compiled with the model) and AdamW on the
    adapter, bf16 weights without autocast."""
    from torchtune import training
    from torchtune.modules.loss import CEWithChunkedOutputLoss

    loss_fn = CEWithChunkedOutputLoss()
    model.set_num_output_chunks(loss_fn.num_output_chunks)
    if compiled:
        loss_fn = training.compile_loss(loss_fn)

    def loss_of(batch):
        ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
        logits = model(ids)  # a list of chunks
        labels = torch.hstack((labels[..., 1:], torch.full_like(labels[..., :1], -100)))
        return loss_fn(logits, labels)

    return manual_step([p for p in model.parameters() if p.requires_grad], loss_of, autocast=False,
                       max_grad_norm=max_grad_norm)  # fmt: skip


def torchtune_qlora(dirs, config, max_seq: int, max_grad_norm: float, compiled: bool = True):
    """torchtune's QLoRA on one GPU: its model, activation checkpointing, compiled (lora_finetune_single_device)."""
    from torchtune import training
    from torchtune.modules import TransformerSelfAttentionLayer
    from torchtune.modules.peft import get_adapter_params, set_trainable_params

    with training.set_default_dtype(torch.bfloat16), torch.device(DEVICE):
        model = _torchtune_model(config, max_seq)
    # the checkpoint on the host, as its recipe's checkpointer loads it: each weight reaches the GPU only as it is
    # quantized into its NF4 parameter (torchao's copy_), so the 16-bit model never sits whole on the GPU
    model.load_state_dict(_torchtune_state(dirs, config, "cpu"), strict=False)
    set_trainable_params(model, get_adapter_params(model))
    training.set_activation_checkpointing(model, auto_wrap_policy={TransformerSelfAttentionLayer})
    if compiled:
        training.compile_model(model)
    return _torchtune_step(model, compiled, DEVICE, max_grad_norm)


def torchtune_fsdp2(dirs, config, max_seq: int, device: str, max_grad_norm: float, compiled: bool = True):
    """torchtune's QLoRA with FSDP2 (lora_finetune_distributed's _setup_model): the model on the meta device,
    compiled and checkpointed per layer, each layer and then the root fully_shard-ed, the LoRA weights initialized on
    the rank's device, the full checkpoint loaded into the shards (its NF4 quantized per shard)."""
    from torchtune import training
    from torchtune.modules import TransformerSelfAttentionLayer
    from torchtune.modules.peft import LoRALinear, get_adapter_params, set_trainable_params

    with training.set_default_dtype(torch.bfloat16), torch.device("meta"):
        model = _torchtune_model(config, max_seq)
    set_trainable_params(model, get_adapter_params(model))
    if compiled:
        training.compile_model(model)
    training.set_activation_checkpointing(model, auto_wrap_policy={TransformerSelfAttentionLayer})
    training.shard_model(model, [partial(training.get_shard_conditions, names_to_match=None)], cpu_offload=False,
                         reshard_after_forward=True)  # fmt: skip
    torch.manual_seed(0)
    with training.set_default_dtype(torch.bfloat16), torch.device(device):
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.to_empty(device=device)
                m.initialize_parameters()
            if hasattr(m, "rope_init"):
                m.rope_init()
    training.load_from_full_model_state_dict(model, _torchtune_state(dirs, config, "cpu"), torch.device(device))
    return _torchtune_step(model, compiled, device, max_grad_norm)


def rope_theta(config) -> float:
    """RoPE's base of a transformers config (transformers 5 keeps it in rope_parameters)."""
    return (getattr(config, "rope_parameters", None) or {}).get("rope_theta") or getattr(config, "rope_theta", 10000.0)


# -- ours --------------------------------------------------------------------------------------------------------
def ours(dirs, compile_backend: str = "inductor", device: str = DEVICE, world: int = 1, **options):
    """train_step.ours (the loop's train_step, compiled, chunked loss) on the bnb-4bit checkpoint; on `world` ranks
    loaded as the CLI loads it for FSDP2 (into host memory, each unit moved to the rank's GPU as it is sharded)."""
    import train_step
    from qlora_fsdp.model import load_model
    from qlora_fsdp.training.loop import load_storage

    model = load_model(dirs["bnb4"], dtype=torch.bfloat16, device=device,
                       storage_device=load_storage(torch.device(device), world, 1))  # fmt: skip
    return train_step.ours(None, None, compile=True, chunked=True, model=model, compile_backend=compile_backend,
                           device=device, **options)  # fmt: skip


def build(name: str, dirs: dict, config, max_seq: int, compile_backend: str = "inductor", device: str = DEVICE,
          max_grad_norm: float = MAX_GRAD_NORM):
    """`step(batch) -> loss` of system `name`; `device`: this rank's (multi-rank systems); every system clips its
    gradients to `max_grad_norm` (0: none) before AdamW. compile_backend "eager" (a CPU smoke test) also runs
    torchtune uncompiled."""
    if name.startswith("hf_peft_bnb"):
        return hf_peft_bnb(dirs, max_grad_norm, checkpointing=name != "hf_peft_bnb_noac", liger=name == "hf_peft_bnb_liger")
    if name.startswith("ours_in_hf"):
        return ours_in_hf(dirs, max_grad_norm, fused=name != "ours_in_hf",
                          compile_backend=compile_backend if name == "ours_in_hf_compiled" else None)
    if name == "unsloth":
        return unsloth(dirs, max_seq, max_grad_norm)
    compiled = compile_backend != "eager"
    if name == "torchtune_fsdp2":
        return torchtune_fsdp2(dirs, config, max_seq, device, max_grad_norm, compiled=compiled)
    if name.startswith("torchtune"):
        return torchtune_qlora(dirs, config, max_seq, max_grad_norm, compiled=compiled and name != "torchtune_eager")
    if name not in OURS:
        raise SystemExit(f"peers.py: unknown system {name!r}; known: {', '.join(IMPORTS)}")
    return ours(dirs, compile_backend=compile_backend, device=device, world=WORLD.get(name, 1),
                max_grad_norm=max_grad_norm, **OURS[name])  # fmt: skip
