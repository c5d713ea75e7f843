"""Held-out exact match for instruction data: greedy answers compared with the reference outputs."""

from __future__ import annotations

import torch

from .data import format_instruction_prompt


def instruction_prompt_ids(tokenizer, instruction: str, input: str = "") -> list[int]:
    """bos + the instruction template, tokenized as training tokenizes it (the answer follows directly)."""
    ids = tokenizer(format_instruction_prompt(instruction, input), add_special_tokens=False).input_ids
    return ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + ids


@torch.no_grad()
def greedy_answer(model, tokenizer, instruction: str, input: str = "", max_new_tokens: int = 16) -> str:
    ids = torch.tensor([instruction_prompt_ids(tokenizer, instruction, input)], device=model.device)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def exact_match(model, tokenizer, examples, max_new_tokens: int = 16) -> float:
    """Share of `examples` (dicts with instruction, input, output) whose greedy answer equals the output."""
    was_training = model.training
    model.eval()
    hits = sum(
        greedy_answer(model, tokenizer, e["instruction"], e.get("input") or "", max_new_tokens) == e["output"].strip()
        for e in examples
    )
    model.train(was_training)
    return hits / max(len(examples), 1)
