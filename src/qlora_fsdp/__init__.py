"""qlora_fsdp: QLoRA finetuning with a bitsandbytes-exact NF4 base, a Triton dequantizer and FSDP2."""

__version__ = "0.1.0"

__all__ = ["load_model", "dequantize_model", "fuse_lora", "TrainConfig", "TrainLoop"]


def __getattr__(name):  # lazy: `import qlora_fsdp.nf4` stays light
    if name in ("load_model", "dequantize_model"):
        from . import model

        return getattr(model, name)
    if name == "fuse_lora":  # our fused LoRA layers on a peft model built for Trainer / SFTTrainer
        from .lora.fuse import fuse_lora

        return fuse_lora
    if name in ("TrainConfig", "TrainLoop"):  # TrainLoop(cfg) picks the pipeline loop for cfg.pp > 1 (train.py)
        from . import train

        return getattr(train, name)
    raise AttributeError(f"module 'qlora_fsdp' has no attribute {name!r}")
