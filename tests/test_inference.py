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


def test_merge_folds_the_adapter_into_the_dense_copy_and_unmerges_on_exit(model_and_tok):
    import peft

    model, tok = model_and_tok
    adapted = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    torch.manual_seed(0)
    for name, p in adapted.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)  # a trained adapter: B != 0
    ids = torch.tensor([single_turn_prompt_ids(tok, "Sort the letters.\nkitten", "raw")])
    with torch.no_grad():
        reference = adapted(input_ids=ids).logits  # NF4 base + LoRA terms, unmerged
        with dense_weights(adapted, merge=True):
            lora = [m for m in adapted.modules() if hasattr(m, "merged_adapters")]
            assert lora and all(m.merged for m in lora)
            merged = adapted(input_ids=ids).logits
        assert not any(m.merged for m in lora)
        assert all(isinstance(m.base_layer.weight, NF4Tensor) for m in lora)
        torch.testing.assert_close(adapted(input_ids=ids).logits, reference, rtol=0, atol=0)  # untouched after
    torch.testing.assert_close(merged, reference, rtol=1e-4, atol=1e-4)  # W + s B A rounded once in fp32
    adapted.unload()  # the shared model without LoRA layers again
