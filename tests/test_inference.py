"""inference.py: generation dequantizes the NF4 base once (dense_weights), not once per token, with the same
answers; where the dense copy would not fit, the model is left as it is."""

import logging

import pytest
import torch

from qlora_fsdp.inference import dense_bytes, dense_weights, greedy_answer
from qlora_fsdp.model import load_model
from qlora_fsdp.nf4.tensor import NF4Tensor
from qlora_fsdp.data import embedded_tokenizer, single_turn_prompt_ids, single_turn_text


@pytest.fixture(scope="module")
def model_and_tok():
    return load_model("embedded", dtype=torch.float32, device="cpu"), embedded_tokenizer()


def _count_dequantizations(monkeypatch) -> list[int]:
    calls = [0]
    original = NF4Tensor.dequantize

    def counting(self, *args, **kwargs):
        calls[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(NF4Tensor, "dequantize", counting)
    return calls


def test_generation_dequantizes_each_weight_once_with_the_same_answer(model_and_tok, monkeypatch):
    model, tok = model_and_tok
    nf4 = {n: p for n, p in model.named_parameters() if isinstance(p, NF4Tensor)}
    assert len(nf4) == 7 * len(model.model.layers)
    prompt = single_turn_prompt_ids(tok, single_turn_text("Reverse the word.", "kitten", "alpaca"), "alpaca")
    calls = _count_dequantizations(monkeypatch)
    per_token = greedy_answer(model, tok, prompt, 8)
    assert calls[0] >= len(nf4) * len(per_token)  # every forward (one per token) dequantizes every weight
    calls[0] = 0
    with dense_weights(model) as swapped:
        assert swapped and not any(isinstance(p, NF4Tensor) for p in model.parameters())
        once = greedy_answer(model, tok, prompt, 8)
    assert calls[0] == len(nf4)
    assert once == per_token and len(once) > 1
    assert all(p is nf4[n] for n, p in model.named_parameters() if n in nf4)  # the same NF4 weights are back


def test_no_dense_copy_where_it_does_not_fit(model_and_tok, monkeypatch, caplog):
    model, tok = model_and_tok
    before = dict(model.named_parameters())
    with caplog.at_level(logging.WARNING, logger="qlora_fsdp.inference"):
        with dense_weights(model, min_free_bytes=1 << 62) as swapped:
            assert not swapped and dict(model.named_parameters()) == before
    assert "would not fit" in caplog.text and dense_bytes(model) > 0
