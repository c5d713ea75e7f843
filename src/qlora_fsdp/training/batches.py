"""From a TrainConfig to the data a run needs: the tokenizer and the train/eval batchers."""

from __future__ import annotations

from ..data import Batcher, embedded_dataset, load_examples, tokenize_dataset
from ..model import EMBEDDED, resolve_model_dir


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_dir(name_or_path))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _tokenized(spec: str, split: str, tokenizer, cfg, embedded_split: str):
    dataset = embedded_dataset(embedded_split) if spec == EMBEDDED else load_examples(spec, split)
    return tokenize_dataset(dataset, tokenizer, cfg.max_length, completion_only=cfg.completion_only)


def build_batches(cfg, tokenizer) -> tuple[Batcher, Batcher | None]:
    """Train batches (shuffled per epoch, resumable) and held-out batches (fixed order), or None for no eval set."""
    common = dict(packing=cfg.packing, max_tokens=cfg.max_tokens, batch_size=cfg.batch_size,
                  pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    train = Batcher(_tokenized(cfg.dataset, cfg.split, tokenizer, cfg, "train"), seed=cfg.seed,
                    group_by_length=cfg.group_by_length and not cfg.packing, **common)  # fmt: skip
    eval_spec = cfg.eval_dataset or (EMBEDDED if cfg.dataset == EMBEDDED else None)
    if eval_spec is None:
        return train, None
    held_out = Batcher(_tokenized(eval_spec, cfg.eval_split, tokenizer, cfg, "eval"), shuffle=False, **common)
    return train, held_out


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
