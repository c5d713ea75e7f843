"""From a TrainConfig to the data a run needs: the raw examples, the tokenizer and the train/eval batchers.

Where the held-out examples come from (data_sources):
    --eval-fraction F   a share F of the training examples (datasets' seeded train_test_split); the rest train
    --eval-dataset D    split --eval-split of D (default: its train split)
    --eval-split S      split S of --dataset; where S takes one end of the training split (train[-10%:], train[:50])
                        and --split is that split whole, training takes the other end (train[:-10%], train[50:])
    none of these       the embedded held-out set with the embedded dataset; else no held-out set
"""

from __future__ import annotations

import re
from typing import NamedTuple

from ..data import Batcher, detect_format, embedded_dataset, load_examples, resolve_prompt_format, tokenize_dataset
from ..model import EMBEDDED, resolve_model_dir
from .config import TrainError


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_dir(name_or_path))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def other_end(eval_split: str, train_split: str) -> str | None:
    """The training split that leaves out `eval_split` when that takes one end of `train_split` (unsliced):
    train[-10%:] -> train[:-10%], train[:50] -> train[50:]; None when it does not."""
    m = re.fullmatch(r"([\w.-]+)\[(-?\d+%?)?:(-?\d+%?)?\]", eval_split.replace(" ", ""))
    if m is None or m.group(1) != train_split.strip() or bool(m.group(2)) == bool(m.group(3)):
        return None
    name, start, stop = m.groups()
    return f"{name}[:{start}]" if start else f"{name}[{stop}:]"


def _load(spec: str, split: str):
    return embedded_dataset(split) if spec == EMBEDDED else load_examples(spec, split)


def data_sources(cfg):
    """(training examples, held-out examples or None), untokenized `datasets.Dataset`s (module docstring)."""
    train_split = cfg.split
    if cfg.eval_fraction:
        both = _load(cfg.dataset, train_split).train_test_split(test_size=cfg.eval_fraction, seed=cfg.seed)
        return both["train"], both["test"]
    if cfg.eval_dataset:
        default = "eval" if cfg.eval_dataset == EMBEDDED else "train"  # the embedded task's held-out split
        return _load(cfg.dataset, train_split), _load(cfg.eval_dataset, cfg.eval_split or default)
    if cfg.eval_split:
        rest = other_end(cfg.eval_split, train_split)
        if rest is None and cfg.eval_split.split("[")[0].strip() == train_split.split("[")[0].strip():
            raise TrainError(f"--eval-split {cfg.eval_split} overlaps --split {cfg.split}: take one end of it "
                             "(train[-10%:]) with --split train, or pass --eval-fraction")  # fmt: skip
        return _load(cfg.dataset, rest or train_split), _load(cfg.dataset, cfg.eval_split)
    if cfg.dataset == EMBEDDED:
        return _load(EMBEDDED, "train"), _load(EMBEDDED, "eval")
    return _load(cfg.dataset, train_split), None


class RunData(NamedTuple):
    train: Batcher  # shuffled per epoch, resumable
    eval: Batcher | None  # held-out batches in a fixed order; None without a held-out set
    held_out_examples: object | None  # the untokenized held-out `datasets.Dataset` (for exact match), or None
    prompt_note: str | None  # one line: the prompt format single-turn examples get (describe_prompt_format)


def build_batches(cfg, tokenizer) -> RunData:
    """The batches of a run and what a report needs of its data (RunData)."""
    train, held_out = data_sources(cfg)
    tokenized = lambda d: tokenize_dataset(d, tokenizer, cfg.max_length, completion_only=cfg.completion_only,  # noqa: E731
                                           prompt_format=cfg.prompt_format)  # fmt: skip
    common = dict(packing=cfg.packing, max_tokens=cfg.max_tokens, batch_size=cfg.batch_size,
                  pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    train_batches = Batcher(tokenized(train), seed=cfg.seed, group_by_length=cfg.group_by_length and not cfg.packing,
                            **common)  # fmt: skip
    eval_batches = None if held_out is None else Batcher(tokenized(held_out), shuffle=False, **common)
    return RunData(train_batches, eval_batches, held_out, describe_prompt_format(cfg, tokenizer, train))


def describe_prompt_format(cfg, tokenizer, examples) -> str | None:
    """One line saying which prompt format single-turn examples get (None for conversations and plain text)."""
    fmt = detect_format(examples)
    if fmt not in ("instruction", "prompt_completion") or isinstance(examples[0].get("prompt"), list):
        return None
    chosen = resolve_prompt_format(tokenizer, cfg.prompt_format, fmt)
    why = {"chat": "the tokenizer's chat template", "alpaca": "the Alpaca template", "raw": "the text as written"}
    how = "auto: " if cfg.prompt_format == "auto" else ""
    return f"prompt format: {chosen} ({how}{why[chosen]}; --prompt-format chat|alpaca|raw to choose)"


class FixedBatches:
    """Ready-made batches (dicts of `input_ids`, `labels`, optional `attention_mask`) in a fixed order, one epoch
    per iteration, resumable: the smallest batch source `TrainLoop(cfg, train_batches=...)` accepts."""

    def __init__(self, batches: list[dict]):
        self.batches, self.pos = batches, 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        while self.pos < len(self.batches):
            self.pos += 1
            yield self.batches[self.pos - 1]
        self.pos = 0

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.pos = state["pos"]
