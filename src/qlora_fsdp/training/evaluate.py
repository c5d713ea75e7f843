"""Held-out exact match: greedy answers compared with the reference answers, for any dataset that has them.

An example's reference is its last trained span as the training data builds it (data/tokenize.py, completion
only): the output of an instruction, the completion of a prompt / completion pair, the last assistant turn of a
conversation. The prompt is everything before that span, token for token what training saw; the answer is the
greedy continuation of as many tokens as the reference (with its eos or end-of-turn), and a hit is an answer that
decodes to the same text. Plain text examples have no reference and are skipped. Generation runs on the base
dequantized once with the adapter merged into it (inference.dense_weights), not dequantized once per token.
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from pathlib import Path

import torch

from ..data import IGNORE_INDEX, detect_format, tokenize_example
from ..inference import dense_weights, greedy_answer
from .checkpoint import atomic_write_text

GROUP_FIELDS = ("instruction", "kind", "category", "task", "type")  # counted per value when values repeat


def prompt_and_reference(example, tokenizer, fmt: str, max_length: int, prompt_format: str = "auto"
                         ) -> tuple[list[int], list[int]] | None:  # fmt: skip
    """(prompt ids, reference ids) of an example: its last labelled span and what precedes it; None without one."""
    if fmt == "text":
        return None
    tokens = tokenize_example(example, tokenizer, fmt, max_length, completion_only=True, prompt_format=prompt_format)
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
def exact_match(model, tokenizer, examples, max_length: int, group_by: str | None = None, prompt_format: str = "auto"
                ) -> dict[str, tuple[int, int]]:  # fmt: skip
    """{group: (hits, examples)} over the `datasets.Dataset` `examples` (one group "all" without `group_by`)."""
    fmt = detect_format(examples)
    was_training = model.training
    model.eval()
    counts: Counter = Counter()
    totals: Counter = Counter()
    for example in examples:
        pair = prompt_and_reference(example, tokenizer, fmt, max_length, prompt_format)
        if pair is None:
            continue
        prompt, reference = pair
        answer = tokenizer.decode(greedy_answer(model, tokenizer, prompt, len(reference)), skip_special_tokens=True).strip()
        key = str(example[group_by]) if group_by else "all"
        totals[key] += 1
        counts[key] += answer == tokenizer.decode(reference, skip_special_tokens=True).strip()
    model.train(was_training)
    return {k: (counts[k], n) for k, n in totals.items()}


def match_share(counts: dict[str, tuple[int, int]]) -> float:
    """The share of hits in exact_match's counts."""
    return sum(h for h, _ in counts.values()) / max(sum(n for _, n in counts.values()), 1)


def report_exact_match(loop, n: int = 60) -> dict | None:
    """Exact match on the loop's first n held-out examples with a reference answer, without the adapter (= the
    untrained one) and with it; per instruction (or kind) where those repeat. Printed, written to eval.json in the
    output folder and returned; None where there is no held-out set or no reference answer."""
    cfg, held_out = loop.cfg, loop.held_out_examples
    if held_out is None or len(held_out) == 0:
        return None
    examples = held_out.select(range(min(n, len(held_out))))
    group = group_field(examples)
    run = lambda: exact_match(loop.model, loop.tokenizer, examples, cfg.max_length, group, cfg.prompt_format)  # noqa: E731
    # generation is another code path (KV cache, one token a step): run compiled layers eagerly for it
    eager = torch.compiler.set_stance("force_eager") if cfg.compile else contextlib.nullcontext()
    with eager:
        with dense_weights(loop.model), loop.model.disable_adapter():
            before = run()
        with dense_weights(loop.model, merge=True):
            after = run()
    m = sum(k for _, k in after.values())
    if m == 0:  # no example with a reference answer (plain text)
        return None
    before_share, after_share = match_share(before), match_share(after)
    print(f"held-out exact match ({m} examples): {before_share:.0%} (untrained adapter) -> {after_share:.0%} (trained)")
    if group:
        for key, (hits, k) in sorted(after.items()):
            print(f"  {key:<24} {before[key][0]:>3}/{k} -> {hits}/{k}")
    result = {"exact_match_untrained": before_share, "exact_match_trained": after_share, "examples": m,
              "group_by": group, "by_group": {k: {"untrained": before[k][0], "trained": h, "examples": c}
                                              for k, (h, c) in after.items()}}  # fmt: skip
    atomic_write_text(Path(cfg.output_dir) / "eval.json", json.dumps(result) + "\n")
    return result
