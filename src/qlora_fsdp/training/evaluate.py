"""Held-out exact match: greedy answers compared with the reference answers, for any dataset that has them.

An example's reference is its last trained span as the training data builds it (data/tokenize.py, completion
only): the output of an instruction, the completion of a prompt / completion pair, the last assistant turn of a
conversation. The prompt is everything before that span, token for token what training saw; the answer is the
greedy continuation of as many tokens as the reference (with its eos or end-of-turn), and a hit is an answer that
decodes to the same text. Plain text examples have no reference and are skipped.
"""

from __future__ import annotations

from collections import Counter

import torch

from ..data import IGNORE_INDEX, detect_format, format_instruction_prompt, tokenize_example

GROUP_FIELDS = ("instruction", "kind", "category", "task", "type")  # counted per value when values repeat


def instruction_prompt_ids(tokenizer, instruction: str, input: str = "") -> list[int]:
    """bos + the instruction template, tokenized as training tokenizes it (the answer follows directly)."""
    ids = tokenizer(format_instruction_prompt(instruction, input), add_special_tokens=False).input_ids
    return ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + ids


def prompt_and_reference(example, tokenizer, fmt: str, max_length: int) -> tuple[list[int], list[int]] | None:
    """(prompt ids, reference ids) of an example: its last labelled span and what precedes it; None without one."""
    if fmt == "text":
        return None
    tokens = tokenize_example(example, tokenizer, fmt, max_length, completion_only=True)
    ids, labels = tokens["input_ids"], tokens["labels"]
    end = max((i for i, x in enumerate(labels) if x != IGNORE_INDEX), default=-1) + 1
    if end == 0:
        return None
    start = end
    while start > 1 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return ids[:start], ids[start:end]


def group_field(examples) -> str | None:
    """The first of GROUP_FIELDS whose values repeat among `examples` (fewer distinct values than examples)."""
    for name in GROUP_FIELDS:
        if name in examples.column_names:
            values = [str(v) for v in examples[name]]
            if len(set(values)) < len(values):
                return name
    return None


@torch.no_grad()
def exact_match(model, tokenizer, examples, max_length: int, group_by: str | None = None) -> dict[str, tuple[int, int]]:
    """{group: (hits, examples)} over the `datasets.Dataset` `examples` (one group "all" without `group_by`)."""
    fmt = detect_format(examples)
    was_training = model.training
    model.eval()
    counts: Counter = Counter()
    totals: Counter = Counter()
    for example in examples:
        pair = prompt_and_reference(example, tokenizer, fmt, max_length)
        if pair is None:
            continue
        prompt, reference = pair
        ids = torch.tensor([prompt], device=model.device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(reference),
                             do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
        answer = tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True).strip()
        key = str(example[group_by]) if group_by else "all"
        totals[key] += 1
        counts[key] += answer == tokenizer.decode(reference, skip_special_tokens=True).strip()
    model.train(was_training)
    return {k: (counts[k], n) for k, n in totals.items()}


def match_share(counts: dict[str, tuple[int, int]]) -> float:
    """The share of hits in exact_match's counts."""
    return sum(h for h, _ in counts.values()) / max(sum(n for _, n in counts.values()), 1)
