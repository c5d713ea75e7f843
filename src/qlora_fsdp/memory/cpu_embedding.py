"""The frozen input embedding in host memory: 1.05 GB less on the GPU for Llama 3's 128,256 x 4,096 table in bf16.

    embedding_on_cpu(model)    # one GPU; before torch.compile (the embedding is outside the compiled layers)

The lookup runs on the CPU: the token ids (B, T) go to the host, the rows (B, T, H) come back to the model's device.
The embedding is frozen and its output is a leaf of the graph on the GPU, so backward never crosses to the host.
The copies are small (16 MB for 2,048 tokens of an 8B model) next to a training step. Models whose output head
shares the embedding's weight (tied embeddings) are refused: the head must stay on the GPU.
"""

from __future__ import annotations

from torch import nn

from ..model import transformers_model


def embedding_on_cpu(model: nn.Module) -> nn.Embedding:
    """Move `model`'s input embedding (transformers causal LM, peft-wrapped or not) to host memory, with hooks that
    run the lookup there and return its output on the device the embedding was on. Returns the embedding."""
    base = transformers_model(model)
    emb, head = base.get_input_embeddings(), base.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is emb.weight:
        raise ValueError("the input embedding shares its weight with the output head (tied embeddings): it must stay "
                         "on the GPU")  # fmt: skip
    if emb.weight.requires_grad:
        raise ValueError("the input embedding is trainable: only a frozen embedding runs on the CPU")
    device = emb.weight.device
    emb.to("cpu")

    def ids_to_host(module, args):
        return (args[0].to("cpu"), *args[1:])

    def rows_to_device(module, args, out):
        return out.detach().to(device).requires_grad_(out.requires_grad)  # a leaf on the device: no backward to the host

    emb.register_forward_pre_hook(ids_to_host)
    emb.register_forward_hook(rows_to_device, prepend=True)  # before peft's hook that makes the output require grad
    return emb
