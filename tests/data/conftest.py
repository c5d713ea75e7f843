"""Fixtures of the data tests: the embedded tokenizer and the embedded task's training split."""

import pytest

from qlora_fsdp.data import embedded_dataset, embedded_tokenizer


@pytest.fixture(scope="module")
def tok():
    return embedded_tokenizer()


@pytest.fixture(scope="module")
def train_raw():
    return embedded_dataset("train")
