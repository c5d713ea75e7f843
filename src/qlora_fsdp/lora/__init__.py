"""LoRA layers: peft's own Linear with the scaling on the rank side (linear.py), and Llama-style MLPs routed
through the fused LoRA SwiGLU kernel (fused_mlp.py). training/setup.py `add_lora` puts them on a model; fuse.py
`fuse_lora` on a peft model built elsewhere (the Trainer recipe)."""
