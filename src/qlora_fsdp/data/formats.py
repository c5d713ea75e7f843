"""Formats of raw examples: detect_format from the fields, and the instruction prompt template.

    detect_format(dataset)                -> "instruction" | "messages" | "prompt_completion" | "text"
    format_instruction_prompt(instruction, input) -> the prompt an instruction example's response follows
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .errors import DataError

FORMATS = ("instruction", "messages", "prompt_completion", "text")
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
