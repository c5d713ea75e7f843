"""The data layer: load examples, detect their format, tokenize with completion-only labels, batch for training.

    load_examples(spec, split)            -> datasets.Dataset of raw rows (local file or folder, or a Hub name)
    detect_format(dataset)                -> "instruction" | "messages" | "prompt_completion" | "text"
    tokenize_dataset(ds, tok, max_length) -> datasets.Dataset with columns input_ids, labels (lists of ints)
    Batcher(tokenized, packing=...)       -> batches: dicts of tensors, deterministic per seed, resumable

Data flow, one module per step (each imports only the ones before it):

    errors     DataError: bad input a user can fix, one line naming the fix
    sources    source -> raw rows: the embedded default (embedded_dir/_tokenizer/_dataset), load_examples
    formats    raw rows -> format: detect_format, the instruction prompt template
    tokenize   format -> input_ids + labels: tokenize_example, tokenize_dataset (completion-only masking)
    batching   tokenized rows -> batches: Batcher (padding or packing, group by length, resumable), count_label_tokens

Labels follow the Hugging Face causal-LM convention (-100 = no loss, labels[0] always -100): tokenize.py says how.
"""

from __future__ import annotations

from .batching import Batcher, count_label_tokens
from .errors import DataError
from .formats import (
    ACCEPTED_FIELDS,
    FORMATS,
    PROMPT_FORMATS,
    PROMPT_NO_INPUT,
    PROMPT_WITH_INPUT,
    detect_format,
    format_instruction_prompt,
    resolve_prompt_format,
    single_turn_text,
)
from .sources import BUILDERS, embedded_dataset, embedded_dir, embedded_tokenizer, load_examples
from .tokenize import IGNORE_INDEX, logger, single_turn_prompt_ids, tokenize_dataset, tokenize_example

__all__ = [
    "ACCEPTED_FIELDS",
    "BUILDERS",
    "FORMATS",
    "PROMPT_FORMATS",
    "IGNORE_INDEX",
    "PROMPT_NO_INPUT",
    "PROMPT_WITH_INPUT",
    "Batcher",
    "DataError",
    "count_label_tokens",
    "detect_format",
    "embedded_dataset",
    "embedded_dir",
    "embedded_tokenizer",
    "format_instruction_prompt",
    "load_examples",
    "resolve_prompt_format",
    "single_turn_prompt_ids",
    "single_turn_text",
    "tokenize_dataset",
    "tokenize_example",
]
