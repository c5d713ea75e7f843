"""qlora_fsdp: QLoRA finetuning with a bitsandbytes-exact NF4 base, a Triton dequantizer and FSDP2."""

__version__ = "0.1.0"
