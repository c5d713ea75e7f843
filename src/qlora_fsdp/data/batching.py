"""Batches for training: count_label_tokens and the Batcher (padding, packing, group by length, resumable state).

    Batcher(tokenized, packing=...)       -> batches: dicts of tensors, deterministic per seed, resumable
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from .errors import DataError
from .formats import _columns
from .tokenize import IGNORE_INDEX


# -------------------------------------------------------------------------------------------------------- batching


def count_label_tokens(labels: torch.Tensor) -> int:
    """Number of predicted tokens in a labels tensor (labels != -100): the token-weighted loss divisor."""
    return int((labels != IGNORE_INDEX).sum())


class Batcher:
    """Batches of a tokenized dataset (columns input_ids, labels) for a training loop; deterministic and resumable.

    packing=True: padding-free packing. Examples, in the epoch's shuffled order, fill rows of at most max_tokens
    tokens (greedy: an example that does not fit starts the next row). One row per batch:

        input_ids, labels, position_ids   long (1, T), T <= max_tokens; position_ids restart at 0 per example

    Call the model with attention_mask=None and use_cache=False: transformers then derives a block-diagonal causal
    mask from the restarting position_ids (with the default use_cache=True it builds a cache and silently skips
    that, letting examples attend to each other). The label at each example start is -100.

    packing=False: padded batches of batch_size examples (right padding):

        input_ids (B, T) padded with pad_token_id, attention_mask (B, T) 1/0, labels (B, T) -100 at padding

    group_by_length: within shuffled chunks of batch_size * mega_batches examples, sort by length, so that a batch
    holds examples of similar length; then shuffle the order of the batches (else every chunk would run from its
    longest examples to its shortest, a sawtooth in the loss); drop_last drops a final partial batch.

    Every batch also has "num_label_tokens": int, the number of labels != -100 (pop it before `model(**batch)`).

    Epoch e shuffles with numpy's generator seeded by (seed, e). Iterating yields the remaining batches of the
    current epoch and then moves on to the next epoch; `forever()` runs through epochs. The state (epoch,
    position = batches of that epoch already yielded) advances as each batch is yielded, so state_dict() taken
    after k batches and loaded into a new Batcher over the same data and settings yields exactly the batches after
    the k-th. len() is the number of batches of the current epoch (with packing it varies a little per epoch;
    num_batches(epoch) gives any epoch's).
    """

    def __init__(
        self,
        dataset,
        *,
        packing: bool = True,
        max_tokens: int = 2048,
        batch_size: int = 8,
        pad_token_id: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        group_by_length: bool = False,
        mega_batches: int = 50,
        drop_last: bool = False,
    ):
        cols = _columns(dataset)
        if "input_ids" not in cols or "labels" not in cols:
            raise DataError(
                f"Batcher needs tokenized data with input_ids and labels, got fields {sorted(cols)}: "
                "run tokenize_dataset first"
            )
        if hasattr(dataset, "column_names"):
            self._ids, self._labels = list(dataset["input_ids"]), list(dataset["labels"])
        else:
            self._ids, self._labels = [list(r["input_ids"]) for r in dataset], [list(r["labels"]) for r in dataset]
        self._lengths = np.array([len(x) for x in self._ids], dtype=np.int64)
        n = len(self._ids)
        if n == 0:
            raise DataError("the tokenized dataset is empty: check the data and max_length")
        if any(len(a) != len(b) for a, b in zip(self._ids, self._labels)):
            raise DataError("input_ids and labels differ in length in some example: tokenize with tokenize_dataset")
        if self._lengths.min() < 1:
            raise DataError("the tokenized dataset has an empty example: tokenize with tokenize_dataset")
        if packing and max_tokens < int(self._lengths.max()):
            raise DataError(
                f"an example has {int(self._lengths.max())} tokens, more than max_tokens={max_tokens}: "
                "raise max_tokens or tokenize with max_length <= max_tokens"
            )
        if not packing and (batch_size < 1 or mega_batches < 1):
            raise DataError(f"batch_size={batch_size}, mega_batches={mega_batches}: both must be >= 1")
        if not packing and drop_last and n < batch_size:
            raise DataError(f"{n} examples make no full batch of {batch_size}: lower batch_size or set drop_last=False")
        self.packing, self.max_tokens, self.batch_size = packing, max_tokens, batch_size
        self.pad_token_id, self.seed, self.shuffle = pad_token_id, seed, shuffle
        self.group_by_length, self.mega_batches, self.drop_last = group_by_length, mega_batches, drop_last
        self.epoch, self.position = 0, 0
        self._plan_cache: tuple[int, list[list[int]]] | None = None
        size = max_tokens if packing else batch_size
        settings = (packing, size, seed, shuffle, group_by_length, mega_batches, drop_last)
        digest = hashlib.sha256(json.dumps(settings).encode() + self._lengths.tobytes())
        self._fingerprint = digest.hexdigest()[:16]

    # --- the plan of an epoch: lists of example indices, one per batch
    def _order(self, epoch: int) -> np.ndarray:
        n = len(self._lengths)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def _plan(self, epoch: int) -> list[list[int]]:
        if self._plan_cache is not None and self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        order = self._order(epoch)
        batches: list[list[int]] = []
        if self.packing:
            row: list[int] = []
            used = 0
            for i in order.tolist():
                length = int(self._lengths[i])
                if row and used + length > self.max_tokens:
                    batches.append(row)
                    row, used = [], 0
                row.append(i)
                used += length
            if row:
                batches.append(row)
        else:
            if self.group_by_length:
                chunk = self.batch_size * self.mega_batches
                parts = [order[s : s + chunk] for s in range(0, len(order), chunk)]
                order = np.concatenate([p[np.argsort(-self._lengths[p], kind="stable")] for p in parts])
            order = order.tolist()
            batches = [order[s : s + self.batch_size] for s in range(0, len(order), self.batch_size)]
            if self.drop_last and len(batches[-1]) < self.batch_size:
                batches.pop()
            if self.group_by_length and self.shuffle:  # batches of similar lengths, but not longest-first in a run
                perm = np.random.default_rng([self.seed, epoch, 1]).permutation(len(batches))
                batches = [batches[i] for i in perm]
        self._plan_cache = (epoch, batches)
        return batches

    def num_batches(self, epoch: int | None = None) -> int:
        """Batches in `epoch` (default: the current one)."""
        return len(self._plan(self.epoch if epoch is None else epoch))

    def __len__(self) -> int:
        return self.num_batches()

    @property
    def longest(self) -> int:
        """The widest batch any epoch can make: the longest example (max_tokens with packing)."""
        return self.max_tokens if self.packing else int(self._lengths.max())

    # --- building batches
    def _example(self, i: int) -> tuple[list[int], list[int]]:
        labels = list(self._labels[i])
        labels[0] = IGNORE_INDEX  # nothing predicts an example's first token (in a pack: not the previous example)
        return self._ids[i], labels

    def _make(self, indices: list[int]) -> dict[str, Any]:
        examples = [self._example(i) for i in indices]
        if self.packing:
            ids = torch.tensor([t for e, _ in examples for t in e], dtype=torch.long)[None]  # (1, T)
            labels = torch.tensor([t for _, lab in examples for t in lab], dtype=torch.long)[None]  # (1, T)
            pos = torch.cat([torch.arange(len(e), dtype=torch.long) for e, _ in examples])[None]  # (1, T)
            batch = {"input_ids": ids, "labels": labels, "position_ids": pos}
        else:
            width = max(len(e) for e, _ in examples)
            ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)  # (B, T)
            labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
            mask = torch.zeros((len(examples), width), dtype=torch.long)  # (B, T)
            for r, (e, lab) in enumerate(examples):
                ids[r, : len(e)] = torch.tensor(e, dtype=torch.long)
                labels[r, : len(e)] = torch.tensor(lab, dtype=torch.long)
                mask[r, : len(e)] = 1
            batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        batch["num_label_tokens"] = count_label_tokens(batch["labels"])
        return batch

    # --- iteration and state
    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch = self.epoch
        plan = self._plan(epoch)
        while self.epoch == epoch and self.position < len(plan):
            batch = self._make(plan[self.position])
            self.position += 1
            if self.position == len(plan):
                self.epoch, self.position = epoch + 1, 0
            yield batch

    def forever(self) -> Iterator[dict[str, Any]]:
        """Batches through all epochs, without end (resumable like iteration)."""
        while True:
            yield from self

    def state_dict(self) -> dict[str, Any]:
        """{"epoch", "position", "fingerprint"}: JSON-serialisable; position = batches of epoch already yielded."""
        return {"epoch": self.epoch, "position": self.position, "fingerprint": self._fingerprint}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from state_dict(); the data and settings must be the ones it was saved with."""
        if state.get("fingerprint") != self._fingerprint:
            raise DataError(
                "batcher state was saved for other data or settings: resume with the same dataset, max_length, "
                "packing, max_tokens/batch_size, seed and grouping"
            )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < max(self.num_batches(epoch), 1):
            raise DataError(
                f"batcher state epoch={epoch} position={position} is out of range: pass a state from state_dict()"
            )
        self.epoch, self.position = epoch, position
