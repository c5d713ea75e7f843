"""Formats of raw examples: detect_format from the fields; prompt formats and the instruction prompt template.

    detect_format(dataset)                -> "instruction" | "messages" | "prompt_completion" | "text"
    resolve_prompt_format(tokenizer, "auto" | "chat" | "alpaca" | "raw") -> "chat" | "alpaca" | "raw"
    format_instruction_prompt(instruction, input) -> the Alpaca prompt an instruction example's response follows

A prompt format says how a single-turn example (instruction/input/output, or string prompt/completion) becomes
tokens; conversations (messages) always go through the chat template and plain text is used as written:
    chat    one user turn (instruction, a blank line, input; or the prompt), one assistant turn (output or
            completion), rendered by the tokenizer's chat template: what an instruct model was trained on
    alpaca  the Alpaca template below around instruction and input (a prompt stands as the instruction)
    raw     the text as written: the instruction (a newline and the input after it, if any), or the prompt;
            the answer follows it directly
    auto    the format the tokenizer names ("prompt_format" in its tokenizer_config.json: the embedded model's
            says alpaca, the template it learned its task in), else chat where the tokenizer has a chat template,
            else alpaca; a prompt/completion pair takes chat or, for any other, its text as written
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .errors import DataError

FORMATS = ("instruction", "messages", "prompt_completion", "text")
PROMPT_FORMATS = ("auto", "chat", "alpaca", "raw")
ACCEPTED_FIELDS = "instruction+output (+input), messages, prompt+completion, or text"

# Alpaca-like prompt, short. The response follows "### Response:\n" directly, then eos.
PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"


# ----------------------------------------------------------------------------------------------------------- format


def _columns(dataset) -> list[str]:
    if hasattr(dataset, "column_names"):
        return list(dataset.column_names)
    if isinstance(dataset, Mapping):
        return list(dataset)
    if isinstance(dataset, Sequence) and dataset and isinstance(dataset[0], Mapping):
        return list(dataset[0])
    raise DataError(f"cannot read fields of a {type(dataset).__name__}: pass a datasets.Dataset or a dict example")


def detect_format(dataset) -> str:
    """The format of a Dataset (or one example dict / list of them), from its fields, first match wins:

    "messages"          messages: list of {role, content}
    "instruction"       instruction, output (input optional)
    "prompt_completion" prompt, completion (strings, or lists of messages for conversational data)
    "text"              text
    """
    cols = set(_columns(dataset))
    if "messages" in cols:
        return "messages"
    if {"instruction", "output"} <= cols:
        return "instruction"
    if {"prompt", "completion"} <= cols:
        return "prompt_completion"
    if "text" in cols:
        return "text"
    raise DataError(
        f"unsupported dataset fields {sorted(cols)}: expected {ACCEPTED_FIELDS}; rename the columns to match"
    )


# ------------------------------------------------------------------------------------------------ prompt and fields


def resolve_prompt_format(tokenizer, prompt_format: str = "auto", fmt: str = "instruction") -> str:
    """The prompt format ("chat", "alpaca" or "raw") that `prompt_format` means for this tokenizer and data format."""
    if prompt_format not in PROMPT_FORMATS:
        raise DataError(f"unknown prompt format {prompt_format!r}: use one of {', '.join(PROMPT_FORMATS)}")
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if prompt_format == "chat" and not has_template:
        raise DataError(f"the tokenizer of {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template: use "
                        "--prompt-format alpaca or raw")  # fmt: skip
    if prompt_format != "auto":
        return prompt_format
    named = (getattr(tokenizer, "init_kwargs", None) or {}).get("prompt_format")
    if named not in ("chat", "alpaca", "raw") or (named == "chat" and not has_template):
        named = "chat" if has_template else "alpaca"
    return "raw" if fmt == "prompt_completion" and named != "chat" else named


def single_turn_text(instruction: str, input: str, prompt_format: str) -> str:
    """The prompt text of an instruction for the "alpaca" and "raw" prompt formats (the user turn for "chat")."""
    if prompt_format == "alpaca":
        return format_instruction_prompt(instruction, input)
    return instruction + (("\n" if prompt_format == "raw" else "\n\n") + input if input else "")


def format_instruction_prompt(instruction: str, input: str = "") -> str:
    """The prompt of an instruction example: the response (output + eos) follows it directly."""
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def _text(example: Mapping, key: str, required: bool = True) -> str:
    value = example.get(key)
    if value is None:
        if required:
            raise DataError(f"example has no {key!r} value (fields: {sorted(example)}): fill or drop such rows")
        return ""
    return value if isinstance(value, str) else str(value)  # csv may parse "68" as a number
