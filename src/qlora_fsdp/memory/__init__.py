"""Options that trade memory for time, each applied to a model by training/setup.py:

    activation_checkpointing.py   decoder layers recomputed in backward (--activation-checkpointing), the last N
                                  kept (--ac-keep-layers), inputs in pinned host memory (--offload-activations)
    chunked_loss.py               lm_head + cross-entropy a chunk of tokens at a time, no (B, T, V) logits
    chunked_mlp.py                MLPs a chunk of tokens at a time, each chunk recomputed (--mlp-chunk-tokens)
    cpu_embedding.py              the frozen input embedding in host memory (--embedding-on-cpu)
    input_grad.py                 the embedding output made to require grad (what checkpointed layers need)
    recompute_skip.py             a checkpointed layer's recomputation without the matmul whose output no backward reads
"""
