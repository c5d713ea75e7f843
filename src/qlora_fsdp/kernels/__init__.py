"""Fused Triton ops, each beside its PyTorch reference (Liger-Kernel's ops/ layout): kernel -> `triton_op` ->
autograd Function; CPU tensors run the reference inside the same Function.

    rank_product.py         the rank-r tile product the LoRA kernels share; which ranks a GPU's shared memory holds
    lora_add.py             base + h @ w^T in one pass: a LoRA linear's output without the (T, out) product
    lora_swiglu.py          silu(gate) * up with gate's and up's LoRA terms added per tile (and down's lora_A)
    cross_entropy_rows.py   per-row cross-entropy that overwrites the logits with their gradient (chunked loss)

The NF4 dequantizer is nf4/triton_dequant.py, with the 4-bit format it reads.
"""
