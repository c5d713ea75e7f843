"""Held-out exact match for instruction data: greedy answers compared with the reference outputs."""

from __future__ import annotations

import torch

from ..data import format_instruction_prompt


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


def exact_match_by_instruction(model, tokenizer, examples, max_new_tokens: int = 16) -> dict[str, tuple[int, int]]:
    """{instruction: (hits, examples)} over `examples` (dicts with instruction, input, output): a hit is a greedy
    answer equal to the output. For data with a few distinct instructions, such as the embedded task."""
    was_training = model.training
    model.eval()
    counts: dict[str, tuple[int, int]] = {}
    for e in examples:
        answer = greedy_answer(model, tokenizer, e["instruction"], e.get("input") or "", max_new_tokens)
        hits, n = counts.get(e["instruction"], (0, 0))
        counts[e["instruction"]] = (hits + (answer == e["output"].strip()), n + 1)
    model.train(was_training)
    return counts


def match_share(counts: dict[str, tuple[int, int]]) -> float:
    """The share of hits in exact_match_by_instruction's counts."""
    return sum(h for h, _ in counts.values()) / max(sum(n for _, n in counts.values()), 1)

