"""Batches (qlora_fsdp.data.batching): packed and padded batches against a tiny random LlamaForCausalLM run one
example at a time (unpacked), resuming mid-epoch, grouping by length, and errors."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from datasets import Dataset

from qlora_fsdp.data import IGNORE_INDEX, Batcher, DataError, tokenize_dataset, tokenize_example
from tests.data.examples import ROWS


@pytest.fixture(scope="module")
def tiny_llama(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, attn_implementation="sdpa",
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).eval().float()
    assert model.config._attn_implementation == "sdpa"
    return model


@pytest.fixture(scope="module")
def mixed_tokenized(tok, train_raw):
    """Instruction examples (completion-only) plus text examples whose labels equal input_ids, first token included
    (as data tokenized elsewhere may be): packing must still keep each example start from being predicted."""
    rows = [tokenize_example(train_raw[i], tok, "instruction", 128) for i in range(9)]
    for text in ("abcdefgh", "the quick brown fox", "1+2=3"):
        ids = tokenize_example({"text": text}, tok, "text", 128)["input_ids"]
        rows.append({"input_ids": ids, "labels": list(ids)})
    return Dataset.from_list(rows)


def _segments(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    starts = (position_ids[0] == 0).nonzero().flatten().tolist() + [position_ids.shape[1]]
    return list(zip(starts[:-1], starts[1:]))


@torch.no_grad()
def test_packing_matches_unpacked_forward(tiny_llama, mixed_tokenized):
    model, data = tiny_llama, mixed_tokenized
    batcher = Batcher(data, packing=True, max_tokens=200, seed=1)
    seen, loss_sum, n_sum = [], 0.0, 0
    for batch in batcher:
        ids, labels, pos = batch["input_ids"], batch["labels"], batch["position_ids"]
        assert ids.shape == labels.shape == pos.shape and ids.shape[0] == 1 and ids.shape[1] <= 200
        assert batch["num_label_tokens"] == int((labels != IGNORE_INDEX).sum())
        out = model(input_ids=ids, position_ids=pos, labels=labels, use_cache=False)
        packed_loss_sum, packed_n = 0.0, 0
        for s, e in _segments(pos):
            i = next(k for k in range(len(data)) if data[k]["input_ids"] == ids[0, s:e].tolist() and k not in seen)
            seen.append(i)
            assert labels[0, s] == IGNORE_INDEX and labels[0, s + 1 : e].tolist() == data[i]["labels"][1:]
            single_ids = torch.tensor([data[i]["input_ids"]])
            single_labels = torch.tensor([data[i]["labels"]])
            ref = model(input_ids=single_ids, labels=single_labels, use_cache=False)
            torch.testing.assert_close(out.logits[:, s:e], ref.logits, atol=1e-5, rtol=0)
            n = int((single_labels[0, 1:] != IGNORE_INDEX).sum())  # tokens the model predicts (shifted)
            packed_loss_sum += ref.loss.item() * n
            packed_n += n
        assert packed_n == batch["num_label_tokens"]
        assert abs(out.loss.item() - packed_loss_sum / packed_n) < 1e-5  # token-weighted mean of per-example losses
        loss_sum, n_sum = loss_sum + out.loss.item() * packed_n, n_sum + packed_n
        # control: the same row without restarting positions lets examples see each other
        if len(_segments(pos)) > 1:
            bad = model(input_ids=ids, use_cache=False).logits
            assert (bad[:, _segments(pos)[1][0] :] - out.logits[:, _segments(pos)[1][0] :]).abs().max() > 1e-3
    assert sorted(seen) == list(range(len(data)))  # every example exactly once per epoch


@torch.no_grad()
def test_padded_batches_match_unpadded_forward(tiny_llama, mixed_tokenized, tok):
    model, data = tiny_llama, mixed_tokenized
    batcher = Batcher(data, packing=False, batch_size=4, pad_token_id=tok.pad_token_id, seed=2)
    assert len(batcher) == 3
    for batch in batcher:
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        out = model(input_ids=ids, attention_mask=mask, use_cache=False)
        for r in range(ids.shape[0]):
            n = int(mask[r].sum())
            assert (ids[r, n:] == tok.pad_token_id).all() and (labels[r, n:] == IGNORE_INDEX).all()
            assert labels[r, 0] == IGNORE_INDEX
            ref = model(input_ids=ids[r : r + 1, :n], use_cache=False).logits
            torch.testing.assert_close(out.logits[r : r + 1, :n], ref, atol=1e-5, rtol=0)


def _as_lists(batches):
    return [{k: v.tolist() if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]


@pytest.mark.parametrize(
    "kwargs",
    [dict(packing=True, max_tokens=256), dict(packing=False, batch_size=7, group_by_length=True, mega_batches=3)],
    ids=["packed", "padded-grouped"],
)
def test_resume_yields_the_remaining_batches(tok, train_raw, kwargs):
    data = tokenize_dataset(train_raw.select(range(120)), tok, max_length=128)
    full = Batcher(data, seed=5, **kwargs)
    per_epoch = len(full)
    total = 2 * per_epoch + 3  # crosses two epoch boundaries
    expected = _as_lists(itertools.islice(full.forever(), total))
    assert full.state_dict()["epoch"] == 2 and full.state_dict()["position"] == 3
    for k in (0, 5, per_epoch - 1, per_epoch, per_epoch + 2):
        first = Batcher(data, seed=5, **kwargs)
        head = _as_lists(itertools.islice(first.forever(), k))
        state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint file
        resumed = Batcher(data, seed=5, **kwargs)
        resumed.load_state_dict(state)
        assert head + _as_lists(itertools.islice(resumed.forever(), total - k)) == expected
    # plain iteration = one epoch from where it stands
    b = Batcher(data, seed=5, **kwargs)
    assert _as_lists(b) == expected[:per_epoch] and b.state_dict()["epoch"] == 1
    # shuffled per epoch and per seed
    first_ids = lambda bs: [x["input_ids"] for x in bs]  # noqa: E731
    assert first_ids(expected[:per_epoch]) != first_ids(expected[per_epoch : 2 * per_epoch])
    assert first_ids(_as_lists(Batcher(data, seed=6, **kwargs))) != first_ids(expected[:per_epoch])
    # a state from other settings is refused
    other = Batcher(data, seed=6, **kwargs)
    with pytest.raises(DataError, match="saved for other data or settings"):
        other.load_state_dict(state)


def test_group_by_length_reduces_padding(tok, train_raw):
    data = tokenize_dataset(train_raw.select(range(300)), tok, max_length=128)

    def padding(**kw):
        return sum(int((b["attention_mask"] == 0).sum()) for b in Batcher(data, packing=False, batch_size=8, **kw))

    assert padding(group_by_length=True) < 0.5 * padding(group_by_length=False)


def test_batcher_errors(tok, mixed_tokenized):
    with pytest.raises(DataError, match="more than max_tokens=8: raise max_tokens"):
        Batcher(mixed_tokenized, packing=True, max_tokens=8)
    with pytest.raises(DataError, match="run tokenize_dataset first"):
        Batcher(Dataset.from_list(ROWS))
