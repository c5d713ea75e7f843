"""Tokenization with completion-only labels: chat templates, assistant spans, tokenize_example, tokenize_dataset.

    tokenize_dataset(ds, tok, max_length) -> datasets.Dataset with columns input_ids, labels (lists of ints)

Label convention (Hugging Face causal LMs): `labels` is aligned with `input_ids`; the model shifts them, so
labels[i] is the target predicted from position i-1, and -100 (IGNORE_INDEX) means "no loss here". No position
predicts the first token of a sequence, so every tokenized example has labels[0] == -100, and the Batcher keeps
the label at each packed example's start at -100: a packed example is never predicted from the one before it.
The number of labels != -100 is then exactly the number of predicted tokens (`num_label_tokens`), the divisor of a
token-weighted loss.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import DataError
from .formats import FORMATS, _text, detect_format, resolve_prompt_format, single_turn_text

logger = logging.getLogger(__package__)  # "qlora_fsdp.data", the logger's name before the split into modules

IGNORE_INDEX = -100


# ------------------------------------------------------------------------------------------------------- tokenizing


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def _bos(tokenizer) -> list[int]:
    return [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]


def _eos(tokenizer) -> list[int]:
    return [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]


def _chat_ids(tokenizer, messages: list, add_generation_prompt: bool) -> list[int]:
    """Token ids of `messages` through the chat template, bos prepended when the template does not add it."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    ids = _encode(tokenizer, text)
    bos = _bos(tokenizer)
    return ids if not bos or ids[:1] == bos else bos + ids


def _assistant_span(tokenizer, messages: list, i: int, full: list[int]) -> tuple[int, int] | None:
    """[start, end) of assistant turn i in `full`, or None where the template breaks the prefix property.

    start = length of the conversation before turn i with the generation prompt; end = length of the conversation
    through turn i. Both token sequences must be prefixes of `full`, so the span holds exactly turn i's reply and
    whatever the template closes it with (eos, end-of-turn marker).
    """
    if i == 0:
        return None  # nothing precedes it to render a generation prompt from
    try:
        before = _chat_ids(tokenizer, messages[:i], add_generation_prompt=True)
        through = _chat_ids(tokenizer, messages[: i + 1], add_generation_prompt=False)
    except Exception:  # a template may refuse a partial conversation
        return None
    if len(before) < len(through) <= len(full) and full[: len(through)] == through and through[: len(before)] == before:
        return len(before), len(through)
    return None


def _generation_mask(tokenizer, messages: list, full: list[int]) -> list[int] | None:
    """The template's own {% generation %} assistant mask aligned with `full`, or None if it has none or differs."""
    template = tokenizer.get_chat_template()
    if not re.search(r"\{\%-?\s*generation\s*-?\%\}", template):
        return None
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    if len(ids) + 1 == len(full) and [full[0]] + ids == full:  # we prepended bos
        ids, mask = full, [0] + mask
    return mask if ids == full else None


_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


def _check_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise DataError(
            f"'messages' must be a non-empty list of {{role, content}} dicts, got {type(messages).__name__}: "
            "fix the data"
        )
    out = []
    for m in messages:
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise DataError(f"each message needs 'role' and 'content', got {m!r}: fix the data")
        out.append({k: v for k, v in m.items() if v is not None})
    return out


def _tokenize_messages(tokenizer, messages: list, completion_only: bool) -> tuple[list[int], list[int]]:
    if tokenizer.chat_template is None:
        raise DataError(
            "the tokenizer has no chat template: set tokenizer.chat_template, or use the instruction or "
            "prompt_completion format"
        )
    full = _chat_ids(tokenizer, messages, add_generation_prompt=False)
    if not completion_only:
        return full, list(full)
    labels = [IGNORE_INDEX] * len(full)
    lost = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        span = _assistant_span(tokenizer, messages, i, full)
        if span is None:
            lost += 1
        else:
            labels[span[0] : span[1]] = full[span[0] : span[1]]
    if lost:
        mask = _generation_mask(tokenizer, messages, full)
        if mask is not None:
            labels = [t if k else IGNORE_INDEX for t, k in zip(full, mask)]
        else:
            _warn_once(
                f"lost:{tokenizer.name_or_path}:{hash(tokenizer.get_chat_template())}",
                f"the chat template of {tokenizer.name_or_path!r} renders earlier turns differently from a "
                "conversation that ends there, so some assistant replies cannot be located and are not trained on: "
                "use a template with {% generation %} markers, or the prompt_completion format",
            )
    return full, labels


def _conversational(example: Mapping, fmt: str) -> bool:
    prompt = example.get("prompt")
    return fmt == "prompt_completion" and isinstance(prompt, Sequence) and not isinstance(prompt, str)


def _prompt_then_reply(tokenizer, prompt: list, reply: list, completion_only: bool) -> tuple[list[int], list[int]]:
    """The chat template over prompt + reply messages; with completion_only, labels on what follows the prompt
    rendered with its generation prompt (the reply and the template's end-of-turn tokens)."""
    ids, labels = _tokenize_messages(tokenizer, prompt + reply, completion_only=False)
    if completion_only:
        before = _chat_ids(tokenizer, prompt, add_generation_prompt=True)
        if ids[: len(before)] != before:
            raise DataError("the chat template renders the prompt differently inside the full conversation: "
                            "use --prompt-format alpaca or raw, or string prompt/completion fields")  # fmt: skip
        labels = [IGNORE_INDEX] * len(before) + ids[len(before) :]
    return ids, labels


def single_turn_prompt_ids(tokenizer, text: str, prompt_format: str) -> list[int]:
    """Token ids of a single-turn prompt whose answer follows directly: for "chat" the user turn `text` with the
    template's generation prompt; for "alpaca" and "raw" bos + `text` (already templated: formats.single_turn_text)."""
    if prompt_format == "chat":
        return _chat_ids(tokenizer, [{"role": "user", "content": text}], add_generation_prompt=True)
    return _bos(tokenizer) + _encode(tokenizer, text)


def _single_turn(tokenizer, text: str, answer: str, prompt_format: str, completion_only: bool):
    if prompt_format == "chat":
        user, reply = [{"role": "user", "content": text}], [{"role": "assistant", "content": answer}]
        return _prompt_then_reply(tokenizer, user, reply, completion_only)
    prompt = single_turn_prompt_ids(tokenizer, text, prompt_format)
    response = _encode(tokenizer, answer) + _eos(tokenizer)
    return prompt + response, ([IGNORE_INDEX] * len(prompt) + response if completion_only else prompt + response)


def tokenize_example(
    example: Mapping, tokenizer, fmt: str, max_length: int, completion_only: bool = True, prompt_format: str = "auto"
) -> dict:
    """Token ids and labels of one example, truncated to `max_length` tokens.

    instruction        the prompt format (formats.py) around instruction and input, then output and eos (or the
                       template's end of turn)
    prompt_completion  strings: the same with the prompt; lists of messages: the chat template over prompt +
                       completion messages
    messages           the tokenizer's chat template (bos prepended if the template does not add it)
    text               bos + text + eos

    With completion_only the prompt (instruction, prompt, every non-assistant turn) gets label -100 and only the
    response (output + eos; completion + eos; each assistant reply with the template's end-of-turn tokens) is
    trained on; text examples train on every token. labels[0] is always -100 (nothing predicts it). Prompt and
    response are tokenized apart (through a chat template: the prompt must render as a prefix of the whole), so
    the boundary is exact whatever the tokenizer merges.
    Returns {"input_ids": list[int], "labels": list[int]} of equal length <= max_length.
    """
    if max_length < 2:
        raise DataError(f"max_length={max_length} leaves nothing to predict: use max_length >= 2")
    if fmt in ("instruction", "prompt_completion") and not _conversational(example, fmt):
        pf = resolve_prompt_format(tokenizer, prompt_format, fmt)
        if fmt == "instruction":
            text = single_turn_text(_text(example, "instruction"), _text(example, "input", required=False), pf)
            answer = _text(example, "output")
        else:
            prompt = _text(example, "prompt")
            text, answer = (prompt if pf == "raw" else single_turn_text(prompt, "", pf)), _text(example, "completion")
        ids, labels = _single_turn(tokenizer, text, answer, pf, completion_only)
    elif fmt == "prompt_completion":  # conversational: prompt messages, completion message(s)
        prompt, completion = _check_messages(example["prompt"]), example.get("completion")
        if isinstance(completion, str):
            completion = [{"role": "assistant", "content": completion}]
        ids, labels = _prompt_then_reply(tokenizer, prompt, _check_messages(completion), completion_only)
    elif fmt == "messages":
        ids, labels = _tokenize_messages(tokenizer, _check_messages(example.get("messages")), completion_only)
    elif fmt == "text":
        ids = _bos(tokenizer) + _encode(tokenizer, _text(example, "text")) + _eos(tokenizer)
        labels = list(ids)
    else:
        raise DataError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    ids, labels = ids[:max_length], labels[:max_length]
    if labels:
        labels[0] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels}


def tokenize_dataset(
    dataset, tokenizer, max_length: int, completion_only: bool = True, *, fmt: str | None = None,
    num_proc: int | None = None, prompt_format: str = "auto",
):  # fmt: skip
    """Tokenize every example (see tokenize_example); returns a Dataset with columns input_ids, labels.

    Examples with no trainable label within max_length (a prompt that fills it, an empty reply) are dropped; their
    number is logged and equals len(dataset) - len(result). fmt defaults to detect_format(dataset). Raises DataError
    if the dataset is empty or no example is left.
    """
    fmt = fmt or detect_format(dataset)
    if len(dataset) == 0:
        raise DataError("the dataset is empty: check the path and the split")

    def tokenize_rows(rows: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {"input_ids": [], "labels": []}
        for k in range(len(next(iter(rows.values())))):
            t = tokenize_example({c: v[k] for c, v in rows.items()}, tokenizer, fmt, max_length, completion_only,
                                 prompt_format)  # fmt: skip
            if any(label != IGNORE_INDEX for label in t["labels"]):
                out["input_ids"].append(t["input_ids"])
                out["labels"].append(t["labels"])
        return out

    tokenized = dataset.map(
        tokenize_rows, batched=True, remove_columns=dataset.column_names, num_proc=num_proc, desc="tokenizing"
    )
    dropped = len(dataset) - len(tokenized)
    if len(tokenized) == 0:
        raise DataError(
            f"no example has a trainable token within max_length={max_length}: raise --max-length or check the fields"
        )
    if dropped:
        logger.warning(
            "dropped %d of %d examples with no trainable token within max_length=%d", dropped, len(dataset), max_length
        )
    return tokenized
