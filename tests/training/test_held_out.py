"""Where the held-out examples come from (training/batches.py data_sources): a share of the training data, one end
of its split, another split or dataset; disjoint from what trains, and a one-line error where none is given."""

import json

import pytest

from qlora_fsdp.training import TrainConfig, TrainError
from qlora_fsdp.training.batches import data_sources, other_end


@pytest.fixture
def folder(tmp_path):
    rows = [{"instruction": f"say {i}", "output": str(i)} for i in range(20)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    return tmp_path


def outputs(d):
    return [int(x) for x in d["output"]]


@pytest.mark.parametrize("eval_split, train_split, want", [
    ("train[-10%:]", "train", "train[:-10%]"), ("train[:50]", "train", "train[50:]"), ("train[5:10]", "train", None),
    ("test", "train", None), ("train[-5:]", "train[:100]", None), ("validation[-5:]", "train", None),
])  # fmt: skip
def test_other_end(eval_split, train_split, want):
    assert other_end(eval_split, train_split) == want


def test_eval_fraction_holds_out_a_seeded_share(folder):
    train, held = data_sources(TrainConfig(dataset=str(folder), eval_fraction=0.25))
    assert len(held) == 5 and sorted(outputs(train) + outputs(held)) == list(range(20))
    again, _ = data_sources(TrainConfig(dataset=str(folder), eval_fraction=0.25))
    assert outputs(again) == outputs(train)


@pytest.mark.parametrize("eval_split, trains, held", [
    ("train[-5:]", range(15), range(15, 20)), ("train[:4]", range(4, 20), range(4)), ("test", range(20), range(3)),
    ("train[-25%:]", range(15), range(15, 20)),
])  # fmt: skip
def test_eval_split_alone_takes_from_the_dataset_and_training_leaves_it_out(folder, eval_split, trains, held):
    train, held_out = data_sources(TrainConfig(dataset=str(folder), eval_split=eval_split))
    assert outputs(train) == list(trains) and outputs(held_out) == list(held)


def test_eval_dataset_and_no_eval(folder):
    train, held = data_sources(TrainConfig(dataset=str(folder), eval_dataset=str(folder), eval_split="test"))
    assert len(train) == 20 and outputs(held) == [0, 1, 2]
    assert data_sources(TrainConfig(dataset=str(folder)))[1] is None


@pytest.mark.parametrize("options, message", [
    ({"eval_every": 10}, "--eval-every 10 without held-out data: add --eval-fraction"),
    ({"eval_fraction": 0.1, "eval_split": "test"}, "--eval-fraction and --eval-split both choose"),
    ({"eval_fraction": 1.5}, "--eval-fraction 1.5: a share of the examples"),
])  # fmt: skip
def test_eval_options_without_data_or_in_conflict_are_one_line_errors(folder, options, message):
    with pytest.raises(TrainError, match=message):
        TrainConfig(dataset=str(folder), **options).validate()


def test_an_eval_split_inside_the_training_split_is_refused(folder):
    with pytest.raises(TrainError, match=r"--eval-split train\[5:10\] overlaps --split train"):
        data_sources(TrainConfig(dataset=str(folder), eval_split="train[5:10]"))
