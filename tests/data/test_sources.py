"""Loading examples (qlora_fsdp.data.sources): local files of every supported kind, folders by split name, sets
saved with `save_to_disk`, slices, and one-line errors for a missing file, an unknown hub name, a bad extension or
split. Reference: the rows written, read back unchanged."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest
from datasets import Dataset

from qlora_fsdp.data import DataError, load_examples
from tests.data.examples import ROWS


def _write(path: Path, rows: list[dict]) -> None:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.mark.parametrize("ext", [".jsonl", ".json", ".parquet", ".csv"])
def test_load_local_file_and_slice(tmp_path, ext):
    path = tmp_path / f"data{ext}"
    _write(path, ROWS)
    assert load_examples(str(path)).to_list() == ROWS
    assert load_examples(str(path), "train[:3]").to_list() == ROWS[:3]
    assert load_examples(str(path), "train[-2:]").to_list() == ROWS[-2:]


def test_load_folder_by_split_name(tmp_path):
    _write(tmp_path / "train.jsonl", ROWS[:4])
    _write(tmp_path / "eval.jsonl", ROWS[4:])
    (tmp_path / "tokenizer.json").write_text("{}")  # a folder may hold other json files: never read as data
    assert load_examples(str(tmp_path)).to_list() == ROWS[:4]
    assert load_examples(str(tmp_path), "eval").to_list() == ROWS[4:]
    with pytest.raises(DataError, match=r"split 'test' not found in .*: pass one of \['eval', 'train'\]"):
        load_examples(str(tmp_path), "test")


def test_load_saved_to_disk(tmp_path):
    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "single"))
    assert load_examples(str(tmp_path / "single"), "train[1:3]").to_list() == ROWS[1:3]
    from datasets import DatasetDict

    splits = DatasetDict({"train": Dataset.from_list(ROWS[:3]), "eval": Dataset.from_list(ROWS[3:])})
    splits.save_to_disk(str(tmp_path / "dict"))
    assert load_examples(str(tmp_path / "dict"), "eval").to_list() == ROWS[3:]
    with pytest.raises(DataError, match=r"split 'test' not found in .*: pass one of \['eval', 'train'\]"):
        load_examples(str(tmp_path / "dict"), "test")


def test_missing_file_error():
    with pytest.raises(DataError) as e:
        load_examples("foo.jsonl")
    assert str(e.value) == (
        "dataset 'foo.jsonl' not found: pass a local .jsonl/.json/.parquet/.csv file or directory, "
        "or a Hugging Face dataset name"
    )


def test_unknown_hub_name_fails_fast():
    start = time.monotonic()
    with pytest.raises(DataError, match=r"^dataset 'no-such-org-x9/no-such-dataset' not found: pass a local"):
        load_examples("no-such-org-x9/no-such-dataset")
    assert time.monotonic() - start < 15  # the hub client alone retries for ~25 s offline


def test_bad_extension_and_split(tmp_path):
    path = tmp_path / "data.xlsx"
    path.write_text("x")
    with pytest.raises(DataError, match="unsupported data file .*: use a .jsonl"):
        load_examples(str(path))
    with pytest.raises(DataError, match="bad split"):
        load_examples(str(path), "train[:3")
